"""LyCORIS LoHa and LoKr tensors in kohya-style files (keys: io/kohya_keys.py), onto our LoHa / LoKr.

The rules below were read from lycoris-lora 4.1.3 (modules/loha.py, modules/lokr.py, functional/lokr.py,
kohya.py create_network_from_weights); the factor layouts are PEFT's and ours (methods/loha.py, lokr.py).
  LoHa: delta W = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b), r = hada_w1_b.shape[0], alpha missing or 0 -> r;
        with hada_t1/t2 (conv "Tucker"/CP form) each product is einsum(t, w_a, w_b) -> (out, in, kh, kw).
  LoKr: delta W = scale * kron(w1, w2), w1 (a, c) or w1_a @ w1_b, w2 (b, d[, k..]), w2_a @ w2_b or
        einsum(t2, w2_a, w2_b); scale = alpha / r, but 1 whenever both w1 and w2 are full matrices (LyCORIS
        sets alpha = r then, and reads such a file with r = 1: its alpha means nothing). r is the rank of the
        factorised side: w1_a.shape[1], t2.shape[0] or w2_a.shape[1].
Our scaling is alpha / r per module (alpha_pattern / rank_pattern where modules differ), so reading sets
our alpha to scale * our r; writing stores alpha = scaling * r (full LoKr: scaling folded into w1, alpha 1).
Conv1d CP cores are (r, r, k) in LyCORIS and (r, r, k, 1) here (PEFT's layout); a Linear's factors may come
as 1x1-conv tensors (SD1.x proj_in/out were 1x1 convs): both are reshaped when the element count agrees.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import nn

from ..errors import DeltaConfigError
from ..methods.loha import LoHaConfig
from ..methods.lokr import LoKrConfig, factorization
from .kohya_keys import ALPHA, DORA_SCALE, LOHA_NAMES, LOKR_NAMES


def alpha_of(named: dict[str, torch.Tensor], rank: int) -> float:
    """The file's alpha for a module; missing or 0 means `rank` (scale 1), as kohya and LyCORIS read it."""
    alpha = named.get(ALPHA)
    value = float(alpha.float().item()) if alpha is not None else 0.0
    return value or float(rank)


def fit_to_module(tensor: torch.Tensor, want: tuple[int, ...], path: str, name: str, source: str) -> torch.Tensor:
    """`tensor` in the shape our adapter holds, reshaped only across trailing 1-sized dimensions.

    Raises:
        DeltaConfigError: the shapes differ otherwise (naming the module and tensor).
    """
    have = tuple(tensor.shape)
    if have == tuple(want):
        return tensor
    squeeze = lambda shape: tuple(shape[:2]) + tuple(d for d in shape[2:] if d != 1)  # noqa: E731
    if squeeze(have) == squeeze(want):
        return tensor.reshape(want)
    raise DeltaConfigError(f"{source}: shape mismatch for {path}: {name} is {have} in the file, the module needs "
                           f"{tuple(want)} (a file for a different model?)")


def pattern_config(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[int, float, dict, dict]:
    """(r, alpha, rank_pattern, alpha_pattern): the most common rank and alpha, and exact per-module entries
    (regex-escaped paths) where a module differs."""
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return (r, alpha, {re.escape(p): v for p, v in ranks.items() if v != r},
            {re.escape(p): v for p, v in alphas.items() if v != alpha})


def _require(named: dict, names: tuple[str, ...], path: str, source: str) -> None:
    if DORA_SCALE in named:  # LyCORIS's DoHa / DoKr (dora_wd): a weight-decomposed update we do not build
        raise DeltaConfigError(f"{source}: module {path} has a dora_scale: weight-decomposed LoHa/LoKr (LyCORIS "
                               "dora_wd) is not read")
    missing = [n for n in names if n not in named]
    if missing:
        raise DeltaConfigError(f"{source}: module {path} has {sorted(named)} but not {missing}")


def _kernel(module: nn.Module) -> tuple[int, ...]:
    return tuple(module.weight.shape[2:])


def _core_shape(r: int, kernel: tuple[int, ...]) -> tuple[int, ...]:
    return (r, r, *kernel) if len(kernel) != 1 else (r, r, kernel[0], 1)


def plan_loha(modules: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]], source: str):
    """(LoHaConfig, {module path.local name: tensor}) for LyCORIS LoHa modules."""
    ranks, alphas, disk, tucker = {}, {}, {}, {}
    for path, (module, named) in modules.items():
        _require(named, LOHA_NAMES[:4], path, source)
        out_f, in_f, *kernel = module.weight.shape
        r = named["hada_w1_b"].shape[0]
        tucker[path] = "hada_t1" in named or "hada_t2" in named
        if tucker[path]:
            _require(named, LOHA_NAMES, path, source)
            want = {"hada_w1_a": (r, out_f), "hada_w1_b": (r, in_f), "hada_t1": _core_shape(r, tuple(kernel))}
        else:
            want = {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f * math.prod(kernel))}
        want.update({n.replace("1", "2"): s for n, s in want.items()})
        for name, shape in want.items():
            disk[f"{path}.{name}"] = fit_to_module(named[name], shape, path, name, source)
        ranks[path], alphas[path] = r, alpha_of(named, r)
    effective = any(tucker.values())
    for path, (module, _) in modules.items():  # one use_effective_conv2d for the whole adapter
        if effective and not tucker[path] and any(k != 1 for k in _kernel(module)):
            raise DeltaConfigError(f"{source}: module {path} is a conv without hada_t1/hada_t2 while others have "
                                   "them; one adapter has one use_effective_conv2d")
    r, alpha, rank_pattern, alpha_pattern = pattern_config(ranks, alphas)
    return LoHaConfig(r=r, alpha=alpha, target_modules=sorted(modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, use_effective_conv2d=effective), disk


def _lokr_layout(module: nn.Module, named: dict, path: str, source: str) -> dict:
    """The sizes a LyCORIS LoKr module's tensors imply: a, b, c, d, kernel, file rank, which parts are full."""
    out_f, in_f, *kernel = module.weight.shape
    full_w1, full_w2, tucker = "lokr_w1" in named, "lokr_w2" in named, "lokr_t2" in named
    _require(named, ("lokr_w1",) if full_w1 else ("lokr_w1_a", "lokr_w1_b"), path, source)
    _require(named, ("lokr_w2",) if full_w2 else ("lokr_w2_a", "lokr_w2_b"), path, source)
    a, c = named["lokr_w1"].shape[:2] if full_w1 else (named["lokr_w1_a"].shape[0], named["lokr_w1_b"].shape[-1])
    if full_w2:
        b, d = named["lokr_w2"].shape[:2]
    elif tucker:
        b, d = named["lokr_w2_a"].shape[1], named["lokr_w2_b"].shape[1]
    else:
        b, d = named["lokr_w2_a"].shape[0], named["lokr_w2_b"].shape[1] // max(math.prod(kernel), 1)
    if a * b != out_f or c * d != in_f:
        raise DeltaConfigError(f"{source}: shape mismatch for {path}: the LoKr factors give a ({a * b}, {c * d}) "
                               f"weight, the module's is ({out_f}, {in_f})")
    rank = (named["lokr_w1_a"].shape[1] if not full_w1 else named["lokr_t2"].shape[0] if tucker
            else None if full_w2 else named["lokr_w2_a"].shape[1])
    return {"a": a, "b": b, "c": c, "d": d, "out": out_f, "in": in_f, "kernel": tuple(kernel), "rank": rank,
            "full_w1": full_w1, "full_w2": full_w2, "tucker": tucker}


def plan_lokr(modules: dict[str, tuple[nn.Module, dict[str, torch.Tensor]]], source: str):
    """(LoKrConfig, {module path.local name: tensor}) for LyCORIS LoKr modules; refuses a layout our LoKr does
    not build (it must come out of one decompose_factor / decompose_both / use_effective_conv2d)."""
    layouts = {path: _lokr_layout(module, named, path, source) for path, (module, named) in modules.items()}
    factors = None
    for path, lay in layouts.items():
        fits = {f for f in (-1, lay["a"], lay["b"], lay["c"], lay["d"])
                if factorization(lay["out"], f) == (lay["a"], lay["b"])
                and factorization(lay["in"], f) == (lay["c"], lay["d"])}
        factors = fits if factors is None else factors & fits
        if not factors:  # LyCORIS splits f > sqrt(dim) as (dim/f, f), PEFT and we as (f, dim/f)
            raise DeltaConfigError(
                f"{source}: module {path}: its LoKr factors ({lay['a']}x{lay['b']} out, {lay['c']}x{lay['d']} in) "
                "and the other modules' come from no single decompose_factor of ours (LyCORIS's "
                "unbalanced_factorization, or a factor above the square root of a dimension, which LyCORIS "
                "splits the other way round than PEFT and we do)")
    factor = -1 if -1 in factors else min(factors)
    decompose_both = any(not lay["full_w1"] for lay in layouts.values())
    effective = any(lay["tucker"] for lay in layouts.values())
    ranks, alphas, disk = {}, {}, {}
    for path, lay in layouts.items():
        a, b, c, d, kernel = lay["a"], lay["b"], lay["c"], lay["d"], lay["kernel"]
        full = lay["full_w1"] and lay["full_w2"]
        r = max(a, b, c, d) if full else lay["rank"]  # full: any r that keeps both full
        scale = 1.0 if full else alpha_of(modules[path][1], r) / r
        ours = {"full_w1": not (decompose_both and r < max(a, c) / 2), "full_w2": r >= max(b, d) / 2,
                "tucker": effective and r < max(b, d) / 2 and any(k != 1 for k in kernel)}
        theirs = {k: lay[k] for k in ours}
        if ours != theirs:
            raise DeltaConfigError(f"{source}: module {path}: its LoKr layout {theirs} is not the one LoKr builds "
                                   f"for rank {r} with decompose_both={decompose_both}, use_effective_conv2d="
                                   f"{effective} ({ours})")
        want = {"lokr_w1": (a, c)} if lay["full_w1"] else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        if lay["full_w2"]:
            want["lokr_w2"] = (b, d, *kernel)
        elif lay["tucker"]:
            want.update(lokr_t2=_core_shape(r, kernel), lokr_w2_a=(r, b), lokr_w2_b=(r, d))
        else:
            want.update(lokr_w2_a=(b, r), lokr_w2_b=(r, d * math.prod(kernel)))
        named = modules[path][1]
        for name, shape in want.items():
            disk[f"{path}.{name}"] = fit_to_module(named[name], shape, path, name, source)
        ranks[path], alphas[path] = r, scale * r
    r, alpha, rank_pattern, alpha_pattern = pattern_config(ranks, alphas)
    return LoKrConfig(r=r, alpha=alpha, target_modules=sorted(modules), rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, decompose_both=decompose_both, decompose_factor=factor,
                      use_effective_conv2d=effective), disk


def _lycoris_core(adapter, tensor: torch.Tensor) -> torch.Tensor:
    """A CP core as LyCORIS stores it: (r, r, k) for a Conv1d (ours carries a trailing 1)."""
    return tensor.squeeze(-1) if adapter.kind == "conv1d" else tensor


def loha_file_tensors(adapter) -> dict[str, torch.Tensor]:
    """LyCORIS tensors of one LoHa adapter; alpha = scaling * r."""
    tensors = {n: getattr(adapter, n) for n in LOHA_NAMES if hasattr(adapter, n)}
    for core in ("hada_t1", "hada_t2"):
        if core in tensors:
            tensors[core] = _lycoris_core(adapter, tensors[core])
    tensors[ALPHA] = torch.tensor(adapter.scaling * adapter.r)
    return tensors


def lokr_file_tensors(adapter) -> dict[str, torch.Tensor]:
    """LyCORIS tensors of one LoKr adapter; alpha = scaling * r, or, with both factors full (scale 1 in
    LyCORIS), the scaling folded into lokr_w1 and alpha 1."""
    tensors = {n: getattr(adapter, n) for n in LOKR_NAMES if hasattr(adapter, n)}
    if "lokr_t2" in tensors:
        tensors["lokr_t2"] = _lycoris_core(adapter, tensors["lokr_t2"])
    if "lokr_w1" in tensors and "lokr_w2" in tensors:
        tensors["lokr_w1"] = tensors["lokr_w1"] * adapter.scaling
        tensors[ALPHA] = torch.tensor(1.0)
    else:
        tensors[ALPHA] = torch.tensor(adapter.scaling * adapter.r)
    return tensors
