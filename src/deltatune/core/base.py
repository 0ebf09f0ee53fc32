"""The base-layer view: the one place that knows how a wrapped module stores and computes its weight.

Core builds one `BaseLayer` per wrapped module (`DeltaLayer.base`) and hands it to the method in place of
the module; a method never looks at the module's class, storage or dtype itself. What only this file knows:
- layout: nn.Linear stores its weight (out, in); Transformers' Conv1D (GPT-2 style) stores it (in, out)
  (`fan_in_fan_out`); `to_out_first` / `from_out_first` convert;
- kind: "linear" (nn.Linear, Conv1D, quantized linear layers), "embedding", "conv" (nn.Conv1d/2d/3d),
  "other" (norms, whole blocks);
- quantized storage (quant/ backends: bitsandbytes, HQQ): `is_quantized`, the `compute_dtype` adapters are
  built in, reading and writing the effective float weight (dequantize, requantize once), LoftQ init;
- whether the module's forward returns a whole fresh tensor an adapter may add into in place
  (`output_is_fresh`: Conv1D returns a view of its addmm result).
Other attributes (padding_idx, groups, stride, eps, ...) read through to the module; calling the view
calls the module.

Adding a quantization backend touches quant/ and, only if its layers keep the compute dtype elsewhere,
`compute_dtype` here (docs/adding-a-backend.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import backend as quant
from ..quant.loftq import loftq_factors

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_conv1d(module: nn.Module) -> bool:
    """Transformers' Conv1D (GPT-2, GPT-J heads ...): a linear layer whose weight is stored (in, out). Found by
    class name so core never imports Transformers."""
    return type(module).__name__ == "Conv1D"


def float_weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges compute in: float32, or float64 for a float64 weight (never rounds it down)."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` stores its weight through a quant/ backend. A plain float weight never asks quant/."""
    weight = getattr(module, "weight", None)
    if weight is None or (type(weight) in (nn.Parameter, torch.Tensor) and weight.is_floating_point()):
        return False
    return quant.backend_for(module) is not None


def read_weight(module: nn.Module, copy: bool = True) -> torch.Tensor:
    """`BaseLayer(module).read_weight(copy)`: the effective float weight of a (possibly quantized) module."""
    return BaseLayer(module).read_weight(copy)


def write_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """`BaseLayer(module).write_weight(weight)`: store a float weight, requantizing a quantized module."""
    BaseLayer(module).write_weight(weight)


class BaseLayer:
    """The view of one base module an adapter wraps. Cheap to build; `DeltaLayer.base` keeps one per module.

    Attributes:
        module: the wrapped nn.Module itself.
        kind: "linear" | "embedding" | "conv" | "other".
        fan_in_fan_out: the weight is stored (in, out) (Transformers' Conv1D).
        is_quantized: the weight is stored by a quant/ backend (packed, not a float matrix).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.is_quantized = is_quantized(module)
        self._backend = quant.backend_for(module) if self.is_quantized else None
        self.fan_in_fan_out = is_conv1d(module)
        if (isinstance(module, nn.Linear) or self.fan_in_fan_out
                or (self.is_quantized and hasattr(module, "in_features"))):
            self.kind = "linear"
        elif isinstance(module, nn.Embedding):
            self.kind = "embedding"
        elif isinstance(module, CONVS):
            self.kind = "conv"
        else:
            self.kind = "other"

    def __getattr__(self, name: str):
        if name == "module":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.module, name)

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"BaseLayer({type(self.module).__name__}, kind={self.kind}, quantized={self.is_quantized})"

    # ---------------------------------------------------------------- shapes and dtypes
    @property
    def weight(self) -> torch.Tensor:
        """The module's weight as stored (packed when quantized: read `read_weight()` for the float matrix)."""
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)

    @property
    def in_features(self) -> int:
        """Input width of a linear kind (Conv1D: its weight's first dimension)."""
        if self.fan_in_fan_out:
            return self.module.weight.shape[0]
        return self.module.in_features

    @property
    def out_features(self) -> int:
        if self.fan_in_fan_out:
            return self.module.weight.shape[1]
        return self.module.out_features

    @property
    def device(self) -> torch.device:
        weight = getattr(self.module, "weight", None)
        if weight is not None:
            return weight.device
        return next(self.module.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the module computes in, which adapters are built in: a float weight's dtype; a quantized
        layer's compute dtype (float32 when it names none); for a block ("other"), its first float parameter's
        dtype or a quantized submodule's compute dtype."""
        weight = getattr(self.module, "weight", None)
        if weight is not None and not self.is_quantized and weight.is_floating_point():
            return weight.dtype
        if self.is_quantized:
            compute = getattr(self.module, "compute_dtype", None)
            return compute if isinstance(compute, torch.dtype) else torch.float32
        for sub in self.module.modules():
            compute = getattr(sub, "compute_dtype", None)
            if isinstance(compute, torch.dtype):
                return compute
        return next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)

    @property
    def factory(self) -> dict:
        """`device=` and `dtype=` for an adapter's new tensors: the module's device and compute dtype."""
        return {"device": self.device, "dtype": self.compute_dtype}

    @property
    def output_is_fresh(self) -> bool:
        """The module's forward returns a whole, contiguous tensor that nothing else holds, so the layer's own
        caller may add into it in place (nn.Linear, quantized linear layers; not Conv1D, whose output is a
        view of its addmm result, which autograd would rebase wrongly through a custom function)."""
        return self.kind == "linear" and not self.fan_in_fan_out

    # ---------------------------------------------------------------- the effective weight
    def to_out_first(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight in this module's layout -> (out, in, ...): Conv1D's (in, out) is transposed."""
        return weight.T if self.fan_in_fan_out else weight

    from_out_first = to_out_first  # a transpose is its own inverse

    def read_weight(self, copy: bool = True) -> torch.Tensor:
        """The effective float weight in the module's own layout (the one place merges and weight-reading
        adapters read it). A quantized module is dequantized to a new float32 tensor. copy=True: a copy in
        `float_weight_dtype` the caller may modify; copy=False: read-only use (a forward), a float weight
        comes back as it is."""
        if self._backend is not None:
            return self._backend.dequantize(self.module)
        weight = self.module.weight.detach()
        return weight.to(float_weight_dtype(weight.dtype), copy=True) if copy else weight

    def merge_reference(self) -> dict[str, torch.Tensor]:
        """The plain base parameters by name, as float copies (`read_weight` for the weight): what merges hand a
        reparameterizing adapter as `reference` (core/layer.py plan_merge, compose/extract.py)."""
        reference = {"weight": self.read_weight()}
        for name, param in self.module.named_parameters(recurse=False):
            if name != "weight":
                reference[name] = param.detach().to(float_weight_dtype(param.dtype), copy=True)
        return reference

    def write_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` (the module's layout) back, rounded once to the stored dtype; a quantized module is
        requantized (quant/ warns with the rounding error it measured)."""
        if self._backend is not None:
            quant.requantize_weight(self.module, weight)
            return
        self.module.weight.data.copy_(weight.to(self.module.weight.dtype))

    @torch.no_grad()
    def loftq_init(self, rank: int, scaling: float, loftq_config: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """LoftQ (Li et al. 2023, arXiv:2310.08659): (lora_A (rank, in), lora_B (out, rank)) fitted with the
        quantized weight Q so that Q + scaling * B @ A approximates W; the module's weight becomes dequant(Q)."""
        weight = self.to_out_first(self.read_weight())  # (out, in)
        lora_a, lora_b, quantized = loftq_factors(weight, rank, scaling, loftq_config)
        self.write_weight(self.from_out_first(quantized))
        return lora_a, lora_b

    def parameter_counts(self) -> dict[int, int]:
        """How many values each parameter stands for, by id: a quantized weight counts as its float matrix."""
        if self._backend is None:
            return {id(p): p.numel() for p in self.module.parameters(recurse=False)}
        return quant.parameter_counts(self.module)


# ---------------------------------------------------------------- whole models (what quant/ does not know)
# core's wrappers (core/layer.py DeltaLayer, ModulesToSave; core/model.py DeltaModel) keep what they add under
# these attribute names: adapters, trained head copies (and the original head they stand for), model-level
# adapters. None of it is a base module.
WRAPPER_OWNED = ("adapters", "copies", "original_module", "model_adapters")


def base_modules(model: nn.Module):
    """(path, name, module) for every base module of `model`: what is inside core's wrappers' adapters, head
    copies and model-level adapters is left out; `name` drops the `.base_layer` hops wrapping put into
    `path`, so it is the name in the user's model. quant.quantize walks this (installed below)."""
    for path, module in model.named_modules():
        if any(part in WRAPPER_OWNED for part in path.split(".")):
            continue
        yield path, path.replace(".base_layer.", ".").removesuffix(".base_layer"), module


quant.set_module_walk(base_modules)


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Every quantized linear layer of `model` (also under adapters' wrappers) replaced by a float nn.Linear
    holding its dequantized weight, in place; returns `model` (quant.dequantize; a float export merges exactly)."""
    return quant.dequantize(model, dtype)
