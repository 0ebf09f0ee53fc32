"""QuantSpec: how to quantize linear weights (type, block size, dtypes, backend), parsed from the forms
users and training configs give it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import DeltaConfigError

BACKEND_TYPES = {"bitsandbytes": ("nf4", "fp4", "int8"), "hqq": ("hqq1", "hqq2", "hqq3", "hqq4", "hqq8")}
QUANT_TYPES = tuple(t for types in BACKEND_TYPES.values() for t in types)


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize linear weights.

    Args:
        type: "nf4" (4-bit NormalFloat, QLoRA), "fp4" (4-bit float) or "int8" (LLM.int8 row-wise absmax),
            with bitsandbytes; "hqq1" ... "hqq8" (HQQ affine, that many bits; needs the hqq package), which
            also selects the hqq backend.
        double_quant: bitsandbytes 4-bit only: quantize the per-block scales too (8-bit, blocks of 256),
            about 0.37 bit a weight saved (QLoRA's "double quantization"). Always False for hqq.
        blocksize: weights that share one scale (64, as QLoRA); HQQ's group size.
        compute_dtype: dtype the layer computes in; None keeps the float layer's own dtype.
        quant_storage: 4-bit only: the dtype whose storage holds the packed codes (uint8 when None). Set it
            to the model's float dtype (e.g. torch.bfloat16) to shard with FSDP, which flattens every
            parameter of a wrapped unit into one buffer of one dtype; the bytes are the same.
        backend: which registered backend does the work.
    """

    type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    compute_dtype: torch.dtype | None = None
    quant_storage: torch.dtype | None = None
    backend: str = "bitsandbytes"

    def __post_init__(self) -> None:
        if self.type not in QUANT_TYPES:
            raise DeltaConfigError(f"quantize type={self.type!r}: must be one of {QUANT_TYPES}")
        owner = next(name for name, types in BACKEND_TYPES.items() if self.type in types)
        if self.backend == "bitsandbytes" and owner != "bitsandbytes":  # the default: the type names its backend
            object.__setattr__(self, "backend", owner)
        elif self.backend in BACKEND_TYPES and self.type not in BACKEND_TYPES[self.backend]:
            raise DeltaConfigError(f"quantize type={self.type!r}: backend {self.backend!r} offers "
                                   f"{BACKEND_TYPES[self.backend]}")
        if self.backend != "bitsandbytes":  # double quantization is bitsandbytes' 4-bit scheme
            object.__setattr__(self, "double_quant", False)
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise DeltaConfigError(f"quantize blocksize={self.blocksize!r}: must be a power of two in 64..4096")
        for key in ("compute_dtype", "quant_storage"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
                raise DeltaConfigError(f"quantize {key}={value!r}: must be a float torch.dtype")
        if self.quant_storage is not None and (self.bits != 4 or self.backend != "bitsandbytes"):
            raise DeltaConfigError(f"quantize quant_storage: only bitsandbytes' 4-bit types take it, not {self.type!r}")

    @property
    def bits(self) -> int:
        """The bits per weight the type's name ends with (nf4, int8, hqq3, ...)."""
        digits = self.type[len(self.type.rstrip("0123456789")):]
        return int(digits) if digits else 4

    @classmethod
    def parse(cls, spec: str | dict | QuantSpec, **overrides: Any) -> QuantSpec:
        """A spec from "nf4", {"type": "nf4", "double_quant": False, ...} or a QuantSpec."""
        if isinstance(spec, QuantSpec):
            fields = dict(spec.__dict__)
        elif isinstance(spec, str):
            fields = {"type": spec.lower()}
        elif isinstance(spec, dict):
            fields = dict(spec)
        else:
            raise DeltaConfigError(f"quantize={spec!r}: give one of {QUANT_TYPES}, a dict with 'type', or a QuantSpec")
        fields.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("compute_dtype", "quant_storage"):
            if isinstance(fields.get(key), str):
                name = fields[key].removeprefix("torch.")
                if not isinstance(getattr(torch, name, None), torch.dtype):
                    raise DeltaConfigError(f"quantize {key}={fields[key]!r}: not a torch dtype")
                fields[key] = getattr(torch, name)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise DeltaConfigError(f"quantize: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**fields)
