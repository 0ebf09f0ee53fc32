"""HQQ backend (Half-Quadratic Quantization, Badri & Shaji 2023): calibration-free affine quantization
to 1, 2, 3, 4 or 8 bits in groups of `blocksize` along the input dimension, optimised per group (scale
and zero fitted by a half-quadratic solver). Used when the `hqq` package is installed:

    deltatune.quantize(model, "hqq4")          # or {"type": "hqq4", "blocksize": 64} / model.quantize: hqq4

A quantized layer is `HQQLinearLayer`: an nn.Linear (so every method treats it as a linear base, as it
does bitsandbytes' Linear4bit) whose forward is hqq's own `HQQLinear` (dequantize, then matmul in the
compute dtype, differentiable in the input) and whose `weight` is the packed codes, frozen. This file
only converts weights to and from float.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DeltaConfigError
from .backend import register_backend
from .spec import QuantSpec


def hqq_quantize():
    """hqq's quantize module, imported on first use, with one clear error when it is missing."""
    try:
        from hqq.core import quantize
    except ImportError as err:
        raise DeltaConfigError("quantize backend 'hqq' needs the hqq package: pip install hqq") from err
    return quantize


class HQQLinearLayer(nn.Linear):
    """An HQQ-quantized linear layer in nn.Linear's clothes."""

    def __init__(self, inner: nn.Module, bias: torch.Tensor | None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.hqq = inner
        self.compute_dtype = inner.compute_dtype
        self.weight = nn.Parameter(inner.W_q.data, requires_grad=False)  # the packed codes
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.hqq(x.to(self.compute_dtype))
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        meta = self.hqq.meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nbits={meta['nbits']}, group_size={meta['group_size']}")


def _config(spec: QuantSpec) -> dict:
    return hqq_quantize().BaseQuantizeConfig(nbits=spec.bits, group_size=spec.blocksize, axis=1)


def _quantized(weight: torch.Tensor, spec: QuantSpec, compute: torch.dtype) -> nn.Module:
    """hqq's HQQLinear holding float `weight` (out, in), no bias."""
    return hqq_quantize().HQQLinear.from_weights(weight.detach().float().clone(), None, _config(spec),
                                                 compute_dtype=compute, device=str(weight.device))


class HQQBackend:
    name = "hqq"

    def claims(self, module: nn.Module) -> bool:
        return type(module).__name__ == "HQQLinearLayer"

    def unsupported(self, linear: nn.Linear, spec: QuantSpec) -> str | None:
        if linear.in_features % spec.blocksize:
            return f"in_features {linear.in_features} is not a multiple of the group size {spec.blocksize}"
        if linear.weight.device.type == "meta":
            return "weights are on the meta device"
        return None

    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec) -> nn.Module:
        compute = spec.compute_dtype or linear.weight.dtype
        bias = None if linear.bias is None else linear.bias.detach().to(compute)
        return HQQLinearLayer(_quantized(linear.weight, spec, compute), bias).train(linear.training)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.hqq.dequantize().detach().float().reshape(module.out_features, module.in_features)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> tuple[float, float]:
        target = weight.detach().float()
        update = (target - self.dequantize(module)).norm()
        module.hqq = _quantized(target, self.spec_of(module), module.compute_dtype)
        module.weight = nn.Parameter(module.hqq.W_q.data, requires_grad=False)
        error = (self.dequantize(module) - target).norm()
        return (error / target.norm().clamp_min(1e-30)).item(), (error / update.clamp_min(1e-30)).item()

    def round_trip(self, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        if weight.shape[-1] % spec.blocksize:
            raise ValueError(f"rows of {weight.shape[-1]} values are not a multiple of the group size {spec.blocksize}")
        inner = _quantized(weight, spec, torch.float32)
        return inner.dequantize().float().reshape(weight.shape)

    def spec_of(self, module: nn.Module) -> QuantSpec:
        meta = module.hqq.meta
        return QuantSpec(f"hqq{meta['nbits']}", double_quant=False, blocksize=meta["group_size"],
                         compute_dtype=module.compute_dtype, backend=self.name)

    def storage_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        meta = module.hqq.meta
        return [module.hqq.W_q, *(t for t in (meta.get("scale"), meta.get("zero")) if isinstance(t, torch.Tensor))]


register_backend(HQQBackend())
