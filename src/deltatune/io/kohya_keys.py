"""The one key map of the kohya / A1111 / LyCORIS files for image models (io/kohya_format.py reads and writes
them; io/lycoris_format.py and the LoRA rules there give the tensors' meaning).

On disk (safetensors, one flat dict):
    <prefix>_<module path with "." replaced by "_">.<tensor>
    prefix   lora_unet (the denoiser: UNet or DiT), lora_te (the one text encoder), or lora_te1 / lora_te2
             (SDXL-style pipelines with two text encoders)
    tensor   LoRA:  lora_down.weight (r, in[, kh, kw]), lora_up.weight (out, r[, 1, 1]), alpha () [, dora_scale]
             LoHa:  hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b [, hada_t1, hada_t2], alpha
             LoKr:  lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b [, lokr_t2], alpha
Runtime: the same module path in the live model, and our local tensor names (lora_A.weight ...).

Flattening loses the dots, so a file name cannot be split back into a path by rule
(`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`: which `_` were dots?). `module_table` builds
the flattened-name -> module-path table from the live model's named_modules(), and reading looks names up
there, never guesses. Text encoders: Transformers 5 dropped CLIPTextModel's `text_model.` level, which the
files of every other tool keep (`lora_te_text_model_encoder_layers_0_...`); a model whose
`base_model_prefix` names no submodule of its own is written under that prefix and read with or without it,
the rule Transformers applies to its own checkpoints (and diffusers to LoRA files, lora_base.py).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..core.targeting import canonical_name
from ..errors import DeltaConfigError

# component name (diffusers pipeline attribute) -> file prefix; `writing_prefixes` picks te vs te1
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
KEY = re.compile(r"^(lora_unet|lora_te[12]?)_([^.]+)\.(.+)$")

# our local tensor name <-> the file's, per method (LyCORIS kept PEFT's names for LoHa and LoKr)
LORA_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ALPHA = "alpha"
DORA_SCALE = "dora_scale"  # DoRA's magnitude, (out, 1[, 1, 1]) (kohya / LyCORIS wd_on_out); ours: lora_magnitude_vector


def method_of_tensor(name: str) -> str | None:
    """'LORA' / 'LOHA' / 'LOKR' for a file tensor name of that method, None for `alpha` / `dora_scale` (any
    method's) or unknown."""
    if name in LORA_NAMES.values():
        return "LORA"
    if name in LOHA_NAMES:
        return "LOHA"
    if name in LOKR_NAMES:
        return "LOKR"
    return None


def writing_prefixes(components: list[str]) -> dict[str, str]:
    """{component: file prefix} for the components being written; refuses names the format has no prefix for."""
    prefixes = {}
    for name in components:
        if name in DENOISERS:
            prefixes[name] = "lora_unet"
        elif name == "text_encoder":
            prefixes[name] = "lora_te1" if "text_encoder_2" in components else "lora_te"
        elif name == "text_encoder_2":
            prefixes[name] = "lora_te2"
        else:
            raise DeltaConfigError(f"component {name!r}: the kohya/LyCORIS format has prefixes for "
                                   f"{', '.join(DENOISERS + TEXT_ENCODERS)} only")
    if sum(name in DENOISERS for name in components) > 1:
        raise DeltaConfigError("both 'unet' and 'transformer' given: the format has one prefix (lora_unet) for "
                               "the denoiser")
    return prefixes


def component_of(prefix: str, components: list[str]) -> str | None:
    """The component (of those given) a file prefix belongs to, None when none was given for it."""
    if prefix == "lora_unet":
        return next((c for c in DENOISERS if c in components), None)
    wanted = "text_encoder_2" if prefix == "lora_te2" else "text_encoder"
    return wanted if wanted in components else None


def split_key(key: str) -> tuple[str, str, str]:
    """(prefix, flattened module name, tensor name) of a file key.

    Raises:
        DeltaConfigError: the key is not `<lora_unet|lora_te|lora_te1|lora_te2>_<name>.<tensor>`.
    """
    found = KEY.match(key)
    if not found:
        raise DeltaConfigError(f"tensor {key!r} is not a kohya/LyCORIS key (<lora_unet|lora_te|lora_te1|"
                               "lora_te2>_<module>.<tensor>)")
    return found.group(1), found.group(2), found.group(3)


def flat_name(path: str) -> str:
    return path.replace(".", "_")


def checkpoint_prefix(model: nn.Module) -> str:
    """The level Transformers' own checkpoints put before this model's module paths and its loader removes
    ('text_model' for a Transformers-5 CLIPTextModel: its PrefixChange rule in conversion_mapping.py), or ''
    (no such rule, an older Transformers, or not a Transformers model)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        return ""
    for rule in get_checkpoint_conversion_mapping(type(model).__name__) or []:
        removed = getattr(rule, "prefix_to_remove", None)
        if isinstance(rule, PrefixChange) and removed and not rule.model_prefix and not hasattr(model, removed):
            return removed
    return ""


def disk_path(model: nn.Module, path: str) -> str:
    """The module path as the files spell it (with the checkpoint prefix, see module docstring)."""
    prefix = checkpoint_prefix(model)
    return f"{prefix}.{path}" if prefix else path


def module_table(model: nn.Module) -> dict[str, str | None]:
    """{flattened name: module path} of every module of `model` that holds a weight (wrapped ones by their
    canonical path), also under the checkpoint prefix; None marks a flattened name two paths share
    (ambiguous: a key reaching it is refused)."""
    table: dict[str, str | None] = {}
    prefix = checkpoint_prefix(model)
    for path, module in model.named_modules():
        path = canonical_name(path).removesuffix(".base_layer")  # a wrapped module stands for its base
        if not path or not isinstance(getattr(module, "weight", None), torch.Tensor) or ".adapters." in f".{path}.":
            continue
        for flat in {flat_name(path), flat_name(f"{prefix}.{path}") if prefix else flat_name(path)}:
            if table.get(flat, path) != path:
                table[flat] = None
            else:
                table[flat] = path
    return table


def resolve(table: dict[str, str | None], flat: str, key: str, component: str) -> str:
    """The module path a file key's flattened name stands for.

    Raises:
        DeltaConfigError: no module of `component` has that name (naming the key and the nearest names), or
            two modules flatten to it.
    """
    if flat not in table:
        near = sorted(table, key=lambda name: -_common_prefix(name, flat))[:3]
        raise DeltaConfigError(f"tensor {key!r} matches no module of {component} (no module flattens to "
                               f"{flat!r}; nearest: {near})")
    path = table[flat]
    if path is None:
        raise DeltaConfigError(f"tensor {key!r}: several modules of {component} flatten to {flat!r}; the "
                               "kohya format cannot tell them apart")
    return path


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
