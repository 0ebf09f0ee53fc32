"""`deltatune inspect` on llama.cpp and Ollama (issue 19): Ollama's ADAPTER takes a GGUF adapter for any base
llama.cpp runs and the safetensors folder itself for Llama, Mistral and Gemma bases (docs/modelfile.md); the
verdicts say which route applies to the adapter's base, and refuse what neither route carries."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltatune.cli import main
from deltatune.io.serving import SOURCES
from test_inspect_rules import verdicts


def write_lora(directory: Path, base: str, **config) -> Path:
    directory.mkdir(parents=True)
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
                "base_model_name_or_path": base, **config}
    (directory / "adapter_config.json").write_text(json.dumps(settings))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {f"{key}.lora_A.weight": torch.randn(2, 16), f"{key}.lora_B.weight": torch.randn(16, 2)}
    if config.get("use_dora"):
        tensors[f"{key}.lora_magnitude_vector"] = torch.ones(16)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def model_folder(path: Path, architecture: str) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": [architecture]}))
    return path


def test_a_lora_on_the_embedded_llama_goes_to_ollama_as_it_is_and_to_llama_cpp_through_export(tmp_path, capsys):
    adapter = write_lora(tmp_path / "a", "HuggingFaceTB/SmolLM2-135M-Instruct")
    found = verdicts(adapter)
    assert found["Ollama"].loads and f"ADAPTER {adapter}" in found["Ollama"].detail
    assert "LlamaForCausalLM" in found["Ollama"].detail
    assert found["llama.cpp"].loads and "deltatune export --to gguf" in found["llama.cpp"].detail
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "Ollama:    yes" in out and f"rule: {SOURCES['Ollama']}" in out


def test_other_bases_reach_ollama_only_as_gguf(tmp_path):
    gpt2 = write_lora(tmp_path / "g", str(model_folder(tmp_path / "gpt2", "GPT2LMHeadModel")))
    found = verdicts(gpt2)
    assert found["Ollama"].loads and "ADAPTER FILE.gguf" in found["Ollama"].detail
    assert "a GPT2LMHeadModel base" in found["Ollama"].detail
    assert "convert_lora_to_gguf.py" in found["llama.cpp"].detail  # our exporter writes the Llama family
    unknown = verdicts(write_lora(tmp_path / "u", "someone/not-here"))["Ollama"]
    assert unknown.loads and "not known here" in unknown.detail
    mistral = write_lora(tmp_path / "m", str(model_folder(tmp_path / "mistral", "MistralForCausalLM")))
    assert "deltatune export --to gguf" in verdicts(mistral)["llama.cpp"].detail
    assert f"ADAPTER {mistral}" in verdicts(mistral)["Ollama"].detail


def test_ollama_refuses_what_llama_cpp_refuses(tmp_path):
    dora = verdicts(write_lora(tmp_path / "d", "smollm2-135m", use_dora=True))
    assert not dora["Ollama"].loads and dora["Ollama"].reasons == dora["llama.cpp"].reasons
    assert any("DoRA" in reason for reason in dora["Ollama"].reasons)
