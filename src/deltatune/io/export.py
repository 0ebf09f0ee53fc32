"""The merged-model export (`deltatune merge`): a full Transformers model folder, config.json +
model.safetensors (+ the tokenizer's files), loadable with `AutoModelForCausalLM.from_pretrained` and no
deltatune installed. Written into a temporary folder and renamed into place (io/atomic.py), so the folder
never holds a partial model."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_folder


def write_merged_model(model: nn.Module, tokenizer, out: str | os.PathLike) -> Path:
    """Save `model` (a plain Transformers model, adapters already merged) and `tokenizer` to `out`.

    `out` must not exist or be an empty folder; the caller checks that before the (long) merge.

    Raises:
        WriteError: the disk or the folder refused a write; nothing is left at `out`.
    """
    with atomic_folder(out) as folder, torch.no_grad():
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return Path(out)
