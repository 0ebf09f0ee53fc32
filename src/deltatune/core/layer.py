"""DeltaLayer: one wrapped base module holding any number of named adapters.

All multi-adapter bookkeeping lives here, once: which adapters are active, which are merged into the
base weight, mixed-adapter batches (one adapter per sample), and the merge/unmerge arithmetic. A method
only provides a single-adapter module that follows `DeltaAdapter`.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .merging import MergeError, check_merge, merge_order, merge_rule

BASE_ADAPTER = "__base__"  # the name that selects the plain model for a sample in a mixed batch


@runtime_checkable
class DeltaAdapter(Protocol):
    """What a method's single-adapter module provides.

    forward(x, base_out, base) -> the layer output with this adapter applied on top of `base_out`
    (x is the module's first input; for a block that returns a tuple, base_out is its first element).
    delta_weight(base) -> additive update in the base weight's layout (mergeable, additive methods);
    non-additive methods (DoRA, IA3, OFT) provide merged_weight(base, w) / unmerged_weight(base, w) and
    say how they compose with other adapters on the layer as `merge_rule` (core/merging.py); one with
    `merge_uses_reference = True` gets merged_weight(base, w, reference=...), the plain base parameters.
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

    def snapshot(self) -> "Routing":
        """This call's routing, kept for a checkpointed block's recompute in backward (core/checkpointing.py).
        Shallow: a call replaces the fields, never changes them in place."""
        return copy.copy(self)

    @contextlib.contextmanager
    def replaying(self, saved: "Routing"):
        """Route by `saved` inside (backward recomputes a checkpointed block after its call returned)."""
        current = self.snapshot()
        self.__dict__.update(saved.__dict__)
        try:
            yield
        finally:
            self.__dict__.update(current.__dict__)

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
        self._merged_deltas: dict[str, torch.Tensor] = {}  # f(W0) - W0 of reads_base adapters not merged first
        self._planned_deltas: dict[str, torch.Tensor] = {}
        # the base's other parameters as the current plan found them (discard_plan); None: no plan
        self._planned_restore: dict | None = None
        # (original base module,) while a merge writes into a private copy; a tuple, so it is no submodule
        self._tied: tuple[nn.Module] | None = None
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

    # ---------------------------------------------------------------- merge (order and rules: merging.py)
    def check_merge(self, names: list[str], shared: dict[str, list[str]] | None = None) -> None:
        """Raise MergeError if merging `names` cannot equal the unmerged forward; writes nothing.
        `shared`: this base module's parameters other modules hold (merging.shared_parameters)."""
        todo = self._todo(names)
        if not todo:
            return
        check_merge(self, todo)
        if shared and "weight" in shared and self._tied is None and _quant_backend(self.base_layer) is not None:
            raise MergeError(f"{self.module_name}.weight is quantized and shared with {shared['weight']}: merging "
                             f"{todo} would change those too, and a quantized weight cannot be copied to untie "
                             "it; nothing was written")

    def _todo(self, names: list[str]) -> list[str]:
        return [n for n in dict.fromkeys(names) if n not in self.merged and n in self.adapters]

    @torch.no_grad()
    def plan_merge(self, names: list[str], shared: dict[str, list[str]] | None = None
                   ) -> tuple[list[str], torch.Tensor | None]:
        """The adapters still to merge, in the order they merge, and the float32 base weight with them
        merged. Already merged adapters are skipped, so merging twice is a no-op. Parameters other
        modules hold (`shared`, see merging.shared_parameters) are untied first: this layer gets its own
        copies, and unmerging ties them again."""
        todo = self._todo(names)
        if not todo:
            return todo, None
        self.check_merge(todo, shared)
        if shared and self._tied is None:
            self._untie(shared)
        # BitFit, IA3 and LN tuning write the bias / norm parameters while planning: kept so a refused
        # plan (discard_plan) puts back every bit
        self._planned_restore = {name: (param, None if param is None else param.detach().clone())
                                 for name, param in self.base_layer._parameters.items() if name != "weight"}
        todo = merge_order(self, todo)
        reference = {"weight": read_weight(self.base_layer)}
        for name, param in self.base_layer.named_parameters(recurse=False):
            if name != "weight":
                reference[name] = param.detach().float().clone()
        weight = reference["weight"].clone()
        self._planned_deltas = {}
        for position, name in enumerate(todo):
            adapter = self.adapters[name]
            if merge_rule(adapter) == "reads_base" and position > 0:  # its forward adds f(W0) - W0
                delta = self._merged_weight(adapter, reference["weight"].clone(), reference) - reference["weight"]
                self._planned_deltas[name] = delta
                weight = weight + delta
            else:
                weight = self._merged_weight(adapter, weight, reference)
        return todo, weight

    @torch.no_grad()
    def discard_plan(self) -> None:
        """Undo what `plan_merge` wrote without merging: the base's other parameters (biases, norms) get
        their exact values back, a bias a plan created is removed, and untied parameters are tied again."""
        restore, self._planned_restore, self._planned_deltas = self._planned_restore, None, {}
        if restore is not None:
            for name in [n for n in self.base_layer._parameters if n != "weight" and n not in restore]:
                del self.base_layer._parameters[name]  # created by the plan (BitFit on a bias-free layer)
            for name, (param, value) in restore.items():
                self.base_layer._parameters[name] = param
                if param is not None:
                    param.data.copy_(value)
        self.unmerge(keep=len(self.merged))  # nothing merged: only ties again what planning untied

    def apply_merge(self, todo: list[str], weight: torch.Tensor, safe_merge: bool = False) -> None:
        """Write a planned merge. The update was computed in float32 and is rounded to the base dtype once."""
        if safe_merge and not torch.isfinite(weight).all():
            raise MergeError(f"merging adapter(s) {todo} into {self.module_name} gives NaN/inf weights; "
                             "the base weights were left unchanged")
        write_weight(self.base_layer, weight)
        self._planned_restore = None
        self.merged.extend(todo)
        self._merged_deltas.update(self._planned_deltas)
        self._planned_deltas = {}

    def merge(self, names: list[str], safe_merge: bool = False, shared: dict[str, list[str]] | None = None) -> None:
        try:
            todo, weight = self.plan_merge(names, shared)
            if todo:
                self.apply_merge(todo, weight, safe_merge)
        except MergeError:
            self.discard_plan()
            raise

    @torch.no_grad()
    def unmerge(self, keep: int = 0) -> None:
        """Undo merges newest first, leaving the first `keep` merged."""
        while len(self.merged) > keep:
            name = self.merged.pop()
            adapter = self.adapters[name]
            weight = read_weight(self.base_layer)
            if name in self._merged_deltas:
                weight = weight - self._merged_deltas.pop(name)
            elif hasattr(adapter, "unmerged_weight"):
                weight = adapter.unmerged_weight(self.base_layer, weight)
            else:
                weight = weight - adapter.delta_weight(self.base_layer).float()
            write_weight(self.base_layer, weight)
        if not self.merged and self._tied is not None:
            self._retie()

    def _merged_weight(self, adapter: nn.Module, weight: torch.Tensor, reference: dict) -> torch.Tensor:
        if hasattr(adapter, "merged_weight"):
            if getattr(adapter, "merge_uses_reference", False):
                return adapter.merged_weight(self.base_layer, weight, reference=reference)
            return adapter.merged_weight(self.base_layer, weight)
        delta = adapter.delta_weight(self.base_layer)
        if delta is None:
            raise MergeError(f"{self.module_name}: adapter {type(adapter).__name__} cannot be merged")
        return weight + delta.float()

    def _untie(self, shared: dict[str, list[str]]) -> None:
        """Give the base module its own copies of the parameters other modules hold (`shared`: name ->
        their paths), so a merge leaves those modules alone. `_retie` undoes it exactly: the shared
        parameters are never written."""
        module = self.base_layer
        held = "; ".join(f"{self.module_name}.{name} is also {', '.join(paths)}" for name, paths in shared.items())
        warnings.warn(f"{held}: merging gives {self.module_name} its own copy (untied), so the others keep "
                      "the base values; unmerging ties them again", stacklevel=4)
        private = copy.copy(module)  # shallow: a module used at several places stays shared elsewhere
        private._parameters = dict(module._parameters)
        for name in shared:
            param = module._parameters[name]
            private._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        self._tied = (module,)
        self.base_layer = private

    @property
    def untied(self) -> bool:
        """Whether a merge gave this layer its own copy of parameters other modules share."""
        return self._tied is not None

    def _retie(self) -> None:
        self.base_layer, self._tied = self._tied[0], None  # the original module, with the shared parameters

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
