"""Hotswap: replace an adapter's weights in place, without re-wrapping the model.

Every tensor is copied into the live parameter (`param.copy_`), so parameter identities, shapes, dtypes
and Python attributes stay as they were and a `torch.compile`d model keeps its compiled graphs. Two
things would otherwise change between adapters, and both are absorbed into the copied values:

- rank: `prepare_model_for_hotswap(model, target_rank=R)` (before compiling) zero-pads every LoRA to
  rank R, which leaves its output unchanged (A gets zero rows, B zero columns); a swapped-in LoRA of
  rank r <= R fills the first r rows/columns and zeros the rest.
- scaling: the live adapter keeps its Python float `scaling` s (changing it would be a new constant for
  the compiler); a new LoRA with scaling s' is stored as B * s' / s, which gives the same update s' B A.

The same padding and scale folding let saved files stay consistent: after `prepare_model_for_hotswap`
the adapter's config says r = R with alphas that give the live scalings.

Rank padding and scale folding are LoRA's (as in `peft`, whose hotswap is LoRA's too): they work on
`LoraAdapter`'s own factor modules and `LoraConfig`'s fields, named by type; every other adapter's tensors
are copied as they are, shape for shape.
"""

from __future__ import annotations

import math
import os
import re

import torch
from torch import nn

from ..core.config import DeltaConfig, DeltaConfigError
from ..core.layer import DeltaLayer
from ..core.targeting import pattern_value
from ..io.adapter_files import read_adapter
from ..io.keymap import DISK_PREFIX, adapter_slots
from ..methods.lora import LoraAdapter, LoraConfig

FACTOR_NAMES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def _lora_layers(model, adapter_name: str) -> dict[str, LoraAdapter]:
    return {path: layer.adapters[adapter_name] for path, layer in model.delta_layers()
            if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters
            and isinstance(layer.adapters[adapter_name], LoraAdapter)}


def _check_unmerged(model, adapter_name: str) -> None:
    for path, layer in model.delta_layers():
        if isinstance(layer, DeltaLayer) and adapter_name in layer.merged:
            raise RuntimeError(f"adapter {adapter_name!r} is merged into {path}; call unmerge_adapter() "
                               "first (swapping merged weights would corrupt the base)")


@torch.no_grad()
def prepare_model_for_hotswap(model, target_rank: int, adapter_names: list[str] | None = None) -> None:
    """Zero-pad LoRA adapters to rank `target_rank` so any LoRA up to that rank can be swapped in.

    Call it before `torch.compile`: it creates new (larger) parameters. Outputs do not change.

    Args:
        model: a DeltaModel.
        target_rank: the largest rank that will be swapped in.
        adapter_names: the LoRA adapters to pad (default: every LoRA adapter).
    """
    names = list(adapter_names or [n for n, c in model.peft_config.items() if isinstance(c, LoraConfig)])
    for name in names:
        if not isinstance(model.peft_config.get(name), LoraConfig):
            raise DeltaConfigError(f"adapter {name!r} is not a LoRA adapter of this model")
        _check_unmerged(model, name)
        layers = _lora_layers(model, name)
        too_big = {p: a.r for p, a in layers.items() if a.r > target_rank}
        if not isinstance(target_rank, int) or target_rank <= 0 or too_big:
            raise DeltaConfigError(f"target_rank={target_rank!r}: must be a positive integer >= every rank "
                                   f"of adapter {name!r} (larger: {too_big})")
        for adapter in layers.values():
            _pad(adapter, target_rank)
        _record_scalings(model.peft_config[name], layers, target_rank)


def _pad(adapter, rank: int) -> None:
    extra = rank - adapter.r
    if extra == 0:
        return
    a, b = adapter.A, adapter.B  # (r, in, ...), (out, r, ...)
    new_a = torch.cat([a, a.new_zeros((extra, *a.shape[1:]))], dim=0)
    new_b = torch.cat([b, b.new_zeros((b.shape[0], extra, *b.shape[2:]))], dim=1)
    if adapter.kind == "embedding":
        adapter.lora_embedding_A = torch.nn.Parameter(new_a, requires_grad=a.requires_grad)
        adapter.lora_embedding_B = torch.nn.Parameter(new_b, requires_grad=b.requires_grad)
    else:
        adapter.lora_A.weight = torch.nn.Parameter(new_a, requires_grad=a.requires_grad)
        adapter.lora_B.weight = torch.nn.Parameter(new_b, requires_grad=b.requires_grad)
        if isinstance(adapter.lora_A, nn.Linear):  # keep the modules' recorded widths true (repr, checks)
            adapter.lora_A.out_features = adapter.lora_B.in_features = rank
        else:  # nn.ConvNd
            adapter.lora_A.out_channels = adapter.lora_B.in_channels = rank
    adapter.r = rank


def _record_scalings(config: DeltaConfig, layers: dict, rank: int) -> None:
    """Make the config describe the padded adapter: r = rank, alphas that reproduce each live scaling."""
    def alpha_for(scaling: float) -> float:
        return scaling * (math.sqrt(rank) if config.use_rslora else rank)

    alphas = {path: alpha_for(adapter.scaling) for path, adapter in layers.items()}
    common = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else config.lora_alpha
    config.r, config.rank_pattern, config.lora_alpha = rank, {}, common
    config.alpha_pattern = {re.escape(p): a for p, a in alphas.items() if a != common}


def _new_scaling(config: DeltaConfig | None, path: str, live) -> float:
    if config is None:
        return live.scaling
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


@torch.no_grad()
def hotswap_adapter(model, path_or_weights: str | os.PathLike | dict[str, torch.Tensor],
                    adapter_name: str = "default", config: DeltaConfig | None = None,
                    allow_pickle: bool = False) -> None:
    """Replace adapter `adapter_name`'s weights in place with another adapter's.

    Args:
        model: a DeltaModel (possibly wrapped by torch.compile: pass the original module or the compiled
            one, both work since the weights are shared).
        path_or_weights: a saved adapter directory, or its tensors under disk keys
            (`base_model.model.<module>.lora_A.weight`, ...).
        adapter_name: the live adapter to overwrite.
        config: with a dict of tensors, the new adapter's config (for its scalings); without one the
            live scalings are kept.
        allow_pickle: accept a pickled adapter_model.bin.

    Raises:
        DeltaConfigError: the new adapter is another method, targets other layers, has a larger rank
            than the live one (see prepare_model_for_hotswap) or other shapes. Nothing is changed then.
    """
    model = getattr(model, "_orig_mod", model)
    if adapter_name not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter_name!r}; adapters: {list(model.peft_config)}")
    if isinstance(path_or_weights, dict):
        weights, source = path_or_weights, "weights"
    else:
        config, weights = read_adapter(path_or_weights, allow_pickle=allow_pickle)
        source = str(path_or_weights)
    live_config = model.peft_config[adapter_name]
    _check_unmerged(model, adapter_name)
    if config is not None:
        if config.peft_type != live_config.peft_type:
            raise DeltaConfigError(f"{source}: a {config.peft_type} adapter cannot replace "
                                   f"{live_config.peft_type} adapter {adapter_name!r}")
        if isinstance(live_config, LoraConfig) and config.use_dora != live_config.use_dora:
            raise DeltaConfigError(f"{source}: use_dora={config.use_dora} differs from "
                                   "the live adapter's; DoRA and LoRA cannot be swapped for each other")
    plan = _plan(model, adapter_name, weights, config, source)
    for slot, value in plan:
        slot.copy_(value)


def _plan(model, adapter_name, weights, config, source) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live tensor, new value of the same shape) for every slot; every check happens here."""
    slots = adapter_slots(model, adapter_name)
    unexpected = [k for k in weights if k not in slots]
    if unexpected:
        raise DeltaConfigError(f"{source}: {len(unexpected)} tensor(s) match no slot of adapter "
                               f"{adapter_name!r}, e.g. {unexpected[:3]}; a hotswapped adapter must target "
                               "the same layers")
    loras = _lora_layers(model, adapter_name)
    plan = []
    for key, slot in slots.items():
        path, _, local = key.removeprefix(DISK_PREFIX).rpartition(".")
        if local == "weight" and path.endswith(("lora_A", "lora_B")):
            path, local = path.rpartition(".")[0], path.rpartition(".")[2] + ".weight"
        live = loras.get(path)
        if live is not None and local in FACTOR_NAMES:
            plan.append((slot, _factor_value(key, slot, weights, live, local, path, config, source)))
            continue
        if key not in weights:
            raise DeltaConfigError(f"{source}: missing tensor {key} of adapter {adapter_name!r}")
        value = weights[key]
        if tuple(value.shape) != tuple(slot.shape):
            raise DeltaConfigError(f"{source}: shape mismatch for {key}: {tuple(value.shape)} vs live "
                                   f"{tuple(slot.shape)}")
        plan.append((slot, value.to(slot.device, slot.dtype)))
    return plan


def _factor_value(key, slot, weights, live, local, path, config, source) -> torch.Tensor:
    """A LoRA factor, zero-padded to the live rank; B carries the ratio of the new to the live scaling.
    A layer the new adapter does not target gets zeros (no update there), as in `peft`."""
    value = slot.new_zeros(slot.shape)
    if key not in weights:
        return value
    new = weights[key].to(slot.device, torch.float32)
    rank_dim = 0 if local in ("lora_A.weight", "lora_embedding_A") else 1
    other_dims_differ = new.dim() != slot.dim() or any(
        n != s for d, (n, s) in enumerate(zip(new.shape, slot.shape)) if d != rank_dim)
    if new.shape[rank_dim] > slot.shape[rank_dim] or other_dims_differ:
        raise DeltaConfigError(f"{source}: {key} has shape {tuple(new.shape)} but the live one is "
                               f"{tuple(slot.shape)}; a larger rank needs "
                               "prepare_model_for_hotswap(model, target_rank=...) before compiling")
    if rank_dim == 1:
        if live.scaling == 0:
            raise DeltaConfigError(f"{path}: the live adapter has scaling 0 (lora_alpha=0); it cannot take "
                                   "another adapter's scaling")
        new = new * (_new_scaling(config, path, live) / live.scaling)
    index = [slice(None)] * slot.dim()
    index[rank_dim] = slice(0, new.shape[rank_dim])
    value[tuple(index)] = new.to(slot.dtype)
    return value
