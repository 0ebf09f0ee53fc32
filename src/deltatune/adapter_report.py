"""`deltatune inspect`: what an adapter directory holds and which serving stacks can load it.

Reads only adapter_config.json and the safetensors header (no tensor data), so it is instant even for
large adapters. The serving rules are those of the engines' own loaders:
- vLLM: plain LoRA only (no DoRA, no full `modules_to_save` tensors, no trained biases), rank in
  {1, 8, 16, 32, 64, 128, 256, 320, 512}.
- SGLang: LoRA on the attention and MLP projections (q/k/v/o, gate/up/down, fused qkv/gate_up) only.
- llama.cpp (convert_lora_to_gguf.py): only lora_A/lora_B pairs; no full embedding or lm_head tensors.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import safe_open

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
SGLANG_MODULES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
}
LORA_PAIR = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.weight)?$")


@dataclass
class AdapterInfo:
    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    size_bytes: int
    modules: list[str] = field(default_factory=list)  # adapted module paths
    ranks: set[int] = field(default_factory=set)
    extra_keys: list[str] = field(default_factory=list)  # tensors that are not lora_A/lora_B

    @property
    def method(self) -> str:
        kind = str(self.config.get("peft_type", "?"))
        return f"{kind} (DoRA)" if kind == "LORA" and self.config.get("use_dora") else kind

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total


def read_adapter_info(directory: str | os.PathLike) -> AdapterInfo:
    """Parse an adapter directory's config and tensor header."""
    path = Path(directory)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (not an adapter directory)")
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    with safe_open(str(weights), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    info = AdapterInfo(path, config, shapes, weights.stat().st_size)
    modules = {}
    for key, shape in shapes.items():
        found = LORA_PAIR.match(key)
        if not found:
            info.extra_keys.append(key)
            continue
        modules[found.group(1)] = True
        if found.group(2) == "lora_A":
            info.ranks.add(shape[0])
    info.modules = sorted(modules)
    return info


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def serving_compatibility(info: AdapterInfo) -> dict[str, list[str]]:
    """For vLLM, SGLang and llama.cpp: the reasons it cannot load this adapter (empty: it can)."""
    lora = info.config.get("peft_type") == "LORA"
    dora = bool(info.config.get("use_dora")) or any("magnitude" in k for k in info.extra_keys)
    full = [k for k in info.extra_keys if "magnitude" not in k]
    saved = info.config.get("modules_to_save") or []
    reasons: dict[str, list[str]] = {"vLLM": [], "SGLang": [], "llama.cpp": []}
    if not lora:
        for name in reasons:
            reasons[name].append(f"{info.config.get('peft_type')} adapters are not supported (LoRA only)")
        return reasons
    if dora:
        for name in reasons:
            reasons[name].append("DoRA (lora_magnitude_vector) is not supported")
    if saved or full:
        what = f"modules_to_save={saved}" if saved else f"full tensors such as {full[0]}"
        reasons["vLLM"].append(f"{what}: vLLM loads only lora_A/lora_B")
        reasons["SGLang"].append(f"{what}: SGLang loads only lora_A/lora_B")
    if full:
        heads = [k for k in full if any(h in k for h in ("embed", "lm_head", "wte", "output"))]
        reasons["llama.cpp"].append(
            f"only lora_A/lora_B pairs convert; found full tensors {(heads or full)[:2]}"
        )
    odd = sorted(r for r in info.ranks if r not in VLLM_RANKS)
    if odd:
        reasons["vLLM"].append(f"rank {odd} is not one of {list(VLLM_RANKS)}")
    other = sorted({_leaf(m) for m in info.modules} - SGLANG_MODULES)
    if other:
        reasons["SGLang"].append(
            f"targets {other}; SGLang serves LoRA on q/k/v/o and gate/up/down projections"
        )
    if info.config.get("bias", "none") != "none":
        reasons["vLLM"].append(f"bias={info.config['bias']!r}: trained biases are not loaded")
    return reasons


def adapter_report(directory: str | os.PathLike) -> str:
    """A human-readable report on the adapter in `directory` (the output of `deltatune inspect`)."""
    info = read_adapter_info(directory)
    targets = sorted({_leaf(m) for m in info.modules})
    ranks = ", ".join(str(r) for r in sorted(info.ranks)) or "-"
    lines = [
        f"adapter:      {info.path}",
        f"method:       {info.method}",
        f"base model:   {info.config.get('base_model_name_or_path') or '?'}",
        f"rank:         {ranks} (lora_alpha {info.config.get('lora_alpha', '-')})",
        f"targets:      {', '.join(targets) or '-'} ({len(info.modules)} modules)",
        f"trainable:    {info.parameters:,d} parameters in {len(info.shapes)} tensors",
        f"file size:    {info.size_bytes / 2**20:.2f} MiB (adapter_model.safetensors)",
    ]
    if info.extra_keys:
        lines.append(f"other tensors: {len(info.extra_keys)} (e.g. {info.extra_keys[0]})")
    lines.append("serving:")
    for engine, why in serving_compatibility(info).items():
        lines.append(f"  {engine + ':':10s} " + ("yes" if not why else "no - " + "; ".join(why)))
    return "\n".join(lines)
