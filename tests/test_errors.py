"""Bad input gives one clear error that names the field, file, module or pattern at fault, and leaves
the user's model (and files) as they were."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune import AdapterFileError, DeltaConfigError, DeltaModel, LoraConfig, MergeError, get_peft_model
from tiny_models import tiny_convnet, tiny_llama, tiny_t5, token_batch

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PACKAGE_DIR = Path(deltatune.__file__).parent


# ---------------------------------------------------------------------- helpers
def lora(**settings) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **settings})


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            offset = 1.0 if param.dim() == 1 else 0.0  # keep DoRA magnitudes positive
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2 + offset)


def save_adapter(directory: Path, **settings) -> Path:
    model = get_peft_model(tiny_llama(), lora(**settings))
    randomize(model)
    model.save_pretrained(str(directory))
    return directory


def rewrite_config(directory: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    file = directory / CONFIG_FILE
    data = json.loads(file.read_text())
    data.update(changes)
    for key in drop:
        data.pop(key)
    file.write_text(json.dumps(data))
    return file


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN equals the same NaN)."""
    return (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(
        a.detach().flatten().view(torch.uint8), b.detach().flatten().view(torch.uint8))


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor], types: dict[str, type]) -> None:
    """No deltatune wrapper left, same module tree, bitwise the same tensors."""
    assert module_types(model) == types
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [name for name in before if not bitwise_equal(before[name], after[name])]
    assert not changed, f"tensors changed: {changed}"


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}


@torch.no_grad()
def logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return model(inputs).logits


def wider_llama() -> LlamaForCausalLM:
    """Same architecture as tiny_llama, hidden 32 instead of 16: a 'different base model'."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------------- config fields
@pytest.mark.parametrize("field, value", [
    ("r", 0), ("r", -2), ("r", "8"), ("r", 2.5),
    ("lora_alpha", -1), ("lora_alpha", "16"),
    ("lora_dropout", 1.0), ("lora_dropout", -0.1), ("lora_dropout", "0.1"),
    ("bias", "some"), ("bias", None),
    ("init_lora_weights", "pisa"), ("init_lora_weights", "pissa_niter_x"), ("init_lora_weights", 3),
    ("task_type", "CLASSIFY"),
    ("target_modules", [1, 2]),
    ("rank_pattern", {"q_proj": 0}), ("rank_pattern", ["q_proj"]),
    ("alpha_pattern", "q_proj=4"),
])
def test_bad_field_value_names_the_field(field, value, tmp_path):
    names_field = rf"(^|\W){field}(=|\[|\s)"
    with pytest.raises(DeltaConfigError, match=names_field):
        lora(**{field: value})
    # the same value read from a config file is refused the same way, before the model is touched
    file = rewrite_config(save_adapter(tmp_path), **{field: value})
    base = tiny_llama()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(DeltaConfigError, match=names_field):
        DeltaModel.from_pretrained(base, str(file.parent))
    assert_untouched(base, before, types)


# ---------------------------------------------------------------------- adapter_config.json
@pytest.mark.parametrize("content", ["{not json", "", "[1, 2, 3]", "\"LORA\"", "\xff\xfe"],
                         ids=["syntax", "empty", "list", "string", "binary"])
def test_malformed_config_file_names_the_file(content, tmp_path):
    file = save_adapter(tmp_path) / CONFIG_FILE
    file.write_bytes(content.encode("latin-1"))
    with pytest.raises(AdapterFileError, match=re.escape(str(file))):
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_missing_peft_type_is_an_error_naming_key_and_file(tmp_path):
    file = rewrite_config(save_adapter(tmp_path), drop=("peft_type",))
    with pytest.raises(DeltaConfigError, match="peft_type") as caught:
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert str(file) in str(caught.value)


def test_missing_target_modules_is_an_error_naming_the_key(tmp_path):
    rewrite_config(save_adapter(tmp_path), drop=("target_modules",))
    base = tiny_llama()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(DeltaConfigError, match="target_modules"):
        DeltaModel.from_pretrained(base, str(tmp_path))
    assert_untouched(base, before, types)


@pytest.mark.parametrize("peft_type", ["LORRA", "NOT_A_METHOD", ""])
def test_unknown_peft_type_is_an_error_naming_the_value(peft_type, tmp_path):
    file = rewrite_config(save_adapter(tmp_path), peft_type=peft_type)
    with pytest.raises(DeltaConfigError, match=rf"unknown peft_type '{peft_type}'") as caught:
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert str(file) in str(caught.value)


def test_missing_config_or_directory_names_the_path(tmp_path):
    with pytest.raises(AdapterFileError, match=re.escape(str(tmp_path / "nowhere"))):
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path / "nowhere"))
    save_adapter(tmp_path)
    (tmp_path / CONFIG_FILE).unlink()
    with pytest.raises(AdapterFileError, match=CONFIG_FILE):
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))


def test_unknown_config_keys_warn_and_are_ignored(tmp_path):
    directory = save_adapter(tmp_path)
    expected = logits(DeltaModel.from_pretrained(tiny_llama(), str(directory)), token_batch())
    rewrite_config(directory, future_option=3, another_knob="on", unset_option=None, empty_list=[])
    with pytest.warns(UserWarning, match="future_option") as record:
        loaded = DeltaModel.from_pretrained(tiny_llama(), str(directory))
    message = " ".join(str(w.message) for w in record)
    assert "another_knob" in message
    assert "unset_option" not in message and "empty_list" not in message  # default-valued: no noise
    assert torch.equal(logits(loaded, token_batch()), expected)


def test_config_written_by_peft_with_default_values_loads_without_warning(tmp_path):
    """peft writes every field it knows; those left at peft's defaults are not worth a warning."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    ours = [str(w.message) for w in record if Path(w.filename).is_relative_to(PACKAGE_DIR)]
    assert not ours, ours


# ---------------------------------------------------------------------- targeting
@pytest.mark.parametrize("build, targets, existing", [
    (tiny_llama, ["q_prj", "vproj"], "q_proj"),
    (tiny_llama, "model[.].*[.]attn[.]query", "q_proj"),
    (tiny_t5, ["query", "value"], "wo"),
    (tiny_convnet, ["conv3d"], "conv2d"),
])
def test_targets_that_match_nothing_name_the_patterns_and_real_modules(build, targets, existing):
    base = build()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(DeltaConfigError) as caught:
        get_peft_model(base, lora(target_modules=targets))
    message = str(caught.value)
    for pattern in [targets] if isinstance(targets, str) else targets:
        assert pattern in message
    assert existing in message
    assert_untouched(base, before, types)


def test_layers_to_transform_outside_the_model_matches_nothing():
    with pytest.raises(DeltaConfigError, match="layers_to_transform"):
        get_peft_model(tiny_llama(), lora(layers_to_transform=[7]))


@pytest.mark.parametrize("targets, module_type", [
    (["input_layernorm"], "LlamaRMSNorm"),
    (["self_attn"], "LlamaAttention"),
    (["q_proj", "act_fn"], "SiLU"),
])
def test_target_of_unsupported_type_names_module_and_type(targets, module_type):
    base = tiny_llama()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(DeltaConfigError, match=module_type) as caught:
        get_peft_model(base, lora(target_modules=targets))
    assert targets[-1] in str(caught.value)
    assert_untouched(base, before, types)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_grouped_convolution_is_refused_naming_the_module(init):
    """Refused before any target is touched, also when an earlier target's init rewrites its weight."""
    base = nn.Sequential(nn.Linear(4, 4), nn.Conv2d(4, 4, 3, groups=2)).eval()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(ValueError, match="groups=2") as caught:
        get_peft_model(base, lora(target_modules=["0", "1"], r=2, init_lora_weights=init))
    assert "'1'" in str(caught.value) or "1:" in str(caught.value)
    assert_untouched(base, before, types)


# ---------------------------------------------------------------------- adapter for a different base
@pytest.mark.parametrize("settings", [
    {},
    {"use_dora": True},
    {"init_lora_weights": "pissa"},  # PiSSA rewrites the base weights when it is set up
    {"init_lora_weights": "olora"},
], ids=["lora", "dora", "pissa", "olora"])
def test_adapter_for_different_base_names_module_and_shapes_and_leaves_model_unchanged(settings, tmp_path):
    save_adapter(tmp_path, **settings)
    base = wider_llama()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(AdapterFileError, match="shape mismatch") as caught:
        DeltaModel.from_pretrained(base, str(tmp_path))
    message = str(caught.value)
    assert "model.layers.0.self_attn.q_proj" in message
    assert "(4, 16)" in message and "(4, 32)" in message
    assert_untouched(base, before, types)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_failed_load_adapter_leaves_the_existing_adapters_as_they_were(init, tmp_path):
    save_adapter(tmp_path / "small", init_lora_weights=init)
    model = get_peft_model(wider_llama(), lora(target_modules=["k_proj"]))
    randomize(model)
    before, types, expected = snapshot(model), module_types(model), logits(model, token_batch())
    with pytest.raises(AdapterFileError, match="shape mismatch"):
        model.load_adapter(str(tmp_path / "small"), adapter_name="small")
    assert list(model.peft_config) == ["default"]
    assert_untouched(model, before, types)
    assert torch.equal(logits(model, token_batch()), expected)


def test_file_key_matching_no_module_is_an_error_naming_the_key(tmp_path):
    save_adapter(tmp_path)
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    stray = "base_model.model.model.layers.0.self_attn.z_proj.lora_A.weight"
    weights[stray] = torch.zeros(4, 16)
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    base = tiny_llama()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(AdapterFileError, match="z_proj"):
        DeltaModel.from_pretrained(base, str(tmp_path))
    assert_untouched(base, before, types)


def test_file_missing_a_tensor_the_config_implies_is_an_error_naming_the_key(tmp_path):
    save_adapter(tmp_path)
    weights = load_file(str(tmp_path / WEIGHTS_FILE))
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del weights[dropped]
    save_file(weights, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(AdapterFileError, match=dropped.replace(".", r"\.")):
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))


# ---------------------------------------------------------------------- weight files
def truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def huge_header(data: bytes) -> bytes:
    return (2**40).to_bytes(8, "little") + data[8:]


def garbage_header(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    return data[:8] + b"#" * length + data[8 + length:]


@pytest.mark.parametrize("corrupt", [truncate, huge_header, garbage_header, lambda data: b"",
                                     lambda data: b"not a safetensors file at all"],
                         ids=["truncated", "huge-header", "garbage-header", "empty", "text"])
def test_corrupted_safetensors_names_the_file(corrupt, tmp_path):
    file = save_adapter(tmp_path) / WEIGHTS_FILE
    file.write_bytes(corrupt(file.read_bytes()))
    base = tiny_llama()
    before, types = snapshot(base), module_types(base)
    with pytest.raises(AdapterFileError, match=re.escape(str(file))):
        DeltaModel.from_pretrained(base, str(tmp_path))
    assert_untouched(base, before, types)


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    """peft's safe_serialization=False writes adapter_model.bin (a pickle)."""
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    expected = logits(model, token_batch())
    model.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / PICKLE_FILE).is_file() and not (tmp_path / WEIGHTS_FILE).exists()

    with pytest.raises(AdapterFileError, match=rf"{PICKLE_FILE}.*allow_pickle=True"):
        DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    wrapped = get_peft_model(tiny_llama(), lora(target_modules=["k_proj"]))
    with pytest.raises(AdapterFileError, match=rf"{PICKLE_FILE}.*allow_pickle=True"):
        wrapped.load_adapter(str(tmp_path), adapter_name="pickled")
    assert list(wrapped.peft_config) == ["default"]

    loaded = DeltaModel.from_pretrained(tiny_llama(), str(tmp_path), allow_pickle=True)
    assert (logits(loaded, token_batch()) - expected).abs().max() <= 1e-5
    wrapped.load_adapter(str(tmp_path), adapter_name="pickled", allow_pickle=True)
    assert "pickled" in wrapped.peft_config


# ---------------------------------------------------------------------- merge
@pytest.mark.parametrize("bad_value, where, settings", [
    (float("nan"), "last", {}),
    (float("nan"), "first", {}),
    (float("inf"), "last", {}),
    (float("nan"), "last", {"use_dora": True}),
], ids=["nan-last-module", "nan-first-module", "inf-last-module", "nan-dora"])
def test_safe_merge_with_nonfinite_weights_raises_and_keeps_base_bitwise(bad_value, where, settings):
    model = get_peft_model(tiny_llama(), lora(target_modules=["q_proj", "v_proj", "down_proj"], **settings))
    randomize(model)
    factors = [p for n, p in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        factors[-1 if where == "last" else 0][0, 0] = bad_value
    before = snapshot(model)
    with pytest.raises(MergeError, match="default"):
        model.merge_adapter(safe_merge=True)
    after = model.state_dict()
    changed = [name for name in before if not bitwise_equal(before[name], after[name])]
    assert not changed, f"safe_merge changed {changed}"
    assert all(not layer.merged for _, layer in model.delta_layers() if hasattr(layer, "merged"))


# ---------------------------------------------------------------------- adapter names and directories
BAD_NAMES = ["a/b", "..", "../escape", "", "a\\b", "/abs"]


def _get_peft_model(name, tmp_path):
    get_peft_model(tiny_llama(), lora(), adapter_name=name)


def _add_adapter(name, tmp_path):
    model = get_peft_model(tiny_llama(), lora())
    try:
        model.add_adapter(name, lora(target_modules=["k_proj"]))
    finally:
        assert list(model.peft_config) == ["default"]


def _load_adapter(name, tmp_path):
    save_adapter(tmp_path / "adapter")
    model = get_peft_model(tiny_llama(), lora())
    try:
        model.load_adapter(str(tmp_path / "adapter"), adapter_name=name)
    finally:
        assert list(model.peft_config) == ["default"]


def _from_pretrained(name, tmp_path):
    save_adapter(tmp_path / "adapter")
    DeltaModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"), adapter_name=name)


@pytest.mark.parametrize("entry", [_get_peft_model, _add_adapter, _load_adapter, _from_pretrained],
                         ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("name", BAD_NAMES)
def test_unsafe_adapter_names_are_rejected(entry, name, tmp_path):
    with pytest.raises(DeltaConfigError, match="adapter name"):
        entry(name, tmp_path)


def test_saving_into_a_directory_leaves_other_files_untouched(tmp_path):
    others = {"README.md": b"# my run\n", "tokenizer.json": b"{}", "logs/metrics.jsonl": b"{\"loss\": 1}\n",
              "other/notes.txt": b"keep me"}
    for name, content in others.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    model = get_peft_model(tiny_llama(), lora())
    model.add_adapter("other", lora(target_modules=["k_proj"]))
    randomize(model)
    for _ in range(2):  # saving again over our own files is fine too
        model.save_pretrained(str(tmp_path))
    for name, content in others.items():
        assert (tmp_path / name).read_bytes() == content, name
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    ours = [CONFIG_FILE, WEIGHTS_FILE, f"other/{CONFIG_FILE}", f"other/{WEIGHTS_FILE}"]
    assert written == sorted([*others, *ours])
