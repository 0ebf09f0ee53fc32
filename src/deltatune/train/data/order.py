"""The order training samples are seen in: a pure function of (seed, epoch), so a resumed run and a run
on N processes see exactly the samples an uninterrupted single-process run sees."""

from __future__ import annotations

import torch


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
