"""The base values of parameters that adapters train in place.

Options such as LoRA's `bias="all"` / `"lora_only"` train the base model's own bias tensors rather than a
copy (as Hugging Face PEFT does, so files interchange), and ReLoRA folds its updates into the base weight.
The base values are kept here, once per tensor, from the moment the first adapter that changes it is
added (biases) or first changes it (ReLoRA's first fold), so that `disable_adapter()` runs the exact base
model and `unload()` returns it (DESIGN.md: disable == base exactly, unload returns the base).
Memory: one copy of each such tensor (biases: a vector per layer; ReLoRA: each targeted weight).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


class BaseValues:
    """Original values of in-place trained base parameters, and which adapters train each."""

    def __init__(self) -> None:
        # [parameter, its base value, names of the adapters that train it]; a list, not a dict keyed by
        # id(), so a deep copy of the model maps the parameters along with it
        self.entries: list[list] = []

    def _entry(self, param: nn.Parameter) -> list | None:
        return next((e for e in self.entries if e[0] is param), None)

    def record(self, adapter_name: str, params: Iterable[nn.Parameter]) -> None:
        """Adapter `adapter_name` trains `params` in place: keep their values now, if not kept already."""
        for param in params:
            entry = self._entry(param)
            if entry is None:
                self.entries.append([param, param.detach().clone(), {adapter_name}])
            else:
                entry[2].add(adapter_name)

    @torch.no_grad()
    def release(self, adapter_name: str) -> None:
        """Adapter `adapter_name` is gone: a tensor no remaining adapter trains gets its base value back."""
        kept = []
        for entry in self.entries:
            entry[2].discard(adapter_name)
            if entry[2]:
                kept.append(entry)
            else:
                entry[0].copy_(entry[1])
        self.entries = kept

    @torch.no_grad()
    def restore_all(self) -> None:
        """Put every base value back and forget them (unload)."""
        for param, base, _ in self.entries:
            param.copy_(base)
        self.entries = []

    def _swap(self) -> None:
        """Exchange each parameter's data with the kept tensor (no copy, however big the weight)."""
        for entry in self.entries:
            entry[0].data, entry[1] = entry[1], entry[0].data

    @contextlib.contextmanager
    def base_values(self) -> Iterator[None]:
        """Inside, the tensors hold their base values; the trained values come back afterwards."""
        self._swap()
        try:
            yield
        finally:
            self._swap()
