"""Files other tools read (issue 17): the base model an adapter names loads with a plain
`from_pretrained` (peft's AutoPeftModelForCausalLM), a peft DoRA file gives our float32 logits, and every
file and folder we write gets the user's normal permissions.

Item 2: adapter_config.json's `base_model_name_or_path` is a loadable local path (the embedded default's
converted directory, a model directory as an absolute path), not our alias.
Item 3: DoRA composes its output in peft's order of operations.
Item 12: 0666 / 0777 less the umask, never mkstemp's 0600 / mkdtemp's 0700."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune import models
from deltatune.io.adapter_files import CONFIG_NAME
from deltatune.train.build import load_adapted
from deltatune.train.commands.merge import merge_adapter
from deltatune.train.config_file import load_config
from deltatune.train.loop import train
from deltatune.train.run.checkpoint import save_checkpoint
from helpers_train import make_tiny_model_dir, upper_rows, write_config, write_jsonl
from merge_checks import assert_merged_equals_unmerged
from tiny_models import token_batch

QUIET = {"show_progress": False, "log": lambda *_: None}
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def recorded_base(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / CONFIG_NAME).read_text())["base_model_name_or_path"]


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


# ---------------------------------------------------------------------- item 2: a loadable base
def test_default_model_run_loads_in_peft_auto_peft_model(tmp_path, monkeypatch):
    """The README's path: train on the embedded default (alias `smollm2-135m`), then load the run's
    adapter the way a peft user does, offline: AutoPeftModelForCausalLM reads the base from the config."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_jsonl(tmp_path / "train.jsonl", upper_rows(4))
    config = {"model": {"name_or_path": "smollm2-135m"},
              "method": {"name": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]},
              "data": {"train": str(data), "max_length": 96},
              "training": {"max_steps": 1, "batch_size": 2, "lr": 1e-2}, "output_dir": str(tmp_path / "run")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    train(load_config(tmp_path / "run.yaml", []), **QUIET)
    run = tmp_path / "run"

    base = recorded_base(run)
    assert Path(base).is_absolute() and (Path(base) / "config.json").is_file(), base
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(run)).eval()
    ours, tokenizer = load_adapted(run)  # `deltatune generate/eval --adapter` resolve the same name
    ids = tokenizer(["shout apple 3"], return_tensors="pt").input_ids
    with ours.disable_adapter():
        base_logits = logits(ours, ids)
    assert (logits(ours, ids) - base_logits).abs().max() > 1e-4, "the trained adapter must change the output"
    assert torch.equal(logits(theirs, ids), logits(ours, ids))


def test_model_saved_to_a_folder_records_that_folder(tmp_path, monkeypatch):
    """A tiny model saved with save_pretrained and loaded from a relative path: the adapter names the
    folder by its absolute path, and AutoPeftModelForCausalLM loads it from another working directory."""
    make_tiny_model_dir(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained("base"),
                              dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))  # AutoPeftModel picks its class by it
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3)
    model.save_pretrained("adapter")
    assert recorded_base(tmp_path / "adapter") == str((tmp_path / "base").resolve())

    monkeypatch.chdir(tmp_path.parent)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    ids = token_batch()
    assert torch.allclose(logits(theirs, ids), logits(model.eval(), ids), atol=1e-6, rtol=0)


def test_alias_is_kept_until_the_default_is_converted_and_a_moved_cache_path_still_resolves(tmp_path,
                                                                                           monkeypatch):
    """A save never starts the conversion: with no converted default an alias stays an alias. A cache
    path recorded on another machine (missing here) resolves to this machine's default."""
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "empty-cache"))
    assert models.loadable_name("smollm2-135m") == "smollm2-135m"
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"  # loadable wherever a hub or its cache is
    assert models.loadable_name(hub_id) == hub_id
    assert models.loadable_name(None) is None and models.loadable_name("") is None
    monkeypatch.setattr(models, "ensure_default_model", lambda: tmp_path / "converted")
    assert models.resolve_model("/elsewhere/.cache/deltatune/smollm2-135m-instruct") == tmp_path / "converted"
    with pytest.raises(models.ModelNotFoundError, match="not a local directory"):
        models.resolve_model("/elsewhere/some-other-model")


# ---------------------------------------------------------------------- item 3: peft's DoRA, our logits
def llama_with_large_logits(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama (hidden 32) with weights N(0, 1): logits of about 25, as large as SmolLM2's ~30,
    where float32 rounding of a differently ordered sum shows (5e-5 on SmolLM2, 1.6e-5 here)."""
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=1.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("targets", [LLAMA_LINEAR, ["embed_tokens", "q_proj"]], ids=["linear", "embedding"])
def test_peft_dora_file_gives_our_float32_logits(targets, tmp_path):
    settings = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    theirs = peft.get_peft_model(llama_with_large_logits(), peft.LoraConfig(**settings))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:  # random, non-zero; magnitudes stay positive
                noise = torch.randn(param.shape, generator=generator) * 0.2
                param.copy_(1 + noise if "magnitude" in name else noise)
    ids = torch.randint(0, 256, (2, 16), generator=generator)
    expected = logits(theirs, ids)
    assert expected.abs().max() > 10, "logits as large as a real model's"
    theirs.save_pretrained(str(tmp_path))

    ours = dt.DeltaModel.from_pretrained(llama_with_large_logits(), str(tmp_path))
    assert (logits(ours, ids) - expected).abs().max().item() <= 1e-5
    back = tmp_path / "ours"  # saved before the merge below (an embedding adapter saves the base embedding)
    ours.save_pretrained(str(back))
    assert (logits(peft.PeftModel.from_pretrained(llama_with_large_logits(), str(back)), ids)
            - expected).abs().max().item() <= 1e-5
    assert_merged_equals_unmerged(ours, ids)  # the invariant holds in the new order too


# ---------------------------------------------------------------------- item 12: normal permissions
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """{path relative to root: permission bits} of root and everything under it."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def assert_normal_modes(root: Path, umask: int = 0o022) -> None:
    for name, mode in modes(root).items():
        want = (0o777 if (root / name).is_dir() else 0o666) & ~umask
        assert mode == want, f"{root / name}: mode {oct(mode)}, expected {oct(want)}"


def test_adapter_merged_model_and_checkpoint_get_the_umask_modes(tmp_path, umask_022):
    """With umask 022 every file written is 0644 and every folder 0755: an adapter save (a second adapter
    in a subfolder too), a merged export and a training checkpoint."""
    base_dir = make_tiny_model_dir(tmp_path / "base")
    model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                              dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("second", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    model.save_pretrained(str(tmp_path / "adapter"))
    assert_normal_modes(tmp_path / "adapter")

    merge_adapter(tmp_path / "adapter", tmp_path / "merged", model=str(base_dir))
    assert_normal_modes(tmp_path / "merged")

    model.delete_adapter("second")  # a checkpoint holds a training run's one adapter
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoint = save_checkpoint(tmp_path / "run", 1, model, optimizer, scheduler, {})
    assert_normal_modes(checkpoint)


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_a_whole_run_writes_the_umask_modes(umask, tmp_path):
    """A training run's folder (adapter, metrics, loss plot, run config, checkpoints) gets the umask's
    modes: 0644 / 0755 under 022, and a stricter 077 is kept (0600 / 0700), no more and no less."""
    base_dir = make_tiny_model_dir(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", upper_rows(8))
    config = write_config(tmp_path / "run.yaml", base_dir, data, None, tmp_path / "run", max_steps=2,
                          save_every=1)
    old = os.umask(umask)
    try:
        train(load_config(config, []), **QUIET)
    finally:
        os.umask(old)
    written = modes(tmp_path / "run")
    assert {"adapter_model.safetensors", "loss.png", "metrics.jsonl"} <= set(written)
    assert any(name.startswith("checkpoints/") for name in written)
    assert_normal_modes(tmp_path / "run", umask=umask)
