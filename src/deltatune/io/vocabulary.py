"""Resized vocabularies: which full embedding layers an adapter file carries (peft's `save_embedding_layers`).

An adapter reproduces its model only on a base with the same embedding rows. Rows a resize adds
(`resize_token_embeddings`) are drawn at random, and rows a user sets for new tokens live only in that
model, so a fresh base resized the same way gets other rows: the file must carry them.

`save_embedding_layers`:
- True: always save the input embeddings and the output head in full (keys: io/keymap.py).
- "auto" (default): save them when the vocabulary was resized, that is when their row counts differ
  from `vocab_size` in the base's config.json (at `base_model_name_or_path` or the model's
  `_name_or_path`, a local directory, as peft reads it); when no such config is at hand (a model built
  in memory) and this adapter adapts one of them, a resize cannot be ruled out, so they are saved too,
  as peft does for a targeted embedding (peft leaves an untargeted resized head out; we keep it). A warning
  names what was saved, why, and its size.
- False: never; a known resize then warns that the file lacks the rows reloading needs.
On load these keys are copied into the base; a row count that differs from the base's names the resize.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..core.layer import DeltaLayer, ModulesToSave
from .keymap import DISK_PREFIX, embedding_layer_slots, embedding_layers

MODES = ("auto", True, False)


def original_vocab_size(model, config) -> tuple[int, str] | tuple[None, None]:
    """(vocab_size, config file) of the base as published, from a local config.json; else (None, None)."""
    model_config = getattr(model.model, "config", None)
    sources = (config.base_model_name_or_path, getattr(model_config, "_name_or_path", None))
    for source in sources:
        file = Path(source) / "config.json" if source else None
        if file is None or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        vocab = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
        if isinstance(vocab, int):
            return vocab, str(file)
    return None, None


def _rows(module: torch.nn.Module) -> int:
    """Rows of an embedding or head: through an adapter layer to its base, through a modules_to_save
    wrapper to the original module (a trained copy has the same shape)."""
    if isinstance(module, DeltaLayer):
        module = module.base_layer
    elif isinstance(module, ModulesToSave):
        module = module.original_module
    return int(module.weight.shape[0])  # Embedding (vocab, dim), Linear head (vocab, hidden)


def resize_reason(model, adapter_name: str) -> tuple[str | None, bool]:
    """(why the file needs the full embedding layers or None, whether a resize is known for certain)."""
    layers = embedding_layers(model)
    vocab, file = original_vocab_size(model, model.peft_config[adapter_name])
    if vocab is not None:
        resized = [f"{path} has {_rows(m)} rows" for path, m in layers if _rows(m) != vocab]
        return (f"the vocabulary was resized ({', '.join(resized)}; {file} says vocab_size={vocab})"
                if resized else None), True
    adapted = [path for path, m in layers if isinstance(m, DeltaLayer) and adapter_name in m.adapters]
    if adapted:
        return (f"adapter {adapter_name!r} adapts {adapted}, and with no config.json of the base at hand a "
                "resized vocabulary cannot be ruled out"), False
    return None, False


def embedding_tensors(model, adapter_name: str,
                      save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """{disk key: tensor} of the full embedding layers the file of `adapter_name` carries (module docstring).

    Raises:
        ValueError: `save_embedding_layers` is not "auto", True or False.
    """
    if save_embedding_layers not in MODES or not isinstance(save_embedding_layers, (bool, str)):
        raise ValueError(f"save_embedding_layers={save_embedding_layers!r}: must be 'auto', True or False")
    slots = embedding_layer_slots(model)
    if save_embedding_layers is True:
        return slots
    reason, known = resize_reason(model, adapter_name) if slots else (None, False)
    if reason is None:
        return {}
    owners = {key.removeprefix(DISK_PREFIX).rsplit(".", 1)[0] for key in slots}
    paths = sorted({owner.removesuffix(".base_layer") for owner in owners})
    if save_embedding_layers is False:
        if known:
            warnings.warn(f"save_embedding_layers=False: {reason}, but the file leaves out {paths}; it gives "
                          "this model's outputs only on a base whose rows equal these", stacklevel=5)
        return {}
    size = sum(t.numel() * t.element_size() for t in {id(t): t for t in slots.values()}.values())
    warnings.warn(f"saving {paths} in full ({size / 2**20:.2f} MiB) because {reason}; pass "
                  "save_embedding_layers=False to leave them out", stacklevel=5)
    return slots


def resize_hint(rows: int) -> str:
    """For a shape mismatch on a full embedding-layer key whose file tensor has `rows` rows: what to do."""
    return (" The file carries this embedding layer in full, from a model whose vocabulary was resized: "
            f"resize the base the same way first (model.resize_token_embeddings({rows})).")
