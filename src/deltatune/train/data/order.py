"""The order training samples are seen in: a pure function of (seed, epoch), so a resumed run and a run
on N processes see exactly the samples an uninterrupted single-process run sees."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .tokenize import Encoded, collate


class SampleOrder:
    """The global sample stream: a fresh permutation of the dataset each epoch, seeded by the epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self._perms = size, seed, {}

    def __getitem__(self, k: int) -> int:
        epoch = k // self.size
        if epoch not in self._perms:
            self._perms = {
                epoch: torch.randperm(
                    self.size, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)
                ).tolist()
            }
        return self._perms[epoch][k % self.size]


def ordered_batches(examples: list[Encoded], batch_size: int, seed: int, pad_id: int, device) -> Iterator[dict]:
    """One epoch of padded batches in the loop's sample order (epoch 0), for `before_training` hooks."""
    order = SampleOrder(len(examples), seed)
    for first in range(0, len(examples), batch_size):
        batch = [examples[order[i]] for i in range(first, min(first + batch_size, len(examples)))]
        yield collate(batch, pad_id, device)
