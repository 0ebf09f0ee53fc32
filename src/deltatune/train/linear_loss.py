"""The training loss's head: which models take core/linear_loss.py's chunked next-token loss (no
(tokens x vocabulary) logits tensor), and which kernel computes it (`training.kernels`).

`chunked_loss_head(model)` takes a DeltaModel or a plain Transformers model, either one possibly inside
DDP; a DeltaModel whose active adapter runs the model its own way (soft prompts, X-LoRA) keeps the plain
logits path. `head_passed_over(model)` lets the model run its own forward (DeltaModel.forward: its lock,
per-row routing and checkpoint replay; DDP's gradient hooks when wrapped) with the head passed over, so
one and N processes compute the loss the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..core import linear_loss
from ..core.model import DeltaModel
from .run.kernels import liger_linear_cross_entropy


def _transformers_model(model: nn.Module) -> nn.Module:
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return inner.model if isinstance(inner, DeltaModel) else inner


def chunked_loss_head(model: nn.Module) -> nn.Linear | None:
    """The output head whose logits `linear_cross_entropy` computes in chunks, or None when the model
    keeps the plain logits path. `model` may be wrapped in DDP (`.module`)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if isinstance(inner, DeltaModel) and inner.prompt_adapter() is not None:
        return None  # soft prompts / X-LoRA run the model their own way
    return linear_loss.causal_lm_head(_transformers_model(model))


@contextmanager
def head_passed_over(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's `logits` are the last hidden states (B, T, d), the head's input."""
    with linear_loss.head_passed_over(_transformers_model(model)):
        yield


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, kernels: str = "none") -> torch.Tensor:
    """core/linear_loss.linear_cross_entropy: summed cross-entropy of `hidden` (N, d) through the head
    against `targets` (N,); `kernels="liger"` (training.kernels, run/kernels.py): the same through
    Liger's fused kernel."""
    if kernels == "liger":
        return liger_linear_cross_entropy(hidden, weight, bias, targets)
    return linear_loss.linear_cross_entropy(hidden, weight, bias, targets)
