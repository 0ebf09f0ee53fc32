"""NEFTune: noise on the input embeddings while training (`training.neftune_noise_alpha`).

Jain et al., "NEFTune: Noisy Embeddings Improve Instruction Finetuning", arXiv:2310.05914.
In training mode each forward adds uniform noise to the token embeddings X (B, L, d):

    X' = X + (alpha / sqrt(L * d)) * U,   U ~ Uniform(-1, 1) elementwise

with L the (padded) sequence length of the batch, as Transformers' Trainer computes it, through a
forward hook on the model's input embedding. Evaluation and generation (eval mode) see the clean
embeddings. The noise draws from torch's global generator, which the loop reseeds before every
forward, so a resumed run draws the same noise as one that never stopped.
"""

from __future__ import annotations

import math

import torch
from torch.utils.hooks import RemovableHandle


def neftune_hook(alpha: float):
    """The forward hook for an embedding module: noise of bound alpha/sqrt(L*d) in training mode only."""

    def add_noise(module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.size(1) * output.size(2))  # output: (B, L, d)
        return output + torch.empty_like(output).uniform_(-bound, bound)

    return add_noise


def add_neftune(model: torch.nn.Module, alpha: float | None) -> RemovableHandle | None:
    """Hook NEFTune noise onto `model`'s input embedding (a DeltaModel or a Transformers model); None
    when `alpha` is None. Remove the returned handle when training ends."""
    if alpha is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_input_embeddings().register_forward_hook(neftune_hook(alpha))
