"""Weighted merges of adapters into a new adapter (`peft`'s add_weighted_adapter, same arithmetic).

Combination types, for LoRA adapters A_i (r, in), B_i (out, r), scalings s_i and weights w_i:
  cat        A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1 | B_2 | ...]  (rank sum r_i; exact)
  linear     A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i  (factors mixed, so
             only an approximation of sum_i w_i delta_i; equal ranks required)
  ties, dare_linear, dare_ties, magnitude_prune: the same split weights, the merge_ops function applied
             to the A's and to the B's separately
  svd and *_svd: delta = merge_op(w_i, delta_i) on the full updates delta_i = s_i B_i A_i, then truncated
             SVD to `svd_rank` (default: the largest source rank): B = U S, A = V^T (compose/extract.py)
The new adapter has lora_alpha = r, so its scaling is 1 (rsLoRA is switched off for it: `peft` keeps
use_rslora there, which rescales the merged update by sqrt(r)).

Beyond LoRA: the svd types work for any mergeable adapters (DoRA, LoHa, LoKr, IA3, OFT; mixed methods
too) since they only need each adapter's full update; the result is a LoRA. IA3 adapters also take
"linear" (the weighted sum of their scaling vectors, as `peft` does; the result is an IA3 adapter). The
other types mix low-rank factors: they take adapters that give them (core/protocols.py `LowRank`: plain
LoRA, not DoRA, whose magnitude is more than s B A) and are refused for the others.
Which path an adapter takes is asked of its protocols (Additive / Reparameterizing for the svd types,
LowRank for the factor types), never of its method's name.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..core.config import DeltaConfig, DeltaConfigError
from ..core.layer import DeltaLayer, ModulesToSave
from ..core.model import check_adapter_name, is_linear
from ..core.protocols import LowRank, TakesOverForward, declares
from ..core.targeting import select_targets
from ..methods.ia3 import IA3Config
from ..methods.lora import LoraConfig
from . import merge_ops
from .extract import layer_delta, lora_factors, set_lora_factors, to_out_first, truncated_svd

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # mix the LoRA factors
SVD_TYPES = tuple(t for t in COMBINATION_TYPES if t.endswith("svd"))
TARGET_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@torch.no_grad()
def add_weighted_adapter(model, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None,
                         svd_clamp: float | None = None, svd_full_matrices: bool = True,
                         density: float | None = None, majority_sign_method: str = "total",
                         generator: torch.Generator | None = None) -> None:
    """Add adapter `adapter_name` to DeltaModel `model`, merging `adapters` with `weights`.

    Args:
        model: the DeltaModel holding the adapters.
        adapters: names of the adapters to merge.
        weights: one weight per adapter (negative weights subtract).
        adapter_name: the new adapter's name (it must not exist; it is added inactive).
        combination_type: one of COMBINATION_TYPES (see the module docstring). With a single LoRA
            or IA3 adapter the merge is "linear", as in `peft`.
        svd_rank: rank of the result of an svd type (default: the largest source rank).
        svd_clamp: quantile at which the svd factors are clipped (None: no clipping).
        svd_full_matrices: passed to torch.linalg.svd (False is much faster for big layers; True
            reproduces `peft`'s default bit for bit).
        density: fraction of entries kept by ties / dare / magnitude_prune types, in [0, 1].
        majority_sign_method: "total" or "frequency", for the ties types.
        generator: random stream for the DARE drops (default: torch's global RNG, as `peft`).

    Raises:
        DeltaConfigError: a bad argument, or a combination the adapters' methods do not allow.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    configs = _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                               density, majority_sign_method)
    factor_ranks = _factor_ranks(model, adapters)  # the sources that give low-rank factors, by name
    ia3 = all(isinstance(c, IA3Config) for c in configs)  # peft's IA3 merge: sum of the scaling vectors
    if len(adapters) == 1 and (ia3 or adapters[0] in factor_ranks):
        combination_type = "linear"  # as peft; a single LoHa/LoKr/DoRA adapter keeps svd (-> a LoRA)
    if combination_type in SVD_TYPES:
        rank = _svd_rank(configs, factor_ranks, svd_rank)
        config, fill = _lora_config(model, configs, adapters, rank), _fill_svd
    elif len(factor_ranks) == len(adapters):
        rank = _factor_rank(list(factor_ranks.values()), combination_type)
        config, fill = _lora_config(model, configs, adapters, rank), _fill_factors
    elif ia3 and combination_type == "linear":
        config, fill = _same_method_config(model, configs, adapters), _fill_tensor_sum
    else:
        lacking = [c for n, c in zip(adapters, configs) if n not in factor_ranks]
        which = "/".join(sorted({_label(c) for c in lacking}))
        allowed = "'linear' or an svd type" if ia3 else "an svd type (the result is a LoRA)"
        raise DeltaConfigError(f"combination_type={combination_type!r} is not supported for {which} adapters "
                               f"{adapters}: it mixes LoRA factors, and their update is no product s B A of such "
                               f"factors (core/protocols.py LowRank); use {allowed}")
    _check_heads(model, adapters)
    model.inject(adapter_name, config)
    try:
        for _, layer in model.delta_layers():
            if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters:
                present = [(n, w) for n, w in zip(adapters, weights) if n in layer.adapters]
                fill(layer, layer.adapters[adapter_name], present, combination_type, svd_clamp,
                     svd_full_matrices, density, majority_sign_method, generator)
        _copy_head(model, adapters, adapter_name)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise


# ------------------------------------------------------------------------------------------ checks
def _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                     density, majority_sign_method) -> list[DeltaConfig]:
    check_adapter_name(adapter_name)
    if adapter_name in model.peft_config:
        raise DeltaConfigError(f"adapter {adapter_name!r} already exists; delete it first or pick another "
                               "name")
    if not adapters:
        raise DeltaConfigError("adapters is empty: give the names of the adapters to merge")
    unknown = [n for n in adapters if n not in model.peft_config]
    if unknown:
        raise DeltaConfigError(f"unknown adapters {unknown}; adapters: {list(model.peft_config)}")
    if len(weights) != len(adapters):
        raise DeltaConfigError(f"weights has {len(weights)} entries for {len(adapters)} adapters")
    if combination_type not in COMBINATION_TYPES:
        raise DeltaConfigError(f"combination_type={combination_type!r}: must be one of {COMBINATION_TYPES}")
    if combination_type not in ("svd", "linear", "cat"):
        if density is None or not 0 <= density <= 1:
            raise DeltaConfigError(f"density={density!r}: combination_type={combination_type!r} needs a "
                                   "fraction of entries to keep in [0, 1]")
    if majority_sign_method not in merge_ops.SIGN_METHODS:
        raise DeltaConfigError(f"majority_sign_method={majority_sign_method!r}: must be one of "
                               f"{merge_ops.SIGN_METHODS}")
    bad_rank = not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank <= 0
    if svd_rank is not None and bad_rank:
        raise DeltaConfigError(f"svd_rank={svd_rank!r}: must be a positive integer")
    if svd_clamp is not None and not 0 < svd_clamp <= 1:
        raise DeltaConfigError(f"svd_clamp={svd_clamp!r}: must be a quantile in (0, 1]")
    whole = [n for n in adapters if n in model.model_adapters
             and declares(model.model_adapters[n], TakesOverForward)]
    if whole:
        raise DeltaConfigError(f"adapters {whole} act on the whole model (they run its forward: prompts, "
                               "gates) and have no weight update to combine")
    return [model.peft_config[n] for n in adapters]


def _label(config: DeltaConfig) -> str:
    """The method's name in messages; DoRA is a LoRA variant with its own limits."""
    return "DoRA" if isinstance(config, LoraConfig) and config.use_dora else config.peft_type


def _factor_ranks(model, adapters: list[str]) -> dict[str, int]:
    """{source: its largest rank} for the sources whose every layer adapter gives low-rank factors
    (core/protocols.py `LowRank`; for a LoRA, max(r, rank_pattern))."""
    ranks = {}
    for name in adapters:
        held = [layer.adapters[name] for _, layer in model.delta_layers()
                if isinstance(layer, DeltaLayer) and name in layer.adapters]
        found = [adapter.factors() if declares(adapter, LowRank) else None for adapter in held]
        if found and all(f is not None for f in found):
            ranks[name] = max(a.shape[0] for a, _, _ in found)
    return ranks


def _factor_rank(ranks: list[int], combination_type: str) -> int:
    if combination_type == "cat":
        return sum(ranks)
    if len(set(ranks)) != 1:
        raise DeltaConfigError(f"combination_type={combination_type!r} needs adapters of equal rank, got "
                               f"r={ranks}; use 'cat' or an svd type for different ranks")
    return ranks[0]


def _config_rank(config: DeltaConfig) -> int | None:
    """A config's rank setting, max(r, rank_pattern values), for the methods whose config has an integer `r`."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    r = values.get("r")
    if not isinstance(r, int) or isinstance(r, bool):
        return None
    return max([r, *(values.get("rank_pattern") or {}).values()])


def _svd_rank(configs: list[DeltaConfig], factor_ranks: dict[str, int], svd_rank: int | None) -> int:
    """svd_rank, else the largest rank among the sources: their low-rank factors', and each config's `r`
    (with its rank_pattern). For LoHa, LoKr or OFT that `r` is the method's setting, not the rank of the
    update (up to r^2 for LoHa; OFT's r counts blocks): pass svd_rank for a closer result."""
    ranks = list(factor_ranks.values()) + [r for r in map(_config_rank, configs) if r is not None]
    if svd_rank is None and not ranks:
        raise DeltaConfigError("svd_rank is required: none of these adapters has a rank r that could be the "
                               "default")
    return svd_rank or max(ranks)


def _heads(model) -> list[tuple[str, ModulesToSave]]:
    return [(name, wrapper) for name, wrapper in model.delta_layers() if isinstance(wrapper, ModulesToSave)]


def _check_heads(model, adapters: list[str]) -> None:
    for name, wrapper in _heads(model):
        owners = [a for a in adapters if a in wrapper.copies]
        if len(owners) > 1:
            raise DeltaConfigError(f"adapters {owners} each train their own copy of {name!r} "
                                   "(modules_to_save); fully trained modules cannot be merged")


def _copy_head(model, adapters: list[str], new: str) -> None:
    for _, wrapper in _heads(model):
        owner = next((a for a in adapters if a in wrapper.copies), None)
        if new in wrapper.copies and owner is not None:
            wrapper.copies[new].load_state_dict(wrapper.copies[owner].state_dict())


# ------------------------------------------------------------------------------------------ configs
def _targets(model, configs: list[DeltaConfig], adapters: list[str]) -> tuple[dict, bool]:
    """Targeting fields that select exactly the layers any source adapts: the sources' own when they
    agree, their union when they are lists (or regexes) with the same other fields, else full names
    (then the flag is True)."""
    covered = {path for path, layer in model.delta_layers()
               if isinstance(layer, DeltaLayer) and any(a in layer.adapters for a in adapters)}
    fields = [{f: getattr(c, f) for f in TARGET_FIELDS} for c in configs]
    rest = [{k: v for k, v in f.items() if k != "target_modules"} for f in fields]
    options = []
    if all(f == fields[0] for f in fields):
        options.append(fields[0])
    kinds = {type(f["target_modules"]) for f in fields}
    if all(r == rest[0] for r in rest) and kinds == {list}:
        union = list(dict.fromkeys(t for f in fields for t in f["target_modules"]))
        options.append({**rest[0], "target_modules": union})
    if all(r == rest[0] for r in rest) and kinds == {str}:
        options.append({**rest[0], "target_modules": "|".join(f"({f['target_modules']})" for f in fields)})
    candidates = model.candidate_modules()
    for option in options:
        probe = LoraConfig(**option)
        try:
            if set(select_targets(model.model, probe, candidates, is_linear)) == covered:
                return option, False
        except DeltaConfigError:
            continue
    return {"target_modules": sorted(covered), "exclude_modules": None, "layers_to_transform": None,
            "layers_pattern": None}, True


def _lora_config(model, configs: list[DeltaConfig], adapters: list[str], rank: int) -> LoraConfig:
    targets, _ = _targets(model, configs, adapters)
    heads = list(dict.fromkeys(m for c in configs for m in (c.modules_to_save or []))) or None
    first = configs[0]
    if isinstance(first, LoraConfig):
        return dataclasses.replace(first, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={},
                                   use_rslora=False, use_dora=False, init_lora_weights=True,
                                   modules_to_save=heads, **targets)
    fan_in_fan_out = any(layer.base.fan_in_fan_out for _, layer in model.delta_layers()
                         if isinstance(layer, DeltaLayer))
    return LoraConfig(r=rank, lora_alpha=rank, task_type=first.task_type, fan_in_fan_out=fan_in_fan_out,
                      base_model_name_or_path=first.base_model_name_or_path,
                      inference_mode=first.inference_mode, modules_to_save=heads, **targets)


def _same_method_config(model, configs: list[DeltaConfig], adapters: list[str]) -> DeltaConfig:
    """IA3: the first config with targeting widened to every source's layers (and feed-forward modules)."""
    targets, explicit = _targets(model, configs, adapters)
    feedforward = [c.feedforward_modules for c in configs]  # every one an IA3Config (add_weighted_adapter)
    if explicit:
        # full module names: name the feed-forward layers the same way
        layers = dict(model.delta_layers())
        merged = [p for p in targets["target_modules"]
                  if any(a in layers[p].adapters and layers[p].adapters[a].feedforward for a in adapters)]
    elif all(isinstance(f, list) for f in feedforward):
        merged = list(dict.fromkeys(m for f in feedforward for m in f))
    elif all(isinstance(f, str) for f in feedforward):
        merged = "|".join(f"({f})" for f in feedforward)
    elif all(f is None for f in feedforward):
        merged = None
    else:
        raise DeltaConfigError(f"feedforward_modules of {adapters} mix lists and regexes: {feedforward}")
    return dataclasses.replace(configs[0], feedforward_modules=merged, **targets)


# ------------------------------------------------------------------------------------------ per-layer fills
def _fill_factors(layer: DeltaLayer, target: nn.Module, present, combination_type, svd_clamp, full_matrices,
                  density, sign_method, generator) -> None:
    """cat and the factor-mixing types, on the low-rank factors A (r, ...) and B (out, r, ...) (`LowRank`)."""
    target_a, target_b, _ = lora_factors(target)
    target_a.zero_()
    target_b.zero_()
    sources = [(*layer.adapters[n].factors(), w) for n, w in present]  # (A, B, scaling, weight)
    if not sources:
        return
    if combination_type == "cat":
        a = torch.cat([src_a * (w * scaling) for src_a, _, scaling, w in sources], dim=0)
        b = torch.cat([src_b for _, src_b, _, _ in sources], dim=1)
        target_a[: a.shape[0]] = a.to(target_a.dtype)
        target_b[:, : b.shape[1]] = b.to(target_b.dtype)
        return
    # split |w s| evenly between the factors; the sign goes on A only, so it is applied once
    split = [math.sqrt(abs(w * scaling)) for _, _, scaling, w in sources]
    signs = [1.0 if w * scaling >= 0 else -1.0 for _, _, scaling, w in sources]
    weights_a = torch.tensor([s * root for s, root in zip(signs, split)])
    weights_b = torch.tensor(split)
    rank = target_a.shape[0]
    a_list = [_pad_rank(src_a, rank, dim=0) for src_a, _, _, _ in sources]
    b_list = [_pad_rank(src_b, rank, dim=1) for _, src_b, _, _ in sources]
    a = merge_ops.combine(combination_type, a_list, weights_a, density, sign_method, generator)
    b = merge_ops.combine(combination_type, b_list, weights_b, density, sign_method, generator)
    target_a.copy_(a.to(target_a.dtype))
    target_b.copy_(b.to(target_b.dtype))


def _pad_rank(factor: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Zero-pad a LoRA factor along its rank axis (a rank_pattern layer below the config's r)."""
    missing = rank - factor.shape[dim]
    if missing <= 0:
        return factor
    shape = list(factor.shape)
    shape[dim] = missing
    return torch.cat([factor, factor.new_zeros(shape)], dim=dim)


def _fill_svd(layer: DeltaLayer, target: nn.Module, present, combination_type, svd_clamp, full_matrices,
              density, sign_method, generator) -> None:
    """Merge the full updates (each source's protocol gives it: extract.layer_delta), then truncated SVD into
    the new LoRA's factors."""
    target_a, target_b, _ = lora_factors(target)
    if not present:
        target_a.zero_()
        target_b.zero_()
        return
    base = layer.base
    lost: list[str] = []
    deltas = [to_out_first(base, layer_delta(layer, name, lost)) for name, _ in present]  # each (out, fan_in)
    if lost:
        warnings.warn(f"{layer.module_name}: the merged LoRA leaves out what the sources change besides the "
                      f"weight ({sorted(set(lost))}, e.g. IA3's bias scaling)", stacklevel=4)
    weights = torch.tensor([w for _, w in present])
    kind = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    delta = merge_ops.combine(kind, deltas, weights, density, sign_method, generator)
    b, a, _, _ = truncated_svd(delta, target_a.shape[0], full_matrices, svd_clamp)
    set_lora_factors(target, b, a)


def _fill_tensor_sum(layer: DeltaLayer, target: nn.Module, present, *_unused) -> None:
    """IA3 'linear': every tensor of the new adapter is the weighted sum of the sources' (peft)."""
    state = target.state_dict(keep_vars=True)
    for key, tensor in state.items():
        tensor.zero_()
        for name, weight in present:
            tensor.add_(layer.adapters[name].state_dict()[key].to(tensor.dtype), alpha=weight)


__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]
