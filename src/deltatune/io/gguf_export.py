"""GGUF files for llama.cpp and Ollama: a LoRA adapter as a GGUF LoRA adapter, and a merged model as a GGUF
model, written with the `gguf` package (the writer llama.cpp's own converters use).

The conventions are llama.cpp's convert_lora_to_gguf.py (read at ggml-org/llama.cpp master, 2025):
- metadata: general.architecture = the base's llama.cpp architecture ("llama"), general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha (float32). llama.cpp scales each pair by alpha / rank, the rank
  read from the tensor's shape (llama-adapter.cpp), so a module whose own scaling differs from
  lora_alpha / r (rank_pattern, alpha_pattern, rsLoRA) has the difference folded into its lora_b;
- tensors: "<GGUF base tensor name>.lora_a" = lora_A (r, in) and ".lora_b" = lora_B (out, r), both in
  PEFT's row-major layout (GGUF lists dimensions reversed: ggml sees lora_a as ne = [in, r]);
- the Llama family's q/k projections are stored with their rows permuted per head
  (convert_hf_to_gguf.py LlamaModel.permute, for llama.cpp's RoPE layout), so lora_b of q_proj / k_proj gets
  the same row permutation; Transformers undoes it when it reads a GGUF model (the embedded default).

KEY MAP: the HF module path -> GGUF tensor name is gguf's own TensorNameMap for the architecture (the table
convert_hf_to_gguf.py uses), plus the q/k permutation above; `gguf_name` is the one place that applies it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..core.config import DeltaConfigError
from ..core.layer import DeltaLayer
from ..core.protocols import LowRank, declares
from .atomic import atomic_write

# Transformers model_type -> llama.cpp architecture, for the models whose GGUF layout is llama.cpp's LLAMA
# (convert_hf_to_gguf.py: LlamaModel serves LlamaForCausalLM and MistralForCausalLM).
LLAMA_FAMILY = {"llama": "llama", "mistral": "llama"}
OUTTYPES = ("f32", "f16")
# rows permuted per head (convert_hf_to_gguf.py LlamaModel.modify_tensors): projection -> heads config field
PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError:
        raise ModuleNotFoundError("writing GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def architecture(config) -> str:
    """The llama.cpp architecture name of a Transformers config.

    Raises:
        DeltaConfigError: a model type outside the Llama family (named, with the supported ones).
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise DeltaConfigError(
            f"base model type {model_type!r}: GGUF export writes the Llama family ({sorted(LLAMA_FAMILY)}); "
            "for other architectures use llama.cpp's convert_lora_to_gguf.py")
    return LLAMA_FAMILY[model_type]


def gguf_name(module_path: str, config) -> tuple[str, int | None]:
    """THE key map: a module path in the Transformers model ("model.layers.3.self_attn.q_proj") -> (its GGUF
    tensor base name "blk.3.attn_q", the head count its rows are permuted by, or None).

    Raises:
        DeltaConfigError: a module llama.cpp has no tensor for.
    """
    gguf = _gguf()
    arch = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}[architecture(config)]
    table = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    name = table.get_name(module_path)
    if name is None:
        raise DeltaConfigError(f"module {module_path!r} has no tensor in llama.cpp's {architecture(config)} "
                               "layout (gguf TensorNameMap)")
    field = PERMUTED.get(name.rsplit(".", 1)[-1])
    heads = None
    if field:
        heads = getattr(config, field, None) or config.num_attention_heads
    return name, heads


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's per-head row order for q/k (convert_hf_to_gguf.py LlamaModel.permute): within each head,
    the two rotary halves are interleaved. weight: (heads * head_dim, ...) -> the same shape."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2)
            .reshape(weight.shape))


def _numpy(tensor: torch.Tensor, outtype: str):
    return tensor.detach().to(torch.float16 if outtype == "f16" else torch.float32).contiguous().numpy()


def lora_pairs(model: nn.Module, adapter_name: str, config) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(GGUF base name, lora_a (r, in), lora_b (out, r)) per adapted layer, with each layer's scaling folded
    into lora_b relative to lora_alpha / r (what llama.cpp applies), and q/k rows in llama.cpp's order.

    Raises:
        DeltaConfigError: the adapter is not a plain LoRA on linear layers (DoRA, another method, an
            embedding or Conv1D target): convert it first (compose/extract.py); a pair on an output head
            the base ties to its embeddings.
    """
    lora = model.peft_config[adapter_name]
    alpha = float(getattr(lora, "lora_alpha", 0) or 0)
    for path, layer in model.delta_layers():
        if not isinstance(layer, DeltaLayer) or adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        found = adapter.factors() if declares(adapter, LowRank) else None
        if found is None or layer.base.kind != "linear" or layer.base.fan_in_fan_out:
            raise DeltaConfigError(
                f"{path}: a GGUF LoRA adapter holds plain LoRA pairs on linear layers; adapter "
                f"{adapter_name!r} ({type(adapter).__name__}, {layer.base.kind}) is not one")
        a, b, scaling = found
        rank = a.shape[0]
        b = b.detach().float() * (scaling * rank / alpha if alpha else scaling)
        name, heads = gguf_name(path, config)
        if name == "output" and getattr(config, "tie_word_embeddings", False):
            # convert_lora_to_gguf.py: "lm_head is present in adapter, but is ignored in base model"
            raise DeltaConfigError(f"{path}: the base ties its output head to token_embd, so its GGUF has no "
                                   "output tensor for this LoRA pair to apply to")
        if heads:
            b = permute_rows(b, heads)
        yield name, a.detach().float(), b


def write_lora_gguf(model: nn.Module, adapter_name: str, out: str | os.PathLike, outtype: str = "f32") -> Path:
    """Write adapter `adapter_name` of DeltaModel `model` (a plain LoRA) as a llama.cpp GGUF LoRA adapter.

    Args:
        model: a DeltaModel whose base is a Llama-family Transformers model.
        adapter_name: the LoRA adapter to write.
        out: the .gguf file to write (replaced atomically when it exists).
        outtype: "f32" or "f16" tensors.

    Returns:
        `out`. llama.cpp loads it with `--lora FILE` (llama-cpp-python: `Llama(lora_path=FILE)`), Ollama
        with `ADAPTER FILE` in a Modelfile.

    Raises:
        DeltaConfigError: see `lora_pairs`, `architecture`; an unknown outtype.
    """
    if outtype not in OUTTYPES:
        raise DeltaConfigError(f"outtype={outtype!r}: must be one of {OUTTYPES}")
    gguf = _gguf()
    config = model.model.config
    arch = architecture(config)
    pairs = list(lora_pairs(model, adapter_name, config))  # every refusal before the file is opened
    if not pairs:
        raise DeltaConfigError(f"adapter {adapter_name!r} adapts no layer; nothing to write")
    alpha = float(getattr(model.peft_config[adapter_name], "lora_alpha", 0) or 0)

    def fill(writer) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"deltatune LoRA adapter {adapter_name}")
        for name, a, b in pairs:
            writer.add_tensor(f"{name}.weight.lora_a", _numpy(a, outtype))
            writer.add_tensor(f"{name}.weight.lora_b", _numpy(b, outtype))

    return _write(out, arch, fill)


def base_metadata_fields(base_gguf: str | os.PathLike) -> list:
    """The key/value fields of a base GGUF model other than the file's own bookkeeping (GGUF.*,
    general.architecture, general.file_type, general.quantization_version), which the writer sets."""
    gguf = _gguf()
    reader = gguf.GGUFReader(str(base_gguf))
    own = {"general.architecture", "general.file_type", "general.quantization_version"}
    return [f for key, f in reader.fields.items() if not key.startswith("GGUF.") and key not in own]


def write_merged_gguf(merged: nn.Module, base_gguf: str | os.PathLike, out: str | os.PathLike,
                      outtype: str = "f16") -> Path:
    """Write a merged Llama-family Transformers model as a GGUF model, with the tokenizer and hyper-parameter
    metadata of the GGUF model it came from (`base_gguf`, e.g. the embedded SmolLM2) and its weights in
    `outtype` (norms stay float32, as llama.cpp's converter keeps 1-D tensors).

    Raises:
        DeltaConfigError: see `architecture`, `gguf_name`; a base GGUF of another architecture or a
            tensor list that does not match it (a merged model of another base).
    """
    if outtype not in OUTTYPES:
        raise DeltaConfigError(f"outtype={outtype!r}: must be one of {OUTTYPES}")
    gguf = _gguf()
    config = merged.config
    arch = architecture(config)
    reader = gguf.GGUFReader(str(base_gguf))
    base_arch = reader.fields["general.architecture"].contents()
    if base_arch != arch:
        raise DeltaConfigError(f"base GGUF {base_gguf}: architecture {base_arch!r}, the model is {arch!r}")
    expected = {t.name for t in reader.tensors}
    tensors = {}
    for key, value in merged.state_dict().items():
        module, _, kind = key.rpartition(".")
        if key == "lm_head.weight" and getattr(config, "tie_word_embeddings", False):
            continue  # tied to token_embd (llama.cpp reads the output head from it)
        name, heads = gguf_name(module, config)
        value = value.detach().float()
        tensors[f"{name}.{kind}"] = permute_rows(value, heads) if heads else value
    if set(tensors) != expected:
        diff = sorted(set(tensors) ^ expected)[:4]
        raise DeltaConfigError(f"base GGUF {base_gguf}: its tensors differ from the merged model's, e.g. {diff}")
    file_type = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32
    fields = base_metadata_fields(base_gguf)

    def fill(writer) -> None:
        for field in fields:
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
        writer.add_file_type(file_type)
        for name, value in tensors.items():
            writer.add_tensor(name, _numpy(value, outtype if value.dim() > 1 else "f32"))

    return _write(out, arch, fill)


def _write(out: str | os.PathLike, arch: str, fill) -> Path:
    """Write a GGUF file through `fill(writer)` (io/atomic.py: a temporary file renamed into place)."""
    gguf = _gguf()

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return Path(out)
