"""bitsandbytes backend: NF4 / FP4 (blockwise, optional double quantization) and LLM.int8 row-wise.

Quantized layers are bitsandbytes' own `Linear4bit` / `Linear8bitLt`, the same classes Transformers
builds for a `BitsAndBytesConfig`, so a model loaded that way and one quantized by `deltatune.quantize`
are handled alike (and `peft` can wrap either). Their forward and backward are bitsandbytes' kernels;
this file only converts weights to and from float.

CPU notes (bitsandbytes 0.50):
- its CPU 4-bit dequantize kernel mis-reads rows that are not a whole number of blocks, so on CPU a
  layer whose in_features is not a multiple of the block size is left in float (with a warning);
- in eval mode without grad, `Linear4bit` on AVX512-BF16 CPUs repacks its weight once into a bf16
  layout (bf16 scales, bf16 matmul). Layers made here switch that off so eval and training run the same
  float path and merges round-trip; layers loaded by Transformers keep it, and `dequantize` reads both.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .backend import register_backend
from .spec import QuantSpec

_bnb = None


def bnb():
    """bitsandbytes, imported on first use (importing it costs about a second)."""
    global _bnb
    if _bnb is None:
        # Without the optional `kernels` package its CPU backend logs a warning on import that only
        # concerns a bf16 inference fast path; keep it out of users' logs.
        cpu_log = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = cpu_log.level
        cpu_log.setLevel(logging.ERROR)
        try:
            import bitsandbytes
        finally:
            cpu_log.setLevel(level)
        _bnb = bitsandbytes
    return _bnb


def _param_kind(module: nn.Module) -> str | None:
    name = type(getattr(module, "weight", None)).__name__
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(name)


class BitsAndBytesBackend:
    name = "bitsandbytes"

    def claims(self, module: nn.Module) -> bool:
        # by class name, so that checking a float model never imports bitsandbytes
        return _param_kind(module) is not None and hasattr(module, "in_features")

    def unsupported(self, linear: nn.Linear, spec: QuantSpec) -> str | None:
        if linear.weight.device.type == "cpu" and spec.bits == 4 and linear.in_features % spec.blocksize:
            return f"in_features {linear.in_features} is not a multiple of blocksize {spec.blocksize} on CPU"
        if linear.weight.device.type == "meta":
            return "weights are on the meta device"
        return None

    # ------------------------------------------------------------ float -> quantized
    def quantize_linear(self, linear: nn.Linear, spec: QuantSpec) -> nn.Module:
        b = bnb()
        weight = linear.weight.detach()
        device = weight.device
        compute = spec.compute_dtype or weight.dtype
        has_bias = linear.bias is not None
        if spec.bits == 4:
            storage = spec.quant_storage or torch.uint8
            module = b.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute,
                                     compress_statistics=spec.double_quant, quant_type=spec.type,
                                     quant_storage=storage, device="meta")
            module.support_avx512bf16_for_cpu = False  # see the module docstring
            module.weight = b.nn.Params4bit(weight.float(), requires_grad=False, blocksize=spec.blocksize,
                                            compress_statistics=spec.double_quant, quant_type=spec.type,
                                            quant_storage=storage, module=module).to(device)
        else:
            module = b.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                       has_fp16_weights=False, threshold=0.0, device="meta")
            module.weight = b.nn.Int8Params(weight.float(), requires_grad=False, has_fp16_weights=False).to(device)
        if has_bias:
            module.bias = nn.Parameter(linear.bias.detach().to(compute), requires_grad=linear.bias.requires_grad)
        return module.train(linear.training)

    # ------------------------------------------------------------ quantized -> float
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        b = bnb()
        weight = module.weight
        if _param_kind(module) == "8bit":
            scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            return b.functional.int8_vectorwise_dequant(weight.data, scales.to(weight.device)).float()
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # repacked by an eval forward; undo on copies
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return b.functional.dequantize_4bit(data, state).float()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> tuple[float, float]:
        b = bnb()
        old = module.weight
        device = old.device
        target = weight.detach().float()
        update = (target.to(device) - self.dequantize(module)).norm()
        if _param_kind(module) == "8bit":
            module.weight = b.nn.Int8Params(target.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        else:
            spec = self.spec_of(module)
            module.weight = b.nn.Params4bit(target.cpu(), requires_grad=False, blocksize=spec.blocksize,
                                            compress_statistics=spec.double_quant, quant_type=spec.type,
                                            quant_storage=old.quant_storage, module=module).to(device)
        error = (self.dequantize(module) - target.to(device)).norm()
        return (error / target.norm().clamp_min(1e-30)).item(), (error / update.clamp_min(1e-30)).item()

    def round_trip(self, weight: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        b = bnb()
        weight = weight.detach().float()
        if spec.bits == 8:
            codes, scales, _ = b.functional.int8_vectorwise_quant(weight.half())
            return b.functional.int8_vectorwise_dequant(codes, scales).float()
        if weight.device.type == "cpu" and weight.shape[-1] % spec.blocksize:
            raise ValueError(f"rows of {weight.shape[-1]} values are not a multiple of blocksize {spec.blocksize}; "
                             "bitsandbytes' CPU kernel cannot dequantize them")
        codes, state = b.functional.quantize_4bit(weight, blocksize=spec.blocksize,
                                                  compress_statistics=spec.double_quant, quant_type=spec.type)
        return b.functional.dequantize_4bit(codes, state).float()

    def spec_of(self, module: nn.Module) -> QuantSpec:
        weight = module.weight
        if _param_kind(module) == "8bit":
            return QuantSpec("int8", double_quant=False)
        state = weight.quant_state
        nested = getattr(state, "original_nested", None) if getattr(state, "packing_format_for_cpu", False) \
            else state.nested
        compute = getattr(module, "compute_dtype", None)
        storage = getattr(weight, "quant_storage", torch.uint8)
        return QuantSpec(state.quant_type, double_quant=bool(nested), blocksize=state.blocksize,
                         compute_dtype=compute if isinstance(compute, torch.dtype) else None,
                         quant_storage=storage if storage.is_floating_point else None)

    def storage_tensors(self, module: nn.Module) -> list[torch.Tensor]:
        weight = module.weight
        if _param_kind(module) == "8bit":
            scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            return [scales]
        state = weight.quant_state
        tensors = [state.absmax, state.code]
        if getattr(state, "state2", None) is not None and state.nested:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        return [t for t in tensors if isinstance(t, torch.Tensor)]


register_backend(BitsAndBytesBackend())
