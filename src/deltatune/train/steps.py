"""What the training loop asks of a task, so one loop (loop.py) trains causal LMs, classifiers and image
models: the examples it draws from, how much each counts toward a step's loss normaliser, a batch built
from example indices, and the summed loss of a batch through the model's own forward."""

from __future__ import annotations

from typing import Protocol

import torch

from .data.tokenize import Encoded, collate, target_count
from .evaluate import token_loss_sum


class LossSteps(Protocol):
    unit: str  # what `size` counts, for the throughput in the log ("tokens", "images")

    def __len__(self) -> int: ...

    def weight(self, index: int) -> int:
        """Example `index`'s share of the step's normaliser (labelled tokens; 1 per image)."""

    def size(self, index: int) -> int:
        """Example `index`'s size in `unit`s."""

    def batch(self, indices: list[int], device) -> dict[str, torch.Tensor]:
        """The micro-batch of these examples on `device`; may draw from torch's generator (the loop seeds it)."""

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss summed over what `weight` counts, through `model`'s forward (DDP's, DeltaModel's)."""


class TokenSteps:
    """Token-level cross-entropy over tokenized examples (causal LM, or a classifier's one label per row)."""

    unit = "tokens"

    def __init__(self, examples: list[Encoded], pad_id: int, kernels: str = "none") -> None:
        self.examples, self.pad_id, self.kernels = examples, pad_id, kernels  # kernels: run/kernels.py

    def __len__(self) -> int:
        return len(self.examples)

    def weight(self, index: int) -> int:
        return target_count(self.examples[index])

    def size(self, index: int) -> int:
        return len(self.examples[index].input_ids)

    def batch(self, indices: list[int], device) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in indices], self.pad_id, device)

    def loss_sum(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_loss_sum(model, batch, self.kernels)[0]
