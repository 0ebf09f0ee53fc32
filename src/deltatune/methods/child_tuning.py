"""Child-Tuning: Raise a Child in Large Language Model: Towards Effective and Generalizable Fine-tuning
(Xu et al. 2021, arXiv:2109.05687).

Update rule: the chosen weight matrices are fine-tuned in full, but each step only a "child network" of
their entries moves: the gradient is multiplied by a 0/1 mask M before the optimizer step.
    Child-Tuning_F (task-free, `child_tuning_mode="F"`): M ~ Bernoulli(p) drawn anew every step, and
        the kept gradients are scaled by 1/p, so the expected update is unchanged.
    Child-Tuning_D (task-driven, "D"): M fixed before training: the entries whose Fisher information
        F = sum over batches of (dL/dW)^2, estimated on training data, is in the top p fraction over all
        chosen matrices (`estimate_fisher_mask`; the training loop calls it through the
        `before_training` hook on the first `fisher_batches` training batches). No rescaling.
p = `reserve_p`. The mask is applied in the `before_optimizer_step` hook (training loops call
`model.before_optimizer_step(step)` after backward).

Init rule: each adapter holds a delta D (same shape and layout as W, zero at start), so out = (W + D) x
and the adapted model starts equal to the base; dL/dD = dL/dW, so masking D's gradient is masking W's.
Merge adds D to W (mergeable, additive).

Files hold D sparsely, not as a full copy: `child_indices` (nnz,) int64 flat positions into W and
`child_values` (nnz,) the entries, per module; the config's `child_entries` records nnz per module
(written on save) so a file is checked against the model before anything is loaded. A loaded adapter
expands into D on first use. Child-Tuning_D's delta has at most p * |W| entries; Child-Tuning_F's
support grows with the number of steps (at 12 bytes per entry, sparse pays off below a third dense).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.base import BaseLayer
from ..core.call import CallContext
from ..core.config import DeltaConfig, DeltaConfigError, register_method, require
from ..core.layer import DeltaLayer
from ..core.protocols import Additive

MODES = ("F", "D")


class ChildTuningAdapter(nn.Module, Additive):
    """A full-size delta for one weight matrix, saved as (indices, values)."""

    merge_rule = "additive"

    def __init__(self, base: BaseLayer, stored_entries: int = 0) -> None:
        super().__init__()
        factory = base.factory  # the base's device and dtype
        # D in W's own layout (child_indices are flat positions into W): (out, in), or (in, out) for a
        # layer that stores it so; a quantized base's packed weight has neither, the view gives the sizes
        delta = base.from_out_first(torch.zeros(base.out_features, base.in_features, **factory))
        self.child_delta = nn.Parameter(delta.contiguous())
        indices = torch.zeros(stored_entries, dtype=torch.long, device=base.device)
        self.register_buffer("child_indices", indices)
        self.register_buffer("child_values", torch.zeros(stored_entries, **factory))
        self.register_buffer("child_mask", None, persistent=False)  # Child-Tuning_D's fixed mask
        # False while (child_indices, child_values) hold loaded entries not yet expanded into child_delta
        self._expanded = stored_entries == 0

    # ------------------------------------------------------------ sparse <-> dense
    @torch.no_grad()
    def expand(self) -> None:
        """Write loaded (indices, values) into the dense delta, once."""
        if not self._expanded:
            self.child_delta.zero_()
            self.child_delta.view(-1)[self.child_indices] = self.child_values.to(self.child_delta.dtype)
            self._expanded = True

    @torch.no_grad()
    def pack(self) -> int:
        """Refresh (indices, values) from the dense delta; returns the number of stored entries."""
        if self._expanded:
            flat = self.child_delta.detach().reshape(-1)
            self.child_indices = flat.nonzero().flatten()
            self.child_values = flat[self.child_indices].clone()
        return self.child_indices.numel()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # only the sparse form is saved; the dense delta is a working copy
        self.pack()
        for name in ("child_indices", "child_values"):
            tensor = getattr(self, name)
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name in ("child_indices", "child_values"):
            if prefix + name in state_dict:
                setattr(self, name, state_dict[prefix + name].to(getattr(self, name).device).clone())
            elif strict:
                missing_keys.append(prefix + name)
        self._expanded = False

    # ------------------------------------------------------------ forward / merge
    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        self.expand()
        delta = base.to_out_first(self.child_delta)  # (out, in)
        return base_out + F.linear(x.to(delta.dtype), delta).to(base_out.dtype)

    def merge_refusal(self) -> str | None:
        return None

    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        """D itself, in W's layout: merged W + D is the weight the forward computes with."""
        self.expand()
        return self.child_delta.detach()

    def extra_repr(self) -> str:
        return f"shape={tuple(self.child_delta.shape)}, stored_entries={self.child_indices.numel()}"


@register_method
@dataclass
class ChildTuningConfig(DeltaConfig):
    """Child-Tuning over full weight matrices.

    Args:
        child_tuning_mode: "F" (random mask each step) or "D" (fixed mask from Fisher information).
        reserve_p: p, the share of entries updated (kept by the mask), in (0, 1].
        child_entries: stored entries per module; written on save, read on load (leave it empty).
        fisher_batches: for D, how many training batches the training loop uses to estimate the Fisher
            information before the first step (`estimate_fisher_mask` called directly takes any number).
    """

    peft_type = "CHILD_TUNING"
    adapter_types = (ChildTuningAdapter,)
    child_tuning_mode: str = "F"
    reserve_p: float = 0.3
    child_entries: dict = field(default_factory=dict)
    fisher_batches: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.child_tuning_mode in MODES, "child_tuning_mode", self.child_tuning_mode,
                f"must be one of {MODES}")
        require(isinstance(self.reserve_p, (int, float)) and not isinstance(self.reserve_p, bool)
                and 0 < self.reserve_p <= 1, "reserve_p", self.reserve_p, "must be in (0, 1]")
        require(isinstance(self.fisher_batches, int) and self.fisher_batches > 0, "fisher_batches",
                self.fisher_batches, "must be a positive int")
        require(isinstance(self.child_entries, dict), "child_entries", self.child_entries, "must be a dict")
        self._adapters: dict[str, ChildTuningAdapter] = {}  # this adapter's layers, for child_entries on save

    def supports(self, base: BaseLayer) -> bool:
        return base.kind == "linear"

    def validate_target(self, base: BaseLayer, module_name: str) -> None:
        if not self.supports(base):
            raise DeltaConfigError(f"target module {module_name!r} is a {type(base.module).__name__}; Child-"
                                   "Tuning adapts the weight matrices of linear layers (any layout or storage)")

    def module_keys(self) -> dict:
        return {"child_entries": (list(self.child_entries), lambda key, name: key == name)}

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> None:
        self._adapters = {}  # a new injection: the layers it builds are this adapter's
        return None

    def make_adapter(self, base: BaseLayer, module_name: str,
                     shared: nn.Module | None = None) -> ChildTuningAdapter:
        adapter = ChildTuningAdapter(base, int(self.child_entries.get(module_name, 0)))
        self._adapters[module_name] = adapter
        return adapter

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self._adapters:
            data["child_entries"] = {name: adapter.pack() for name, adapter in self._adapters.items()}
        return data

    def before_training(self, model: nn.Module, adapter_name: str, batches, loss_fn) -> None:
        """Child-Tuning_D: fix the mask from the Fisher information of the first `fisher_batches` batches
        (unless estimate_fisher_mask already did)."""
        adapters = child_adapters(model, adapter_name)
        if self.child_tuning_mode == "D" and any(adapter.child_mask is None for _, adapter in adapters):
            estimate_fisher_mask(model, itertools.islice(batches, self.fisher_batches), adapter_name,
                                 loss_fn=loss_fn)

    def before_optimizer_step(self, model: nn.Module, adapter_name: str, step: int) -> None:
        """Mask (and for F rescale) the gradients of this adapter's deltas."""
        for name, adapter in child_adapters(model, adapter_name):
            grad = adapter.child_delta.grad
            if grad is None:
                continue
            if self.child_tuning_mode == "F":
                keep = torch.bernoulli(torch.full_like(grad, self.reserve_p))
                grad.mul_(keep / self.reserve_p)
            elif adapter.child_mask is None:
                raise RuntimeError(f"Child-Tuning_D adapter {adapter_name!r} has no mask at {name!r}: call "
                                   "estimate_fisher_mask(model, batches) on training data before training")
            else:
                grad.mul_(adapter.child_mask)


def child_adapters(model: nn.Module, adapter_name: str) -> list[tuple[str, ChildTuningAdapter]]:
    """(module name, adapter) for every layer of a DeltaModel that holds Child-Tuning adapter `adapter_name`."""
    return [(name, layer.adapters[adapter_name]) for name, layer in model.delta_layers()
            if isinstance(layer, DeltaLayer) and adapter_name in layer.adapters
            and isinstance(layer.adapters[adapter_name], ChildTuningAdapter)]


def estimate_fisher_mask(model: nn.Module, batches: Iterable[dict], adapter_name: str | None = None,
                         reserve_p: float | None = None,
                         loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Child-Tuning_D: fix each layer's gradient mask from Fisher information on training data.

    F = sum over `batches` of (dL/dW)^2 for every matrix adapter `adapter_name` covers; the top
    `reserve_p` fraction over all those matrices together (the paper's global threshold) is kept.

    Args:
        model: a DeltaModel holding a Child-Tuning adapter.
        batches: training batches, each a dict of model keyword arguments (with labels).
        adapter_name: the adapter (default: the first active one).
        reserve_p: share of entries to keep (default: the config's).
        loss_fn: (model, batch) -> loss; default `model(**batch).loss`.

    Returns:
        {module name: 0/1 mask in W's layout}; the masks are also stored on the adapters.
    """
    name = adapter_name or model.active_adapters[0]
    config = model.peft_config[name]
    require(config.peft_type == ChildTuningConfig.peft_type, "adapter_name", name, "is not a Child-Tuning adapter")
    p = config.reserve_p if reserve_p is None else reserve_p
    require(0 < p <= 1, "reserve_p", p, "must be in (0, 1]")
    adapters = child_adapters(model, name)
    deltas = [adapter.child_delta for _, adapter in adapters]
    saved = [(d.requires_grad, d.grad) for d in deltas]
    other_grads = {p: p.grad for p in model.parameters()}  # left as they were (heads get gradients too)
    fisher = [torch.zeros_like(d, dtype=torch.float32) for d in deltas]
    for adapter, delta in zip((a for _, a in adapters), deltas):
        adapter.expand()
        delta.requires_grad_(True)
        delta.grad = None
    seen = 0
    for batch in batches:
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        loss.backward()
        for total, delta in zip(fisher, deltas):
            if delta.grad is not None:
                total += delta.grad.float() ** 2
                delta.grad = None
        seen += 1
    if not seen:
        raise ValueError("estimate_fisher_mask needs at least one batch")
    flat = torch.cat([f.reshape(-1) for f in fisher])
    keep = max(1, math.ceil(p * flat.numel()))
    threshold = torch.kthvalue(flat.cpu(), flat.numel() - keep + 1).values.to(flat.device)
    masks = {}
    for (module_name, adapter), total, (requires_grad, grad) in zip(adapters, fisher, saved):
        adapter.child_mask = (total >= threshold).to(adapter.child_delta.dtype)
        adapter.child_delta.requires_grad_(requires_grad)
        adapter.child_delta.grad = grad
        masks[module_name] = adapter.child_mask
    for param, grad in other_grads.items():
        if all(param is not d for d in deltas):
            param.grad = grad
    return masks
