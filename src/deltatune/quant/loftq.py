"""LoftQ: LoRA-Fine-Tuning-aware Quantization (Li et al. 2023, arXiv:2310.08659).

QLoRA starts from Q = quant(W) and B = 0, so the adapted model begins with the whole quantization error
W - Q. LoftQ instead picks Q and the LoRA factors together, alternating T times (T = loftq_iter):

    Q_t        = quant(W - s * B_{t-1} A_{t-1})        (B_0 A_0 = 0)
    B_t, A_t   = top-r SVD of (W - Q_t), split as B = U sqrt(S/s), A = sqrt(S/s) V^T

so that Q + s * B A approximates W better than Q alone. The base then holds dequant(Q) in float: quantize
the model afterwards with the same spec (deltatune.quantize(model, "nf4")) and it stores Q again.

Shapes: W, Q (out, in); A (r, in); B (out, r); s = the adapter's scaling. With s = 1 this is `peft`'s
loftq_init, whose factors ignore the scaling.
"""

from __future__ import annotations

import torch

from ..errors import DeltaConfigError
from .backend import round_trip
from .spec import QuantSpec

LOFTQ_TYPES = {4: "nf4", 8: "int8"}


def loftq_spec(loftq_config: dict | None) -> tuple[QuantSpec, int]:
    """The QuantSpec (deltatune.quantize's defaults for that bit width) and iteration count of a
    `loftq_config` dict with peft's LoftQConfig fields `loftq_bits` (4 or 8) and `loftq_iter` (>= 1)."""
    config = dict(loftq_config or {})
    bits, iters = config.get("loftq_bits", 4), config.get("loftq_iter", 1)
    if bits not in LOFTQ_TYPES:
        raise DeltaConfigError(f"loftq_config['loftq_bits']={bits!r}: must be one of {sorted(LOFTQ_TYPES)}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise DeltaConfigError(f"loftq_config['loftq_iter']={iters!r}: must be an integer >= 1")
    return QuantSpec(LOFTQ_TYPES[bits]), iters


@torch.no_grad()
def loftq_factors(weight: torch.Tensor, rank: int, scaling: float,
                  loftq_config: dict | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ init of one out-first float weight.

    Args:
        weight: (out, in) float weight W.
        rank: LoRA rank r.
        scaling: the adapter's scaling s (lora_alpha / r, or / sqrt(r) with rsLoRA).
        loftq_config: {"loftq_bits": 4 | 8, "loftq_iter": T}.

    Returns:
        (lora_A (r, in), lora_B (out, r), dequant(Q) (out, in)), all float32.
    """
    spec, iters = loftq_spec(loftq_config)
    weight = weight.detach().float()
    low_rank = torch.zeros_like(weight)
    for _ in range(iters):
        quantized = round_trip(weight - low_rank, spec)  # (out, in)
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        root = torch.sqrt(s[:rank] / scaling)  # (r,)
        lora_b, lora_a = u[:, :rank] * root, root[:, None] * vh[:rank]  # (out, r), (r, in)
        low_rank = scaling * lora_b @ lora_a
    return lora_a.contiguous(), lora_b.contiguous(), quantized
