"""`deltatune export --to gguf` on tiny models: the key map, the metadata llama.cpp reads, and the update the
file carries, read back with gguf.GGUFReader and checked against the adapter's own delta_weight, with the
q/k rows put back by Transformers' own GGUF reader (its reverse of llama.cpp's permutation)."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

import deltatune as dt
from deltatune.cli import main
from deltatune.core.config import DeltaConfigError
from deltatune.io.adapter_files import AdapterFileError
from deltatune.io.gguf_export import gguf_name, write_lora_gguf
from helpers_train import make_tiny_model_dir

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("base") / "model")  # heads 4, kv heads 2, hidden 32


def fields(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(str(path))
    values = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return values, {t.name: t for t in reader.tensors}


def trained_lora(model_dir, **settings):
    torch.manual_seed(1)
    config = dt.LoraConfig(target_modules=TARGETS, base_model_name_or_path=str(model_dir), **settings)
    model = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero: give the update something to carry
    return model


def test_key_map_names_llama_cpp_tensors_and_permuted_heads(model_dir):
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    assert gguf_name("model.layers.1.self_attn.q_proj", config) == ("blk.1.attn_q", 4)
    assert gguf_name("model.layers.0.self_attn.k_proj", config) == ("blk.0.attn_k", 2)  # kv heads
    assert gguf_name("model.layers.0.self_attn.v_proj", config) == ("blk.0.attn_v", None)
    assert gguf_name("model.layers.0.self_attn.o_proj", config) == ("blk.0.attn_output", None)
    assert gguf_name("model.layers.1.mlp.down_proj", config) == ("blk.1.ffn_down", None)
    assert gguf_name("model.embed_tokens", config) == ("token_embd", None)
    with pytest.raises(DeltaConfigError, match="model.layers.0.self_attn.rotary"):
        gguf_name("model.layers.0.self_attn.rotary", config)
    with pytest.raises(DeltaConfigError, match="'gpt2'"):
        gguf_name("transformer.h.0.attn.c_attn", GPT2Config(n_layer=1))


@pytest.mark.parametrize("settings", [
    {"r": 4, "lora_alpha": 8},
    # per-module rank and alpha, and rsLoRA: llama.cpp applies alpha / rank, the rest is folded into lora_b
    {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
    {"r": 4, "lora_alpha": 8, "use_rslora": True},
])
def test_written_adapter_carries_the_exact_update(model_dir, tmp_path, settings):
    model = trained_lora(model_dir, **settings)
    out = write_lora_gguf(model, "default", tmp_path / "a.gguf")
    values, tensors = fields(out)
    assert values["general.architecture"] == "llama" and values["general.type"] == "adapter"
    assert values["adapter.type"] == "lora" and values["adapter.lora.alpha"] == 8.0
    reverse = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    layers = dict(model.delta_layers())
    assert len(tensors) == 2 * len(layers) == 2 * 2 * len(TARGETS)
    for path, layer in layers.items():
        name, _ = gguf_name(path, model.model.config)
        a, b = tensors[f"{name}.weight.lora_a"], tensors[f"{name}.weight.lora_b"]
        rank, fan_in, fan_out = a.data.shape[0], layer.base.module.in_features, layer.base.module.out_features
        # ggml's order (ne): lora_a [in, r], lora_b [r, out], as llama-adapter.cpp checks against the base
        assert list(a.shape) == [fan_in, rank] and list(b.shape) == [rank, fan_out]
        delta = 8.0 / rank * (np.asarray(b.data) @ np.asarray(a.data))
        delta = reverse.process(delta, f"{name}.weight").weights  # q/k rows back to Transformers' order
        expected = layer.adapters["default"].delta_weight(layer.base).detach().numpy()
        np.testing.assert_allclose(delta, expected, rtol=1e-5, atol=1e-6)


def test_export_cli_converts_a_low_rank_loha_and_reports_the_error(model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    config = dt.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"], init_weights=False,
                           base_model_name_or_path=str(model_dir))
    loha = dt.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config).eval()
    loha.save_pretrained(tmp_path / "loha")
    assert main(["export", "--to", "gguf", "--adapter", str(tmp_path / "loha"), "--out",
                 str(tmp_path / "loha.gguf"), "--rank", "4"]) == 0
    printed = capsys.readouterr().out
    # a LoHa update of rank r*r = 4 fits a rank-4 LoRA: the reported error is float noise
    error = float(printed.split("relative Frobenius error ")[1].split()[0])
    assert error < 1e-3 and "GGUF LoRA adapter written to" in printed
    _, tensors = fields(tmp_path / "loha.gguf")
    reverse = LlamaTensorProcessor({"num_attention_heads": 4, "num_key_value_heads": 2})
    for path, layer in loha.delta_layers():
        name, _ = gguf_name(path, loha.model.config)
        a, b = (np.asarray(tensors[f"{name}.weight.lora_{h}"].data) for h in "ab")
        delta = reverse.process(4 / 4 * (b @ a), f"{name}.weight").weights  # alpha = r = 4 after the SVD
        expected = layer.adapters["default"].delta_weight(layer.base).detach().numpy()
        np.testing.assert_allclose(delta, expected, atol=1e-4 * np.abs(expected).max())


def test_export_refuses_before_loading_what_llama_cpp_cannot_take(model_dir, tmp_path, capsys):
    plain = trained_lora(model_dir, r=2, lora_alpha=2)
    plain.save_pretrained(tmp_path / "plain")
    saved = tmp_path / "saved"  # the same LoRA with a full lm_head (modules_to_save), which llama.cpp refuses
    shutil.copytree(tmp_path / "plain", saved)
    tensors = load_file(saved / "adapter_model.safetensors")
    save_file({**tensors, "base_model.model.lm_head.weight": torch.zeros(260, 32)},
              str(saved / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match="llama.cpp cannot load it: .*lm_head"):
        from deltatune.train.commands.export import export_gguf
        export_gguf(tmp_path / "saved", tmp_path / "x.gguf")
    assert main(["export", "--to", "gguf", "--adapter", str(tmp_path / "plain"), "--out", str(tmp_path / "y.gguf"),
                 "--rank", "8"]) == 2
    assert "--rank 8" in capsys.readouterr().err and not (tmp_path / "y.gguf").exists()
    assert main(["export", "--to", "gguf", "--adapter", str(tmp_path / "plain"), "--out", str(tmp_path / "y.gguf"),
                 "--merged", str(tmp_path / "m.gguf")]) == 2
    assert "--base-gguf" in capsys.readouterr().err and not (tmp_path / "y.gguf").exists()


def test_a_pair_on_a_tied_output_head_is_refused(model_dir, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.config.tie_word_embeddings = True  # as SmolLM2's: its GGUF has no output tensor
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(DeltaConfigError, match="lm_head: the base ties its output head"):
        write_lora_gguf(model, "default", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()
