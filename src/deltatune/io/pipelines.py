"""diffusers models for image adapters: a local pipeline folder (model_index.json) or one model's folder
(config.json naming its `_class_name`), loaded through diffusers' own `from_pretrained`, nothing downloaded.
diffusers is the `diffusion` extra, imported only when an image model loads."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ..errors import DeltaConfigError, ModelNotFoundError

PIPELINE_INDEX = "model_index.json"  # what marks a diffusers pipeline folder
DIFFUSION_HINT = "pip install 'deltatune[diffusion]'"


def is_pipeline_folder(name_or_path: str | os.PathLike | None) -> bool:
    """Whether `name_or_path` is a local diffusers pipeline folder (it holds model_index.json)."""
    return bool(name_or_path) and (Path(name_or_path).expanduser() / PIPELINE_INDEX).is_file()


def load_pipeline(folder: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """A diffusers pipeline (UNet or DiT, VAE, text encoder(s), tokenizer(s), scheduler) from a local
    pipeline folder, through `DiffusionPipeline.from_pretrained(folder)`; nothing is downloaded.

    Raises:
        ModelNotFoundError: `folder` is not a directory holding model_index.json.
        ModuleNotFoundError: diffusers is not installed (names the `diffusion` extra).
    """
    path = Path(folder).expanduser()
    if not (path / PIPELINE_INDEX).is_file():
        raise ModelNotFoundError(
            f"model {str(folder)!r}: {path / PIPELINE_INDEX} is missing; an image model is a local diffusers "
            "pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    try:
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise ModuleNotFoundError(f"image models need the diffusers package: {DIFFUSION_HINT}") from None
    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" is not a long step
    # FutureWarnings about the folder's own config (an old scheduler's steps_offset; torch_dtype, which
    # newer diffusers calls dtype and older versions take alone) are for its author, not for this run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        pipeline = DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def diffusers_class_name(name_or_path: str | os.PathLike) -> str | None:
    """The `_class_name` a diffusers model folder's config.json names (None for any other folder)."""
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name") if config.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def load_diffusers_model(folder: str | os.PathLike, class_name: str, dtype: torch.dtype) -> torch.nn.Module:
    """One diffusers model (UNet2DConditionModel, SD3Transformer2DModel ...) from its local folder.

    Raises:
        ModuleNotFoundError: diffusers is missing (names the extra). DeltaConfigError: a class diffusers lacks.
    """
    try:
        import diffusers
    except ImportError:
        raise ModuleNotFoundError(f"image models need the diffusers package: {DIFFUSION_HINT}") from None
    model_class = getattr(diffusers, class_name, None)  # a class by its name in config.json
    if model_class is None:
        raise DeltaConfigError(f"{folder}/config.json: _class_name {class_name!r} is not a diffusers model class")
    return model_class.from_pretrained(str(Path(folder).expanduser()), torch_dtype=dtype, local_files_only=True)
