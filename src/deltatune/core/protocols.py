"""The adapter contract: what a method's modules provide, as `typing.Protocol`s a method declares by subclassing.

Every method file defines one module per adapter per base layer, which declares the kinds it is:

    class LoraAdapter(nn.Module, Additive, Reparameterizing, Batched): ...

- `LayerAdapter` (all): `forward(x, base_out, base, call, owns_base_out=False)`, `merge_rule` and
  `merge_refusal()`.
- `Additive`: `delta_weight(base)`, the true update W' - W in the base weight's layout for every variant
  (DoRA included), so merged = W + delta_weight and combining adapters (compose/) sums updates.
- `Reparameterizing`: merged_weight / unmerged_weight for updates that are not a fixed addition (DoRA's
  magnitude, IA3's scaling, OFT's rotation, a bias or a norm written in place).
- `Batched`: `mixed_forward`, every row of a mixed-adapter batch through its own adapter in one call.
- `LowRank`: `factors()`, the live (A, B, scaling) of an update that is exactly scaling * B @ A (compose/
  mixes factors of such adapters: cat, linear, ties ...).
- `ModelLevel`: a module made once per adapter for the whole model (VeRA's shared projections, soft
  prompts), saved under `disk_prefix`; `TakesOverForward` also runs the wrapped model's forward and generate.

A layer adapter that is neither Additive nor Reparameterizing cannot be merged: its `merge_refusal()` says
why. `register_method` checks every declared protocol's members are really defined (not only inherited from
the protocol), so a missing piece is an error when the method's module is imported, never a silent
fallback at run time. Shared code asks the protocol (`declares(adapter, Additive)`: what the class declares,
checked at registration, and fast enough for a forward), never a method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import AdapterContractError

if TYPE_CHECKING:
    from .base import BaseLayer
    from .call import CallContext

MERGE_RULES = ("additive", "sequential", "reads_base", "unmergeable")  # how merges compose: core/merging.py


@runtime_checkable
class LayerAdapter(Protocol):
    """One adapter for one base module (what a config's `make_adapter` returns)."""

    merge_rule: str  # one of MERGE_RULES

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer, call: CallContext,
                owns_base_out: bool = False) -> torch.Tensor:
        """The layer's output with this adapter applied on top of `base_out`. x: the module's first input;
        for a block returning a tuple, base_out is its first element. `owns_base_out`: base_out is the
        layer's own fresh output, read by nothing else, which the adapter may update in place."""
        ...

    def merge_refusal(self) -> str | None:
        """Why this adapter cannot be merged now (checked before any layer is written), or None."""
        ...


@runtime_checkable
class Additive(LayerAdapter, Protocol):
    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        """W' - W in the base weight's layout (float), the whole effect of this adapter on the weight."""
        ...


@runtime_checkable
class Reparameterizing(LayerAdapter, Protocol):
    def merged_weight(self, base: BaseLayer, weight: torch.Tensor, reference: dict[str, torch.Tensor]
                      ) -> torch.Tensor:
        """The weight (float, base layout) with this adapter merged into `weight`; `reference` holds the
        plain base parameters by name (a norm-based update reads the unmerged W0). May write the base's other
        parameters (bias, norm) in place; core restores them if the merge is refused."""
        ...

    def unmerged_weight(self, base: BaseLayer, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of merged_weight on the current (merged) weight."""
        ...


@runtime_checkable
class Batched(LayerAdapter, Protocol):
    @staticmethod
    def mixed_forward(adapters: list, x: torch.Tensor, base_out: torch.Tensor, base: BaseLayer,
                      index: torch.Tensor, call: CallContext) -> torch.Tensor | None:
        """Every row through its own adapter in one call: `adapters[slot]` (same class, or None where a slot
        has no adapter on this layer), `index` (batch,) slot per row (-1: the base model). None when this
        call's adapters or input need the per-adapter path (core then runs each adapter on its rows)."""
        ...


@runtime_checkable
class LowRank(LayerAdapter, Protocol):
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The live factors (A (r, in, ...), B (out, r, ...), scaling) when delta_weight is exactly
        scaling * B @ A (out-first); writing into A and B changes the adapter. None when this adapter's update
        is more than that product (DoRA's magnitude)."""
        ...


@runtime_checkable
class ModelLevel(Protocol):
    """A module made once per adapter for the whole model (`make_model_adapter`)."""

    disk_prefix: str  # saved as disk_prefix + its state-dict names (io/keymap.py)


@runtime_checkable
class TakesOverForward(ModelLevel, Protocol):
    """A model-level adapter that runs the wrapped model's forward and generate (prompts, prefixes, X-LoRA)."""

    def forward_model(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any: ...

    def generate_model(self, model: nn.Module, *args: Any, **kwargs: Any) -> Any: ...

    def call_state(self) -> tuple[tuple[torch.Tensor, ...], Callable | None]:
        """What a checkpointed block's recompute in backward must see again: (tensors, replay) where
        `replay(tensors)` is a context manager restoring the per-call state (hooks, gates) with `tensors`
        in place of the captured ones; ((), None) when there is none (core/checkpointing.py)."""
        ...


LAYER_PROTOCOLS = (LayerAdapter, Additive, Reparameterizing, Batched, LowRank)
MODEL_PROTOCOLS = (ModelLevel, TakesOverForward)


def protocol_members(protocol: type) -> list[str]:
    """The names a protocol declares itself: its annotations and its public functions."""
    names = list(protocol.__dict__.get("__annotations__", {}))
    names += [n for n, v in protocol.__dict__.items()
              if not n.startswith("_") and (callable(v) or isinstance(v, (staticmethod, classmethod)))]
    return list(dict.fromkeys(names))


def declared_protocols(cls: type) -> list[type]:
    """The protocols in `cls`'s bases (what it declares it is)."""
    return [p for p in cls.__mro__ if p in LAYER_PROTOCOLS + MODEL_PROTOCOLS]


def declares(adapter: object, protocol: type) -> bool:
    """Whether `adapter` (an instance or a class) declares `protocol` among its bases."""
    return protocol in (adapter if isinstance(adapter, type) else type(adapter)).__mro__


def check_adapter_class(cls: type, expected: type) -> None:
    """Raise AdapterContractError unless `cls` declares `expected` (LayerAdapter or ModelLevel) and defines
    every member of every protocol it declares outside the protocols themselves.

    Raises:
        AdapterContractError: naming the class, the protocol and the missing member.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and expected in cls.__mro__):
        raise AdapterContractError(f"{getattr(cls, '__name__', cls)!r} must be an nn.Module declaring "
                                   f"{expected.__name__} (core/protocols.py)")
    protocols = declared_protocols(cls)
    for protocol in protocols:
        for name in protocol_members(protocol):
            owner = next((k for k in cls.__mro__ if name in k.__dict__), None)
            if owner is None or owner in protocols or owner is nn.Module:  # nn.Module.forward raises
                raise AdapterContractError(f"{cls.__name__} declares {protocol.__name__} but does not define "
                                           f"{name!r} (core/protocols.py)")
    rule = cls.__dict__.get("merge_rule") if "merge_rule" in cls.__dict__ else None
    if isinstance(rule, str) and rule not in MERGE_RULES:
        raise AdapterContractError(f"{cls.__name__}.merge_rule={rule!r} is not one of {MERGE_RULES}")
