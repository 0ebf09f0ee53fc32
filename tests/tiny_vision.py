"""Tiny random vision models for tests: a UNet-style conv net (what diffusion users adapt) and a ViT
built from Transformers' ViTConfig. Seeded, float32, eval mode, in memory; images are (batch, 3, 8, 8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTConfig, ViTForImageClassification


def _seeded(build, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build().float().eval()


class TinyUNet(nn.Module):
    """Down path, a token-wise projection in the middle (like a UNet's proj_in), up path with a skip.

    conv_in  3 -> 8, 3x3                  (B, 8, 8, 8)
    down     8 -> 16, 3x3, stride 2       (B, 16, 4, 4)
    mid      16 -> 16, 3x3                (B, 16, 4, 4)
    proj_in  Linear 16 -> 16 per pixel    (B, 16, 4, 4)
    up       upsample x2, 16 -> 8, 3x3    (B, 8, 8, 8)
    conv_out concat skip, 16 -> 3, 1x1    (B, 3, 8, 8)
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.proj_in = nn.Linear(16, 16)
        self.up = nn.Conv2d(16, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(16, 3, 1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        skip = F.silu(self.conv_in(pixels))
        hidden = F.silu(self.mid(F.silu(self.down(skip))))
        tokens = self.proj_in(hidden.flatten(2).transpose(1, 2))  # (B, 16 pixels, 16 channels)
        hidden = hidden + tokens.transpose(1, 2).reshape(hidden.shape)
        hidden = F.silu(self.up(F.interpolate(hidden, scale_factor=2.0, mode="nearest")))
        return self.conv_out(torch.cat([hidden, skip], dim=1))


def tiny_unet(seed: int = 0) -> TinyUNet:
    return _seeded(TinyUNet, seed)


def tiny_vit(seed: int = 0, num_labels: int = 4) -> ViTForImageClassification:
    """2-layer ViT, hidden 16, 4x4 patches of 8x8 images: patch_embeddings.projection (Conv2d 3 -> 16,
    kernel 4, stride 4), query/key/value, attention.output.dense, intermediate.dense, output.dense."""
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=32, num_labels=num_labels)
    return _seeded(lambda: ViTForImageClassification(config), seed)


def image_batch(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random images (batch, 3, 8, 8)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, generator=generator)
