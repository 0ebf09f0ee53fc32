"""Parameter counts for the conformance table, worked out by hand from the base model's shapes.

`expected_trainable` applies each method's formula (paper and peft layout) to the shapes of the base
modules the adapter wraps; methods without a formula here are counted from the adapter modules' own
tensors, which still catches a report that counts base or frozen tensors as trainable."""

from __future__ import annotations

import math
import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.core.layer import DeltaLayer

# IA3's default feed-forward modules (peft's table): they scale the input, the others the output
IA3_FEEDFORWARD = {"llama": ("down_proj",), "gpt2": ("mlp.c_proj",), "bert": ("output.dense",), "t5": ("wi",)}
HEADS = {"bert": "classifier"}  # SEQ_CLS: the head trains in full (modules_to_save)


def dims(module: nn.Module) -> tuple[int, int]:
    """(fan-in, fan-out) of a linear-like module: a conv's fan-in is in_channels x kernel / groups."""
    if isinstance(module, Conv1D):  # weight stored (in, out)
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels * math.prod(module.kernel_size) // module.groups, module.out_channels
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"no formula for a {type(module).__name__}")


def hidden_size(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or config.d_model


def nearest_divisor(number: int, wanted: int) -> int:
    """OFT's block size when `wanted` does not divide the fan-in: the closest divisor (smaller on a tie)."""
    return min((d for d in range(1, number + 1) if number % d == 0), key=lambda d: (abs(d - wanted), d))


def per_layer(peft_type: str, settings: dict, family: str, name: str, module: nn.Module,
              hidden: int | None) -> int:
    """Trainable numbers one adapter adds at the module called `name` of a model `hidden` wide."""
    if peft_type in ("LORA", "RELORA", "ADALORA", "ULORA"):
        fan_in, fan_out = dims(module)
        r = settings.get("init_r", settings.get("r"))
        count = r * (fan_in + fan_out)  # A (r, in), B (out, r)
        count += fan_out if settings.get("use_dora") else 0  # magnitude (out,)
        count += r if peft_type == "ADALORA" else 0  # E (r, 1)
        return count + (settings["num_tasks"] * r if peft_type == "ULORA" else 0)  # task vectors (tasks, r)
    if peft_type == "LOHA":
        fan_in, fan_out = dims(module)
        r, kernel = settings["r"], math.prod(getattr(module, "kernel_size", (1,)))
        if settings.get("use_effective_conv2d") and kernel > 1:  # core (r, r, k..) + (r, out) + (r, in)
            return 2 * (r * r * kernel + r * fan_out + r * module.in_channels)
        return 2 * r * (fan_in + fan_out)  # two Hadamard factors, each (out, r) and (r, in)
    if peft_type == "VERA":
        return settings["r"] + dims(module)[1]  # lambda_d (r,), lambda_b (out,)
    if peft_type == "IA3":
        fan_in, fan_out = dims(module)
        feedforward = settings.get("feedforward_modules", IA3_FEEDFORWARD[family])
        if isinstance(feedforward, str):  # a regex matches the whole module name (peft's rule)
            return fan_in if re.fullmatch(feedforward, name) else fan_out
        return fan_in if any(name == f or name.endswith("." + f) for f in feedforward) else fan_out
    if peft_type == "BITFIT":
        if isinstance(module, (nn.LayerNorm,)):
            return module.weight.numel()
        return dims(module)[1]  # one bias entry per output
    if peft_type == "LN_TUNING":
        return sum(p.numel() for p in module.parameters())  # a trainable copy of the norm
    if peft_type == "CHILD_TUNING":
        return module.weight.numel()  # a dense delta over W
    if peft_type == "OFT":
        fan_in = dims(module)[0]
        block = nearest_divisor(fan_in, settings["oft_block_size"])
        blocks = 1 if settings.get("block_share") else fan_in // block
        return blocks * block * (block - 1) // 2  # one upper triangle per block (one in all when shared)
    if peft_type == "BOTTLENECK":  # beside (parallel: reads the block's input) or after the block
        linears = [m for m in module.modules() if isinstance(m, (nn.Linear, Conv1D))]
        width_in, width_out = dims(linears[0])[0], dims(linears[-1])[1]
        size = settings["bottleneck_size"]
        down_in = width_in if settings["bottleneck_type"] == "parallel" else width_out
        return down_in * size + size + size * width_out + width_out  # down (size, in) + b, up (out, size) + b
    if peft_type == "BOTTLENECK_FUSION":
        return 3 * hidden ** 2 + 2 * hidden  # query, key, value: (d, d) each; biases on query and key only
    raise KeyError(peft_type)


FORMULAS = {"LORA", "RELORA", "ADALORA", "ULORA", "LOHA", "VERA", "IA3", "BITFIT", "LN_TUNING",
            "CHILD_TUNING", "OFT", "BOTTLENECK", "BOTTLENECK_FUSION"}


def expected_trainable(row, family: str, base: nn.Module, wrapped, adapter: str = "default") -> int:
    """Trainable numbers of `row` (its adapter `adapter`) on the float `base`, by hand where a formula is
    written here, else from the adapter's own modules."""
    settings = row.config_kwargs(family)
    # SEQ_CLS trains the head in full; a fusion trains only its fusion layers (the fused adapters own heads)
    trains_head = family in HEADS and row.peft_type != "BOTTLENECK_FUSION"
    head = base.get_submodule(HEADS[family]) if trains_head else None
    count = sum(p.numel() for p in head.parameters()) if head is not None else 0
    if row.peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT"):
        return count + model_level(row.peft_type, settings, family, base)
    if row.peft_type in FORMULAS:
        names = [n for n, m in wrapped.delta_layers() if isinstance(m, DeltaLayer) and adapter in m.adapters]
        width = hidden_size(base) if row.peft_type.startswith("BOTTLENECK") else None  # bottlenecks, fusions
        count += sum(per_layer(row.peft_type, settings, family, n, base.get_submodule(n), width)
                     for n in names)
        if settings.get("bias") == "all":  # every base bias but the head's (its trained copy has its own)
            count += sum(p.numel() for n, p in base.named_parameters()
                         if n.endswith("bias") and not n.startswith(HEADS.get(family, "-") + "."))
        return count
    return sum(p.numel() for name, p in adapter_tensors(wrapped, adapter)  # heads' copies included
               if not name.startswith("experts."))  # X-LoRA's LoRA experts stay frozen


def model_level(peft_type: str, settings: dict, family: str, base: nn.Module) -> int:
    """Soft prompts: virtual-token tables (and their encoder), per-layer prefixes, LLaMA-Adapter prompts."""
    tokens, width = settings.get("num_virtual_tokens"), hidden_size(base)
    if peft_type == "PROMPT_TUNING":
        return tokens * (2 if family == "t5" else 1) * width  # encoder and decoder prompts for seq2seq
    if peft_type == "P_TUNING":  # embedding (n, d) + MLP d -> h -> h -> d with biases
        inner = settings["encoder_hidden_size"]
        return tokens * width + width * inner + inner + inner * inner + inner + inner * width + width
    layers = base.config.num_hidden_layers
    if peft_type == "PREFIX_TUNING":
        return tokens * layers * 2 * width  # a key and a value prefix per layer
    return settings["adapter_layers"] * (settings["adapter_len"] * width + 1)  # prompt (len, d) + gate


def adapter_tensors(wrapped, adapter: str) -> list[tuple[str, object]]:
    """(local name, tensor) for every parameter adapter `adapter` owns: its modules in DeltaLayers, its
    copies of trained heads, and its model-level module (buffers are not parameters: they never train)."""
    out = []
    for _, layer in wrapped.delta_layers():
        owned = layer.adapters if isinstance(layer, DeltaLayer) else layer.copies
        if adapter in owned:
            out += list(owned[adapter].named_parameters())
    if adapter in wrapped.model_adapters:
        out += list(wrapped.model_adapters[adapter].named_parameters())
    return out
