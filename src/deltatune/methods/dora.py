"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, arXiv:2402.09353).

Update rule: W' = m * (W + s*B@A) / ||W + s*B@A||_c, the norm taken per output channel and treated as a
constant in backprop (paper section 4.3). Init rule: m = ||W||_c, so W' = W at start (B = 0).

Used by LoRA when `use_dora=True`. Weights here are "out-first": (out, ...) for linear and conv,
(embedding_dim, num_embeddings) for an embedding; LoraAdapter converts to and from the base's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel of an out-first weight: (out,)."""
    return weight.flatten(1).norm(p=2, dim=1)


def magnitude_scale(magnitude: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """m / ||W + delta||_c per output channel, (out,); the norm carries no gradient."""
    norm = channel_norm(weight + delta.detach()).detach()
    return magnitude.reshape(-1) / norm


def broadcast_channels(scale: torch.Tensor, out: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape (out,) so it multiplies the output-channel axis of `out`."""
    shape = [1] * out.dim()
    shape[channel_dim] = -1
    return scale.view(shape)


def base_without_bias(base: nn.Module, weight: torch.Tensor, base_out: torch.Tensor,
                      dropped: torch.Tensor | None, channel_dim: int) -> torch.Tensor:
    """W x without the bias: the base output minus its bias, or, when dropout changed the input, the
    base op recomputed on the dropped input (`weight` is out-first)."""
    if dropped is None:
        bias = getattr(base, "bias", None)
        return base_out if bias is None else base_out - broadcast_channels(bias, base_out, channel_dim)
    if weight.dim() > 2:
        return CONV_FNS[weight.dim() - 2](dropped, weight, None, base.stride, base.padding, base.dilation)
    return F.linear(dropped, weight)


def dora_output(base_out: torch.Tensor, base_result: torch.Tensor, lora_out: torch.Tensor,
                scale: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """base_out + (m/n - 1) * (W x) + (m/n) * s*BAx, where base_result = W x without the bias.

    Equivalent to the merged weight applied to x (plus the unchanged bias)."""
    scale = broadcast_channels(scale.to(base_out.dtype), base_out, channel_dim)
    return base_out + (scale - 1) * base_result + scale * lora_out


def merged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged out-first weight and the norm needed to unmerge it exactly."""
    combined = weight + delta
    norm = channel_norm(combined)
    scale = (magnitude.reshape(-1).float() / norm).view(-1, *[1] * (weight.dim() - 1))
    return combined * scale, norm


def unmerged(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
             norm: torch.Tensor) -> torch.Tensor:
    """Inverse of `merged` given the norm it returned."""
    scale = (norm / magnitude.reshape(-1).float()).view(-1, *[1] * (weight.dim() - 1))
    return weight * scale - delta
