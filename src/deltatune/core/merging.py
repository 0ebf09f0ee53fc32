"""Merge planning: in which order adapters fold into one layer's weight, which merges would change the
output (refused before anything is written), and which base weights are shared by several modules.

What the unmerged forward computes decides the merged weight. With W0 the plain base weight and W' the
layer's weight after the adapters before this one, each adapter's forward is one of three rules
(`merge_rule`):

    "additive"    W' + delta            LoRA, LoHa, LoKr, VeRA, AdaLoRA, Child-Tuning, BitFit (bias)
    "reads_base"  W' + (f(W0) - W0)     OFT, BOFT, IA3 on feed-forward inputs: the forward adds
                                        f(W0) x - W0 x, computed from the base weight, to what came before
    "sequential"  g(W')                 DoRA (m / ||W0 + delta|| times the output so far plus delta),
                                        IA3 on outputs (l times the output so far), LN tuning (replaces it)

Additive and reads_base updates commute, so in the run of them that opens a layer's merge order the
reads_base adapter goes first: it then acts on W0 itself and its exact inverse restores W0 on unmerge.
A reads_base adapter anywhere else adds f(W0) - W0, which the layer keeps (a float32 copy of the weight's
size) so unmerge can take it out again. A sequential adapter's DoRA norm is taken from W0 (the
`reference` the layer passes), as in the forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import DeltaConfigError, MergeError
from .protocols import MERGE_RULES, LayerAdapter

if TYPE_CHECKING:
    from .layer import DeltaLayer


def merge_rule(adapter: LayerAdapter) -> str:
    """How `adapter`'s update composes with the adapters before it on the same layer (see above): the
    `merge_rule` every adapter declares (core/protocols.py)."""
    rule = adapter.merge_rule
    if rule not in MERGE_RULES:
        raise ValueError(f"{type(adapter).__name__}.merge_rule={rule!r}; expected one of {MERGE_RULES}")
    return rule


def nonfinite_refusal(adapter: nn.Module) -> str | None:
    """`merge_refusal` of adapters that write base parameters besides the weight (BitFit, IA3, LN
    tuning): trained values with NaN/inf are refused before any layer is merged."""
    bad = [n for n, p in adapter.named_parameters() if not torch.isfinite(p).all()]
    return f"its trained values {bad} hold NaN/inf" if bad else None


def merge_order(layer: DeltaLayer, todo: list[str]) -> list[str]:
    """The order `todo` is merged in: the layer's active order (the unmerged forward's), others after,
    with the reads_base adapters of the opening run of additive / reads_base ones moved to its front."""
    ordered = [n for n in layer.active if n in todo] + [n for n in todo if n not in layer.active]
    rules = {n: merge_rule(layer.adapters[n]) for n in ordered}
    lead = 0
    while lead < len(ordered) and rules[ordered[lead]] != "sequential":
        lead += 1
    opening = ordered[:lead]
    return ([n for n in opening if rules[n] == "reads_base"] + [n for n in opening if rules[n] == "additive"]
            + ordered[lead:])


def check_merge(layer: DeltaLayer, todo: list[str]) -> None:
    """Raise MergeError, before anything is written, when merging `todo` into `layer` would give other
    outputs than the unmerged forward of the same adapters. Only additive updates may be merged on top of
    earlier merges, or merged while other active adapters on the layer stay unmerged: every other rule
    reads the unmerged base weight or the output so far, which a merge changes. An adapter says why it
    cannot be merged at all through `merge_refusal()` -> reason or None (asked here, so the refusal comes
    before any layer is written); an "unmergeable" adapter always gives one."""
    for name in todo:  # an adapter may refuse on its own (no default task, NaN/inf trained values)
        adapter = layer.adapters[name]
        reason = adapter.merge_refusal()
        if reason is None and merge_rule(adapter) == "unmergeable":
            reason = f"{type(adapter).__name__} has no weight update to merge"
        if reason:
            raise MergeError(f"{layer.module_name}: adapter {name!r} cannot be merged: {reason}; nothing was written")
    rules = {n: merge_rule(a) for n, a in layer.adapters.items()}
    after = layer.merged + todo
    if layer.merged:
        order_bound = [n for n in after if rules[n] != "additive"]
        if order_bound:
            raise MergeError(f"{layer.module_name}: cannot merge {todo} on top of the already merged "
                             f"{layer.merged}: {order_bound} ({', '.join(rules[n] for n in order_bound)}) depend on "
                             "the unmerged base weight; call unmerge_adapter() and merge them together")
    left = [n for n in layer.active if n in layer.adapters and n not in after]
    order_bound = [n for n in after + left if rules[n] != "additive"]
    if left and order_bound:
        raise MergeError(f"{layer.module_name}: merging {todo} while the active adapters {left} stay unmerged "
                         f"would change the output ({order_bound} are not additive); merge all active "
                         "adapters together (merge_adapter()) or deactivate the others first")


def parameter_holders(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every path it is reachable at in `model` (tied or reused parameters have several)."""
    holders: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{path}.{name}" if path else name)
    return holders


def refuse_shared_targets(model: nn.Module, bases: dict[str, nn.Module], what: str) -> None:
    """Raise DeltaConfigError if a target's weight (`bases`: module name -> base module) is also held by
    another module: `what` (an init that rewrites the weight) would change that module too."""
    holders = parameter_holders(model)
    for name, base in bases.items():
        own = {f"{name}.weight", f"{name}.base_layer.weight"}
        others = [p for p in holders.get(id(getattr(base, "weight", None)), []) if p not in own]
        if others:
            raise DeltaConfigError(f"target module {name!r} shares its weight with {others}: {what} rewrites "
                                   "that weight and would change them too; leave it out of target_modules")


def shared_parameters(model: nn.Module, layers: list[DeltaLayer]) -> dict[DeltaLayer, dict[str, list[str]]]:
    """For each layer whose base module's own parameters other modules of `model` also hold (tied input
    embeddings and output head, one module used at two places): {parameter name: the other holders'
    paths}. Found by parameter identity over the whole model."""
    holders = parameter_holders(model)
    own: dict[int, set[str]] = {id(layer): set() for layer in layers}  # each layer's own path(s) to its base
    for path, module in model.named_modules(remove_duplicate=False):
        if id(module) in own:
            own[id(module)].add(f"{path}.base_layer" if path else "base_layer")
    shared = {}
    for layer in layers:
        found = {}
        for name, param in layer.base_layer._parameters.items():
            if param is None:
                continue
            mine = {f"{p}.{name}" for p in own[id(layer)]}
            others = [p for p in holders.get(id(param), []) if p not in mine]
            if others:
                found[name] = others
        if found:
            shared[layer] = found
    return shared
