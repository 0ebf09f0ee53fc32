"""Adapters move both ways between deltatune and the installed Hugging Face `peft` package.

One table of cases (tiny model, LoRA settings) runs through the same checks: an adapter with random,
non-zero weights saved by one library and loaded by the other gives the same logits (max abs diff
<= 1e-5, float32); both libraries write the same tensor keys and shapes and compatible
adapter_config.json fields for the same settings. Mixed-adapter batches are checked against `peft`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune
from tiny_models import image_batch, tiny_bert_cls, tiny_convnet, tiny_gpt2, tiny_llama, token_batch

TOL = 1e-5
LLAMA_ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    """One tiny model and the LoRA settings to try on it (peft's field names, as in both LoraConfigs)."""

    build: Callable[[], nn.Module]
    settings: dict
    inputs: Callable[[], torch.Tensor] = token_batch


def lora(targets: list[str], r: int = 4, lora_alpha: float = 8, **extra) -> dict:
    return {"r": r, "lora_alpha": lora_alpha, "target_modules": targets, **extra}


CASES = {
    "lora_attn_mlp": Case(tiny_llama, lora(LLAMA_ATTN_MLP)),
    "rslora": Case(tiny_llama, lora(["q_proj", "v_proj"], use_rslora=True)),
    "dora": Case(tiny_llama, lora(LLAMA_ATTN_MLP, use_dora=True)),
    "pissa": Case(tiny_llama, lora(["q_proj", "v_proj", "up_proj"], init_lora_weights="pissa")),
    "embedding": Case(tiny_llama, lora(["embed_tokens", "q_proj"])),
    "embedding_dora": Case(tiny_llama, lora(["embed_tokens"], use_dora=True)),
    "conv2d": Case(tiny_convnet, lora(["conv2d"]), image_batch),
    "conv1d": Case(tiny_convnet, lora(["conv1d", "fc"]), image_batch),
    "conv_dora": Case(tiny_convnet, lora(["conv2d", "conv1d"], use_dora=True), image_batch),
    "gpt2_conv1d": Case(tiny_gpt2, lora(["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "modules_to_save_seq_cls": Case(tiny_bert_cls, lora(["query", "value"], task_type="SEQ_CLS")),
    "rank_alpha_pattern": Case(tiny_llama, lora(
        ["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"down_proj": 3, "layers.0.self_attn.q_proj": 2})),
    "gpt2_bias_all": Case(tiny_gpt2, lora(["c_attn"], fan_in_fan_out=True, bias="all")),
    "gpt2_bias_lora_only": Case(tiny_gpt2, lora(["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only")),
}
CASE_IDS = list(CASES)
DIRECTIONS = [pytest.param("deltatune", "peft", id="deltatune-to-peft"),
              pytest.param("peft", "deltatune", id="peft-to-deltatune")]


# ---------------------------------------------------------------------- the two libraries, one interface
def wrap(library: str, base: nn.Module, settings: dict, adapter_name: str = "default") -> nn.Module:
    if library == "deltatune":
        return deltatune.get_peft_model(base, deltatune.LoraConfig(**settings), adapter_name=adapter_name)
    return peft.get_peft_model(base, peft.LoraConfig(**settings), adapter_name=adapter_name)


def add(library: str, model: nn.Module, adapter_name: str, settings: dict) -> None:
    config_cls = deltatune.LoraConfig if library == "deltatune" else peft.LoraConfig
    model.add_adapter(adapter_name, config_cls(**settings))


def load(library: str, base: nn.Module, path: Path, adapter_name: str = "default") -> nn.Module:
    if library == "deltatune":
        return deltatune.DeltaModel.from_pretrained(base, str(path), adapter_name=adapter_name)
    return peft.PeftModel.from_pretrained(base, str(path), adapter_name=adapter_name)


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random, non-zero adapter tensors (every adapter, active or not), trained biases and heads, so a
    wrong key, transpose or scaling shows in the logits. DoRA magnitudes stay positive."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.requires_grad or "lora_" in name:
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.copy_(1.0 + noise if "magnitude" in name else noise)


@torch.no_grad()
def logits(model: nn.Module, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(inputs, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------- logits agree after the move
@pytest.mark.parametrize("saver, loader", DIRECTIONS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_adapter_moves_between_libraries_with_same_logits(case_id, saver, loader, tmp_path):
    case = CASES[case_id]
    inputs = case.inputs()
    trained = wrap(saver, case.build(), case.settings)
    randomize(trained)
    expected = logits(trained, inputs)
    assert max_diff(expected, logits(case.build(), inputs)) > 1e-3, "the adapter must change the output"
    trained.save_pretrained(str(tmp_path))

    loaded = load(loader, case.build(), tmp_path)
    assert max_diff(logits(loaded, inputs), expected) <= TOL


@pytest.mark.parametrize("saver, loader", DIRECTIONS)
def test_second_adapter_in_subfolder_moves_between_libraries(saver, loader, tmp_path):
    inputs = token_batch()
    trained = wrap(saver, tiny_llama(), lora(["q_proj", "v_proj"]))
    add(saver, trained, "other", lora(["k_proj", "up_proj"], r=2, lora_alpha=4, use_dora=True))
    randomize(trained)
    expected = {}
    for name in ("default", "other"):
        trained.set_adapter(name)
        expected[name] = logits(trained, inputs)
    assert max_diff(expected["default"], expected["other"]) > 1e-3
    trained.save_pretrained(str(tmp_path))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["adapter_config.json",
                                                                     "adapter_model.safetensors"]

    loaded = load(loader, tiny_llama(), tmp_path)
    loaded.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for name in ("default", "other"):
        loaded.set_adapter(name)
        assert max_diff(logits(loaded, inputs), expected[name]) <= TOL, name


# ---------------------------------------------------------------------- same files for the same settings
def saved_files(library: str, case: Case, directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    model = wrap(library, case.build(), case.settings)
    model.save_pretrained(str(directory))
    config = json.loads((directory / "adapter_config.json").read_text())
    return load_file(str(directory / "adapter_model.safetensors")), config


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
@pytest.mark.filterwarnings("ignore:saving .* in full")
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_saved_keys_and_shapes_match_peft(case_id, tmp_path):
    ours, _ = saved_files("deltatune", CASES[case_id], tmp_path / "deltatune")
    theirs, _ = saved_files("peft", CASES[case_id], tmp_path / "peft")
    # Both save the full base weight of a targeted embedding ("auto" save_embedding_layers; a model built in
    # memory may have a resized vocabulary); we also keep the output head (io/vocabulary.py).
    full = ("embed_tokens.base_layer.weight", "lm_head.weight")
    assert {k for k in theirs if k.endswith(full[0])} <= {k for k in ours if k.endswith(full[0])}
    ours, theirs = ({k: v for k, v in d.items() if not k.endswith(full)} for d in (ours, theirs))
    assert sorted(ours) == sorted(theirs)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_saved_config_fields_match_peft(case_id, tmp_path):
    _, ours = saved_files("deltatune", CASES[case_id], tmp_path / "deltatune")
    _, theirs = saved_files("peft", CASES[case_id], tmp_path / "peft")
    assert set(ours) <= set(theirs), f"fields peft does not know: {set(ours) - set(theirs)}"
    for key, value in ours.items():
        if key == "target_modules":  # peft stores a set, in no fixed order
            assert sorted(value) == sorted(theirs[key])
        else:
            assert value == theirs[key], key
    # and peft's own parser takes our file as it is
    parsed = peft.LoraConfig.from_pretrained(str(tmp_path / "deltatune"))
    assert parsed.r == CASES[case_id].settings["r"]


# ---------------------------------------------------------------------- mixed-adapter batches
MIXED_ADAPTERS = {
    "a": lora(["q_proj", "v_proj"]),
    "b": lora(["q_proj", "o_proj", "down_proj"], r=2, use_rslora=True),
    "c": lora(["v_proj", "up_proj"], r=3, lora_alpha=6, use_dora=True),
}
MIXED_ORDER = ["a", "b", "__base__", "c", "a", "__base__"]


def test_mixed_batch_matches_peft_and_each_sample_alone(tmp_path):
    inputs = token_batch(batch=len(MIXED_ORDER), length=5)
    ours = wrap("deltatune", tiny_llama(), MIXED_ADAPTERS["a"], adapter_name="a")
    for name in ("b", "c"):
        add("deltatune", ours, name, MIXED_ADAPTERS[name])
    randomize(ours)
    mixed = logits(ours, inputs, adapter_names=MIXED_ORDER)
    # the rows really differ, so the routing is being tested
    assert max_diff(mixed[0], mixed[1]) > 1e-3 and max_diff(mixed[2], mixed[3]) > 1e-3

    ours.save_pretrained(str(tmp_path))
    theirs = load("peft", tiny_llama(), tmp_path / "a", adapter_name="a")
    for name in ("b", "c"):
        theirs.load_adapter(str(tmp_path / name), adapter_name=name)
    # peft refuses DoRA adapters in mixed batches, so its mixed batch covers the other rows
    rows = [i for i, name in enumerate(MIXED_ORDER) if not MIXED_ADAPTERS.get(name, {}).get("use_dora")]
    names = [MIXED_ORDER[i] for i in rows]
    assert max_diff(mixed[rows], logits(theirs, inputs[rows], adapter_names=names)) <= TOL

    for row, name in enumerate(MIXED_ORDER):
        sample = inputs[row:row + 1]
        if name == "__base__":
            with ours.disable_adapter():
                alone = logits(ours, sample)
            with theirs.disable_adapter():
                alone_peft = logits(theirs, sample)
        else:
            ours.set_adapter(name)
            theirs.set_adapter(name)
            alone, alone_peft = logits(ours, sample), logits(theirs, sample)
        assert max_diff(mixed[row:row + 1], alone) <= TOL, (row, name)
        assert max_diff(mixed[row:row + 1], alone_peft) <= TOL, (row, name)
