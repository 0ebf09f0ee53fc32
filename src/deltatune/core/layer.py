"""DeltaLayer: one wrapped base module holding any number of named adapters.

All multi-adapter bookkeeping lives here, once: which adapters are active, which are merged into the
base weight, mixed-adapter batches (one adapter per sample), and the merge/unmerge arithmetic. A method
only provides a single-adapter module that follows `DeltaAdapter`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

BASE_ADAPTER = "__base__"  # the name that selects the plain model for a sample in a mixed batch


class MergeError(RuntimeError):
    """A merge would write NaN/inf into the base weights; nothing was written."""


@runtime_checkable
class DeltaAdapter(Protocol):
    """What a method's single-adapter module provides.

    forward(x, base_out, base) -> the layer output with this adapter applied on top of `base_out`
    (x is the module's first input; for a block that returns a tuple, base_out is its first element).
    delta_weight(base) -> additive update in the base weight's layout (mergeable, additive methods);
    non-additive methods (DoRA, IA3, OFT) provide merged_weight(base, w) / unmerged_weight(base, w).
    An adapter with `uses_routing = True` also gets `routing=` (per-call data such as task ids); one with
    `adds_in_place = True` gets `owns_base_out=True` when base_out is the layer's own fresh output, which
    it may then update in place (other callers, such as fusion or X-LoRA, reuse base_out across calls).
    """

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: nn.Module) -> torch.Tensor: ...


class Routing:
    """Per-call state shared by every layer of one model: which adapter each sample uses, each sample's
    task id, and whether adapters are switched off (inside `DeltaModel.disable_adapter()`)."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None  # (batch,) slot into `names`; -1 = base model
        self.names: list[str] = []
        self.task_ids: torch.Tensor | None = None  # (batch,) for task-conditioned methods
        self.expand = 1  # how many times generate() repeats each input row (beams, num_return_sequences)
        self.disabled = False

    def rows(self, rows: torch.Tensor, batch: int) -> "Routing":
        """The per-sample data of some rows of a batch of `batch` (for adapters run on their own rows)."""
        sub = Routing()
        if self.task_ids is not None:
            sub.task_ids = self.per_sample(self.task_ids, batch, "task_ids")[rows]
        return sub

    def index_for(self, batch: int) -> torch.Tensor:
        """The per-sample slots for a layer that sees `batch` rows."""
        return self.per_sample(self.index, batch, "adapter_names")

    def per_sample(self, values: torch.Tensor, batch: int, what: str) -> torch.Tensor:
        """`values` (one per input row) for a layer that sees `batch` rows: the input rows themselves, or,
        inside generate(), each row repeated `expand` times in place (transformers' repeat_interleave; an
        encoder-decoder's encoder still sees the input rows). Any other count is an error: a shorter list is
        never stretched over the batch.

        Raises:
            ValueError: naming both lengths.
        """
        if batch == values.shape[0]:
            return values
        if batch == values.shape[0] * self.expand:
            return values.repeat_interleave(self.expand)
        repeated = f" (generate repeats each input row {self.expand} times)" if self.expand > 1 else ""
        raise ValueError(f"{what} has {values.shape[0]} entries but the batch has {batch} rows{repeated}; "
                         "give exactly one per input row")


def _quant_backend(base: nn.Module):
    """The quant/ backend storing `base`'s weight, or None. A plain float tensor never imports quant/, so
    float models do not load it (and core stays free of quantization libraries)."""
    weight = base.weight
    if type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point():
        return None
    from ..quant import backend_for

    return backend_for(base)


def is_quantized(base: nn.Module) -> bool:
    """Whether the base module stores its weight quantized (through quant/)."""
    return hasattr(base, "weight") and _quant_backend(base) is not None


def read_weight(base: nn.Module, copy: bool = True) -> torch.Tensor:
    """The base weight in float, in the base's own layout (the one place merges and weight-reading
    adapters read it). A quantized base is dequantized to a new float32 tensor. copy=True: a float32 copy
    the caller may modify; copy=False: read-only use (a forward), a float weight comes back as it is."""
    backend = _quant_backend(base)
    if backend is not None:
        return backend.dequantize(base)
    weight = base.weight.detach()
    return weight.float().clone() if copy else weight


def write_weight(base: nn.Module, weight: torch.Tensor) -> None:
    """Store a float32 weight back into the base, rounded once to its dtype; a quantized base is
    requantized (quant/ warns with the rounding error it measured)."""
    if _quant_backend(base) is not None:
        from ..quant import requantize_weight

        requantize_weight(base, weight)
        return
    base.weight.data.copy_(weight.to(base.weight.dtype))


def loftq_factors(weight: torch.Tensor, rank: int, scaling: float, loftq_config: dict | None):
    """LoftQ init of an out-first float weight: (lora_A, lora_B, dequantized Q); see quant/loftq.py."""
    from ..quant.loftq import loftq_factors as factors

    return factors(weight, rank, scaling, loftq_config)


class DeltaLayer(nn.Module):
    """Wraps one base module (`base_layer`) and routes its forward through active adapters."""

    def __init__(self, base_layer: nn.Module, routing: Routing, module_name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.module_name = module_name
        self.routing = routing
        self.train(base_layer.training)

    @property
    def weight(self) -> torch.Tensor:
        """The base module's weight: model code that reads `module.weight` (dtype checks) keeps working."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def disabled(self) -> bool:
        """Inside disable_adapter(): the model's shared flag, so a layer added inside the block is off too."""
        return self.routing.disabled

    # ---------------------------------------------------------------- forward
    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if self.disabled or not self.adapters:
            return out
        x = args[0] if args else next(iter(kwargs.values()))  # blocks are often called with keywords
        if isinstance(out, tuple):  # e.g. an attention block's (hidden, weights)
            return (self._run_adapters(x, out[0]), *out[1:])
        return self._run_adapters(x, out)

    def _run_adapters(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.routing.index is not None:
            return self._mixed_forward(x, out)
        for name in self.active:
            if name not in self.merged and name in self.adapters:
                out = self._call(self.adapters[name], x, out, owned=True)
        return out

    def _call(self, adapter: nn.Module, x: torch.Tensor, out: torch.Tensor,
              routing: Routing | None = None, owned: bool = False) -> torch.Tensor:
        """Run one adapter on `out`; `owned`: out is this layer's fresh output, read by nothing else."""
        if getattr(adapter, "uses_routing", False):
            return adapter(x, out, self.base_layer, routing=routing or self.routing)
        if owned and getattr(adapter, "adds_in_place", False):
            return adapter(x, out, self.base_layer, owns_base_out=True)
        return adapter(x, out, self.base_layer)

    def _mixed_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """One adapter per sample. Methods with a batched kernel (`mixed_forward`) get every sample in one
        call; others run once per distinct adapter on its rows. Never a loop over samples."""
        if self.merged:
            raise RuntimeError(f"{self.module_name}: mixed-adapter batches need unmerged adapters; "
                               f"call unmerge_adapter() first (merged: {self.merged})")
        index = self.routing.index_for(x.shape[0])
        adapters = [self.adapters[n] if n in self.adapters else None for n in self.routing.names]
        present = [a for a in adapters if a is not None]
        if not present:
            return base_out
        batched = getattr(type(present[0]), "mixed_forward", None)
        if batched is not None and all(type(a) is type(present[0]) for a in present):
            out = batched(adapters, x, base_out, self.base_layer, index)
            if out is not None:
                return out
        out = base_out.clone()
        for slot, adapter in enumerate(adapters):
            if adapter is None:
                continue
            rows = (index == slot).nonzero().flatten()
            if rows.numel():
                out[rows] = self._call(adapter, x[rows], base_out[rows], self.routing.rows(rows, x.shape[0]))
        return out

    # ---------------------------------------------------------------- merge
    def plan_merge(self, names: list[str]) -> tuple[list[str], torch.Tensor | None]:
        """The adapters still to merge and the float32 base weight with them merged; writes nothing.
        Already merged adapters are skipped, so merging twice is a no-op."""
        todo = [n for n in dict.fromkeys(names) if n not in self.merged and n in self.adapters]
        if not todo:
            return todo, None
        weight = read_weight(self.base_layer)
        for name in todo:
            weight = self._merged_weight(self.adapters[name], weight)
        return todo, weight

    def apply_merge(self, todo: list[str], weight: torch.Tensor, safe_merge: bool = False) -> None:
        """Write a planned merge. The update was computed in float32 and is rounded to the base dtype once."""
        if safe_merge and not torch.isfinite(weight).all():
            raise MergeError(f"merging adapter(s) {todo} into {self.module_name} gives NaN/inf weights; "
                             "the base weights were left unchanged")
        write_weight(self.base_layer, weight)
        self.merged.extend(todo)

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        todo, weight = self.plan_merge(names)
        if todo:
            self.apply_merge(todo, weight, safe_merge)

    def unmerge(self, keep: int = 0) -> None:
        """Undo merges newest first, leaving the first `keep` merged."""
        while len(self.merged) > keep:
            adapter = self.adapters[self.merged.pop()]
            weight = read_weight(self.base_layer)
            if hasattr(adapter, "unmerged_weight"):
                weight = adapter.unmerged_weight(self.base_layer, weight)
            else:
                weight = weight - adapter.delta_weight(self.base_layer).float()
            write_weight(self.base_layer, weight)

    def _merged_weight(self, adapter: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        if hasattr(adapter, "merged_weight"):
            return adapter.merged_weight(self.base_layer, weight)
        delta = adapter.delta_weight(self.base_layer)
        if delta is None:
            raise MergeError(f"{self.module_name}: adapter {type(adapter).__name__} cannot be merged")
        return weight + delta.float()

    # ---------------------------------------------------------------- bookkeeping
    def add(self, name: str, adapter: nn.Module) -> None:
        self.adapters[name] = adapter.train(self.base_layer.training)  # an eval model stays in eval

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"{self.module_name}: unmerge adapter {name!r} before deleting it")
        if name in self.adapters:
            del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={self.merged}"


class ModulesToSave(nn.Module):
    """A module trained in full (a classifier head, say): one trainable copy per adapter; the original
    stays untouched and serves the base model and disabled adapters."""

    def __init__(self, original_module: nn.Module, routing: Routing, module_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: list[str] = []
        self.module_name = module_name
        self.routing = routing
        self.copies.train(original_module.training)
        self.training = original_module.training

    disabled = DeltaLayer.disabled

    def add(self, name: str, copy: nn.Module) -> None:
        self.copies[name] = copy

    def remove(self, name: str) -> None:
        if name in self.copies:
            del self.copies[name]
        self.active = [n for n in self.active if n != name]

    def current(self) -> nn.Module:
        if not self.disabled:
            for name in self.active:
                if name in self.copies:
                    return self.copies[name]
        return self.original_module

    def forward(self, x: torch.Tensor, *args, **kwargs):
        if self.disabled or self.routing.index is None:
            return self.current()(x, *args, **kwargs)
        index = self.routing.index_for(x.shape[0])
        out = self.original_module(x, *args, **kwargs).clone()
        for slot, name in enumerate(self.routing.names):
            rows = (index == slot).nonzero().flatten()
            if name in self.copies and rows.numel():
                out[rows] = self.copies[name](x[rows], *args, **kwargs)
        return out
