"""The quantization-backend contract and the model-level operations built on it.

A backend stores a linear layer's weight in a few bits and gives it back in float. Everything else in
deltatune sees quantization only through four calls, so M methods and N backends stay M + N:

    backend.claims(module)              is this module's weight stored by me?
    backend.dequantize(module)          -> float32 weight (out, in), a new tensor
    backend.requantize(module, weight)  store a float weight again (merge, unmerge); returns the error
    backend.round_trip(weight, spec)    quantize and dequantize a float tensor (LoftQ)

Methods never call these: core's base-layer view (core/base.py: `read_weight` / `write_weight`) does, and a
method's forward runs on top of the quantized module's own forward (its `base_out`).

quant/ is a leaf: it imports torch, its libraries and deltatune.errors / deltatune.naming, never core. Which
of a model's modules `quantize` may replace is a `ModuleWalk`; core, which wraps base modules in its own
layers, installs the walk that knows those wrappers when it is imported (core/base.py `base_modules`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import DeltaConfigError
from ..naming import name_matches, output_head_names
from .spec import BACKEND_TYPES, QUANT_TYPES, QuantSpec  # noqa: F401  (re-exported)


class QuantizedMergeWarning(UserWarning):
    """A merge or unmerge wrote into a quantized weight, which rounds the result once more."""


@runtime_checkable
class QuantBackend(Protocol):
    """What a quantization backend provides (see the module docstring)."""

    name: str

    def claims(self, module: nn.Module) -> bool: ...

    def unsupported(self, linear: nn.Linear, spec: QuantSpec) -> str | None:
        """Why this float layer cannot be quantized here (None when it can)."""

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec) -> nn.Module: ...

    def dequantize(self, module: nn.Module) -> torch.Tensor: ...

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> tuple[float, float]:
        """Store `weight`; return the rounding error ||stored - weight|| relative to ||weight|| and
        relative to the update written (||weight - previous||)."""

    def round_trip(self, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor: ...

    def spec_of(self, module: nn.Module) -> QuantSpec: ...

    def storage_tensors(self, module: nn.Module) -> list[torch.Tensor]: ...


# (path, name) of each module `quantize` may replace: `path` for model.get_submodule, `name` the module's name in
# the user's model for the skip and head rules (the two differ under a wrapper that moved the module)
ModuleWalk = Callable[[nn.Module], Iterable[tuple[str, str, nn.Module]]]


def plain_modules(model: nn.Module) -> Iterable[tuple[str, str, nn.Module]]:
    """Every module of `model`, its path as its name: the walk of a model that nothing has wrapped."""
    for path, module in model.named_modules():
        yield path, path, module


@dataclass
class _Registry:
    backends: dict[str, QuantBackend] = field(default_factory=dict)
    walk: ModuleWalk = plain_modules
    merge_errors: list[tuple[str, float, float]] = field(default_factory=list)
    warned: set = field(default_factory=set)


_STATE = _Registry()


def register_backend(backend: QuantBackend) -> QuantBackend:
    """Make a backend available under `backend.name`; `backend_for` asks every one in turn."""
    _STATE.backends[backend.name] = backend
    return backend


def get_backend(name: str) -> QuantBackend:
    if name not in _STATE.backends:
        raise DeltaConfigError(f"quantize backend={name!r}: not available; available: {sorted(_STATE.backends)}")
    return _STATE.backends[name]


def set_module_walk(walk: ModuleWalk) -> None:
    """Make `quantize` visit the modules `walk(model)` yields. Called once by core (core/base.py) when it is
    imported: its wrappers hold adapters, trained head copies and model-level adapters that stay float, and
    a wrapped base module is matched by its own name. Until then no model can hold a wrapper, so the plain
    walk is exact."""
    _STATE.walk = walk


def backend_for(module: nn.Module) -> QuantBackend | None:
    """The backend that stores `module`'s weight, or None when it is an ordinary float module."""
    for backend in _STATE.backends.values():
        if backend.claims(module):
            return backend
    return None


# ---------------------------------------------------------------- one layer (what core/layer.py calls)
def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a new float32 tensor, (out, in)."""
    backend = backend_for(module)
    if backend is None:
        return module.weight.detach().float().clone()
    return backend.dequantize(module)


def requantize_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Store float `weight` into a quantized module, and warn once per quantization type with the
    rounding error this measured. Every layer's error is kept: see `merge_errors()`.

    Why the warning matters: one 4-bit step is about 10% of a weight block's range, while a trained LoRA
    update is typically about 1% of the weight, so requantizing rounds most of a merged update away
    (the stored weight moves by well under one step). The error relative to the weight is small (about
    the update's own size, never more than a fresh quantization's); relative to the update it is near
    100% for 4-bit and smaller for int8. Merged float export: `dequantize(model)` first."""
    backend = backend_for(module)
    spec = backend.spec_of(module)
    of_weight, of_update = backend.requantize(module, weight)
    label = f"{spec.type}{'+dq' if spec.double_quant and spec.bits == 4 else ''}"
    _STATE.merge_errors.append((label, of_weight, of_update))
    if label not in _STATE.warned:
        _STATE.warned.add(label)
        warnings.warn(f"writing a merged weight into a {label} base requantizes it: the rounding error is "
                      f"{of_weight:.1e} of the weight's norm and {of_update:.0%} of the update's norm in this "
                      "layer (others are alike; deltatune.quant.merge_errors() lists all), so the merged model "
                      "differs from the unmerged one by up to that much of the adapter's effect. For an exact "
                      "merge into a float model call deltatune.quant.dequantize(model) first.",
                      QuantizedMergeWarning, stacklevel=3)


def merge_errors(clear: bool = False) -> list[tuple[str, float, float]]:
    """(type, error / ||weight||, error / ||update||) of every requantized write since the last clear;
    clear=True also starts a new report (the next requantized write warns again)."""
    errors = list(_STATE.merge_errors)
    if clear:
        _STATE.merge_errors.clear()
        _STATE.warned.clear()
    return errors


def round_trip(weight: torch.Tensor, spec: str | dict | QuantSpec) -> torch.Tensor:
    """`weight` (out, in) quantized with `spec` and dequantized: what a layer quantized that way holds."""
    spec = QuantSpec.parse(spec)
    return get_backend(spec.backend).round_trip(weight, spec)


def is_quantized(module: nn.Module) -> bool:
    return backend_for(module) is not None


# ---------------------------------------------------------------- whole models
def parse_quantize(value: Any, **overrides: Any) -> tuple[QuantSpec | None, list[str] | str | None]:
    """(spec, skip) from a `quantize` value: None / False / "none" (no quantization), "nf4" | "fp4" |
    "int8", a dict of QuantSpec fields plus an optional "skip", or a QuantSpec. Raises DeltaConfigError
    naming the bad field, so a training config can check `model.quantize` before loading anything."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in ("none", "")):
        return None, None
    skip = None
    if isinstance(value, dict):
        value = dict(value)
        skip = value.pop("skip", None)
    return QuantSpec.parse(value, **overrides), skip


def quantize(model: nn.Module, spec: str | dict | QuantSpec | None = "nf4", double_quant: bool | None = None,
             skip: list[str] | str | None = None, compute_dtype: torch.dtype | None = None,
             quantize_head: bool = False) -> nn.Module:
    """Quantize the float linear layers of `model` in place and return it.

    Embeddings stay in float (only linear layers are quantized) and so does the output head unless
    `quantize_head=True`. Layers inside a DeltaModel's adapters are never touched; the base layers that
    adapters wrap are (the walk core installs: `set_module_walk`).

    Args:
        model: a Transformers model, a DeltaModel, or any nn.Module.
        spec: "nf4", "fp4", "int8" (bitsandbytes), "hqq1".."hqq8" (HQQ), a dict with those QuantSpec fields
            (as the `model.quantize` training key gives it, optionally with "skip"), a QuantSpec, or None /
            "none" for no quantization.
        double_quant: overrides the spec's double quantization (4-bit only).
        skip: module names to keep in float: a list (exact name or dotted suffix) or a regex.
        compute_dtype: overrides the spec's compute dtype.
        quantize_head: quantize the output head too.

    Returns:
        `model`, with quantized layers. Layers the backend cannot quantize here are left in float with one
        warning that names them and why.
    """
    spec, spec_skip = parse_quantize(spec, double_quant=double_quant, compute_dtype=compute_dtype)
    if spec is None:
        return model
    skip = spec_skip if skip is None else skip
    backend = get_backend(spec.backend)
    heads = set() if quantize_head else {h.split(".")[-1] for h in output_head_names(model)}
    left_float: dict[str, str] = {}
    for path, name, module in list(_STATE.walk(model)):
        if type(module) is not nn.Linear:
            continue
        if path.split(".")[-1] in heads or name.split(".")[-1] in heads:
            continue
        if skip and (name_matches(skip, path) or name_matches(skip, name)):
            continue
        reason = backend.unsupported(module, spec)
        if reason:
            left_float[name] = reason
            continue
        _replace(model, path, backend.quantize_linear(module, spec))
    if left_float:
        shown = ", ".join(f"{n} ({r})" for n, r in list(left_float.items())[:6])
        more = f" and {len(left_float) - 6} more" if len(left_float) > 6 else ""
        warnings.warn(f"quantize({spec.type}): left {len(left_float)} linear layer(s) in float: {shown}{more}",
                      stacklevel=2)
    return model


def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized linear layer of `model` (also under adapters' DeltaLayers) with a float
    nn.Linear holding its dequantized weight, in place; returns `model`. Merging afterwards is exact,
    which is the way to export a merged float model from a QLoRA model:
    `quant.dequantize(model); model.merge_and_unload().save_pretrained(out)`."""
    for name, module in list(model.named_modules()):
        backend = backend_for(module)
        if backend is None:
            continue
        spec = backend.spec_of(module)
        target = dtype or spec.compute_dtype or torch.float32
        weight = backend.dequantize(module)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(weight.to(target), requires_grad=False)
        if module.bias is not None:
            linear.bias = nn.Parameter(module.bias.detach().to(target), requires_grad=module.bias.requires_grad)
        linear.train(module.training)
        _replace(model, name, linear)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take: parameters, buffers and quantization statistics, each storage
    counted once (tied weights are one)."""
    seen: dict[tuple, int] = {}

    def add(tensor: torch.Tensor | None) -> None:
        if tensor is None or tensor.device.type == "meta":
            return
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        seen[key] = tensor.numel() * tensor.element_size()

    for module in model.modules():
        backend = backend_for(module)
        if backend is not None:
            for tensor in backend.storage_tensors(module):
                add(tensor)
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            add(tensor)
    return sum(seen.values())


def parameter_counts(module: nn.Module) -> dict[int, int]:
    """How many parameters each of a quantized module's parameters stands for, by `id(parameter)`.

    The quantized weight counts as the float (out, in) weight it stores: its packed storage holds 2
    (NF4/FP4 in uint8), 4 (in a bf16 `quant_storage`) or 8/bits (HQQ) values per element, so its
    `numel()` would make the count depend on the backend. Parameters that are part of the same
    quantized storage (HQQ's inner `W_q`, which `weight` aliases) count 0; the rest (bias) count their
    `numel()`. peft counts a quantized base the same way.

    Raises:
        ValueError: `module` is not stored by a registered backend.
    """
    backend = backend_for(module)
    if backend is None:
        raise ValueError(f"{type(module).__name__} is not a quantized module")
    storage = {id(t) for t in backend.storage_tensors(module)}
    counts = {}
    for param in module.parameters():
        if param is module.weight:
            counts[id(param)] = module.out_features * module.in_features
        else:
            counts[id(param)] = 0 if id(param) in storage else param.numel()
    return counts


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


__all__ = ["QUANT_TYPES", "QuantBackend", "QuantSpec", "QuantizedMergeWarning", "backend_for", "dequantize",
           "dequantize_weight", "get_backend", "is_quantized", "merge_errors", "parameter_counts",
           "parse_quantize", "quantize", "register_backend", "requantize_weight", "round_trip",
           "set_module_walk", "weight_bytes"]
