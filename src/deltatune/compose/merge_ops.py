"""Tensor operations for merging task vectors (adapter factors or delta weights).

Every function takes `task_tensors`, a list of same-shaped tensors (one per adapter), and `weights`, a
1-D tensor with one weight per adapter, and returns one merged tensor of the same shape.

- task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): sum_i w_i t_i.
- magnitude prune: keep each tensor's top `density` fraction of entries by |value|, then task arithmetic.
- TIES (Yadav et al. 2023, arXiv:2306.01708): magnitude-prune, elect a sign per entry (the sign of the
  summed pruned values, "total", or of the count of signs, "frequency"), then average, per entry, only
  the weighted values that agree with the elected sign.
- DARE (Yu et al. 2024, arXiv:2311.03099): drop each entry with probability 1 - density and rescale the
  survivors by 1 / density (so the expectation is unchanged), then task arithmetic (dare_linear) or the
  TIES sign election and disjoint mean (dare_ties).

The arithmetic follows the `peft` package's merge_utils, so merges with the same inputs (and, for
DARE, the same random stream) give the same tensors.
"""

from __future__ import annotations

import warnings

import torch

SIGN_METHODS = ("total", "frequency")


def _weights_like(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n,) weights -> (n, 1, ..., 1) so they broadcast over stacked (n, *shape) tensors."""
    return weights.to(stacked.device).view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def magnitude_mask_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest |value|; zero the rest."""
    if density >= 1:
        return tensor
    mask = torch.zeros_like(tensor).reshape(-1)
    keep = int(density * tensor.numel())
    top = torch.topk(tensor.abs().reshape(-1), k=keep, largest=True)
    mask[top.indices] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune(tensor: torch.Tensor, density: float, rescale: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep each entry independently with probability `density` (DARE's drop); survivors are divided by
    `density` when `rescale`. Draws one Bernoulli per entry from `generator` (default: torch's global RNG)."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    pruned = tensor * keep
    return pruned / density if rescale else pruned


def majority_sign_mask(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """(n, *shape) bool mask: whether each entry has the elected sign (ties at zero elect +)."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method={method!r}: must be one of {SIGN_METHODS}")
    elected = torch.where(magnitude >= 0, 1, -1)
    return sign == elected


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean, per entry, over the adapters whose value has the elected sign (0 where none has)."""
    kept = mask.sum(dim=0)
    return (weighted * mask).sum(dim=0) / torch.clamp(kept, min=1.0)


def task_arithmetic(task_tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    stacked = torch.stack(task_tensors, dim=0)  # (n, *shape)
    return (stacked * _weights_like(stacked, weights)).sum(dim=0)


def magnitude_prune(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float) -> torch.Tensor:
    return task_arithmetic([magnitude_mask_prune(t, density) for t in task_tensors], weights)


def ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
         majority_sign_method: str = "total") -> torch.Tensor:
    stacked = torch.stack([magnitude_mask_prune(t, density) for t in task_tensors], dim=0)
    # the sign is elected on the pruned, *unweighted* values (as peft does)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(stacked * _weights_like(stacked, weights), mask)


def dare_linear(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    return task_arithmetic([random_prune(t, density, True, generator) for t in task_tensors], weights)


def dare_ties(task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float,
              majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    stacked = torch.stack([random_prune(t, density, True, generator) for t in task_tensors], dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)
    return disjoint_merge(stacked * _weights_like(stacked, weights), mask)


def combine(kind: str, task_tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None = None,
            majority_sign_method: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge `task_tensors` by `kind`: "linear", "magnitude_prune", "ties", "dare_linear" or "dare_ties"
    (the `_svd` suffix of a combination type is handled by the caller)."""
    if kind == "linear":
        return task_arithmetic(task_tensors, weights)
    if density is not None and density >= 1:
        warnings.warn(f"density={density} keeps every entry: nothing is pruned", stacklevel=3)
    if kind == "magnitude_prune":
        return magnitude_prune(task_tensors, weights, density)
    if kind == "ties":
        return ties(task_tensors, weights, density, majority_sign_method)
    if kind == "dare_linear":
        return dare_linear(task_tensors, weights, density, generator)
    if kind == "dare_ties":
        return dare_ties(task_tensors, weights, density, majority_sign_method, generator)
    raise ValueError(f"unknown merge kind {kind!r}")
