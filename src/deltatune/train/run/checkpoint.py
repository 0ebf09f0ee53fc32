"""Training checkpoints: adapter, exact trainable tensors, optimizer, scheduler, RNG state and step.

Layout (each checkpoint is written to a temporary folder and renamed into place, so a run killed
while saving leaves the previous checkpoint intact and never a half-written one):

    OUTPUT_DIR/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors   the adapter, loadable on its own
        trainable.safetensors                            every trainable tensor by parameter name
        state.safetensors                                the tensors of the optimizer and RNG state
        state.json                                       the rest of that state, the step, and the size
                                                         of every file above (written last)

Nothing is pickled: a checkpoint is read with safetensors and json only, so a crafted checkpoint
cannot run code. A checkpoint counts as complete only when state.json parses and every file it lists
has the size it records; old checkpoints are renamed out of the way before they are deleted, so an
interrupted prune never leaves a half-deleted `step-*` folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...errors import CheckpointError  # noqa: F401  (re-exported)
from ...io.atomic import atomic_folder, discard_folder

CHECKPOINTS = "checkpoints"
PREFIX = "step-"
STATE_JSON, STATE_TENSORS, TRAINABLE = "state.json", "state.safetensors", "trainable.safetensors"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def encode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON data; its tensors move to `tensors` (key -> tensor) and leave their key behind.
    Tuples and dicts with non-string keys (an optimizer's parameter ids) are tagged so they come back
    exactly as they were."""
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [encode_state(v, tensors) for v in value]}
    if isinstance(value, list):
        return [encode_state(v, tensors) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: encode_state(v, tensors) for k, v in value.items()}
        return {"__items__": [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state holds a {type(value).__name__}, which is not saved (tensors, numbers, "
                    "strings, lists, tuples and dicts are)")


def decode_state(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(decode_state(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__items__"}:
            return {decode_state(k, tensors): decode_state(v, tensors) for k, v in value["__items__"]}
        return {k: decode_state(v, tensors) for k, v in value.items()}
    return value


def save_checkpoint(
    output_dir: str | Path, step: int, model, optimizer, scheduler, extra: dict, keep: int = 2
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints.

    Raises:
        WriteError: the disk or folder refused a write; it names the file, says when the disk is full,
            and the checkpoints saved before are left as they were.
    """
    final = Path(output_dir) / CHECKPOINTS / f"{PREFIX}{step:06d}"
    # the same step saved again (a resumed run): atomic_folder moves the old one aside before the rename
    with atomic_folder(final) as folder:
        model.save_pretrained(str(folder))
        save_file(trainable_tensors(model), str(folder / TRAINABLE))
        tensors: dict[str, torch.Tensor] = {}
        state = encode_state({"step": step, "optimizer": optimizer.state_dict(),
                              "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}, tensors)
        save_file(tensors, str(folder / STATE_TENSORS))
        # by path inside the checkpoint: an image run's adapter sits in per-component subfolders
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}
        (folder / STATE_JSON).write_text(json.dumps({"files": sizes, "state": state}), encoding="utf-8")
        for file in [*files, folder / STATE_JSON]:  # on disk before the rename makes the checkpoint count
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    for old in list_checkpoints(output_dir)[:-keep]:
        discard_folder(old)  # renamed first: an interrupted delete never leaves a half `step-*` folder
    return final


def is_complete(path: Path) -> bool:
    """Whether checkpoint folder `path` has state.json and every file it lists, at the recorded size."""
    try:
        sizes = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))["files"]
        return all((path / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every `step-N` folder, complete or not, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries and incomplete folders are skipped)."""
    return [p for p in checkpoint_folders(output_dir) if is_complete(p)]


def remove_checkpoint_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete what an interrupted save or prune left (hidden `.step-*` folders); returns them. Call it
    only while no other run writes in `output_dir` (a training run holds its lock)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(f".{PREFIX}")]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG from `path`; returns the saved state.

    Raises:
        CheckpointError: the checkpoint is incomplete or unreadable, or does not fit the model.
    """
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (expected {STATE_JSON} listing its files, "
                              "as this version of deltatune writes them)")
    try:
        tensors = load_file(str(path / TRAINABLE))
        state = decode_state(json.loads((path / STATE_JSON).read_text(encoding="utf-8"))["state"],
                             load_file(str(path / STATE_TENSORS)))
    except Exception as err:  # safetensors, json and a missing tensor key each raise their own kind
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, unknown = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise CheckpointError(
            f"{path}: checkpoint does not fit this model (missing {missing[:3]}, "
            f"unknown {unknown[:3]}); was the method config changed?"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def saved_settings(path: str | Path) -> dict:
    """What a checkpoint stored besides tensors and RNG (save_checkpoint's `extra`: the run config, the
    training data's fingerprint), read without touching a model, so --resume can check it first."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))["state"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(err).__name__}: {err})") from None
    return {key: decode_state(value, {}) for key, value in state.items()
            if key not in ("optimizer", "scheduler", "rng", "best")}  # "best": early_stop.py's tensors
