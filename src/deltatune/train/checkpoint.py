"""Training checkpoints: adapter, exact trainable tensors, optimizer, scheduler, RNG state and step.

Layout (each checkpoint is written to a temporary folder and renamed into place, so a run killed
while saving leaves the previous checkpoint intact and never a half-written one):

    OUTPUT_DIR/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors   the adapter, loadable on its own
        trainable.safetensors                            every trainable tensor by parameter name
        state.pt                                         optimizer, scheduler, RNG, step
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
PREFIX = "step-"


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


def save_checkpoint(
    output_dir: str | Path, step: int, model, optimizer, scheduler, extra: dict, keep: int = 2
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` checkpoints."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        model.save_pretrained(str(tmp))
        save_file(trainable_tensors(model), str(tmp / "trainable.safetensors"))
        torch.save(
            {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                **extra,
            },
            tmp / "state.pt",
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are skipped)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith(PREFIX)
        and p.name[len(PREFIX) :].isdigit()
        and (p / "state.pt").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore trainable tensors, optimizer, scheduler and RNG from `path`; returns the saved state."""
    path = Path(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, unknown = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ValueError(
            f"{path}: checkpoint does not fit this model (missing {missing[:3]}, "
            f"unknown {unknown[:3]}); was the method config changed?"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def saved_settings(path: str | Path) -> dict:
    """What a checkpoint stored besides tensors and RNG (save_checkpoint's `extra`: the run config, the
    training data's fingerprint), read without touching a model, so --resume can check it first."""
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items() if key not in ("optimizer", "scheduler", "rng")}
