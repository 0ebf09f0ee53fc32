"""`deltatune generate` for an image pipeline: load the pipeline an image adapter was trained on, put each
component's adapter on it (unmerged: the pipeline calls its own UNet, whose layers now carry the adapter),
sample images and write PNGs."""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...api import DeltaModel
from ...errors import AdapterFileError, DeltaConfigError
from ...io.adapter_files import read_config
from ...io.pipelines import is_pipeline_folder, load_pipeline
from .adapters import ADAPTER_FOLDER, adapter_components


def is_image_adapter(folder: str | Path | None) -> bool:
    """Whether `folder` holds per-component image adapters (an image run's output or its adapter/ folder)."""
    return bool(folder) and bool(adapter_components(folder))


@dataclass(frozen=True)
class ImageSampling:
    """Sampling settings; height and width default to the pipeline's own size.

    Raises:
        DeltaConfigError: a value out of range, naming its option.
    """

    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_images: int = 1

    def __post_init__(self) -> None:
        for option, value in (("--steps", self.steps), ("--num-images", self.num_images),
                              ("--height", self.height or 8), ("--width", self.width or 8)):
            if value < 1:
                raise DeltaConfigError(f"{option} {value}: must be >= 1")
        if self.guidance_scale < 0:
            raise DeltaConfigError(f"--guidance-scale {self.guidance_scale}: must be >= 0 (<= 1: no guidance)")


def load_adapted_pipeline(adapter_dir: str | Path, model: str | None = None, dtype: torch.dtype = torch.float32):
    """The pipeline (`model`, default the adapters' base_model_name_or_path) with each component's adapter
    loaded; returns (pipeline, {component: DeltaModel}).

    Raises:
        AdapterFileError: `adapter_dir` holds no unet/ or text_encoder/ adapter, or an adapter does not fit.
        ModelNotFoundError: the pipeline folder is missing.
    """
    components = adapter_components(adapter_dir)
    if not components:
        raise AdapterFileError(f"{adapter_dir}: no image adapter (expected unet/ or text_encoder/ folders with "
                               f"adapter_config.json, as `deltatune train` writes to OUTPUT_DIR/{ADAPTER_FOLDER})")
    name = model or next(read_config(folder).base_model_name_or_path for folder in components.values())
    if not is_pipeline_folder(name):
        raise DeltaConfigError(f"{adapter_dir}: its base {name!r} is not a diffusers pipeline folder "
                               "(model_index.json); pass --model PIPELINE_FOLDER")
    pipeline = load_pipeline(name, dtype)
    adapted = {}
    for component, folder in components.items():
        adapted[component] = DeltaModel.from_pretrained(getattr(pipeline, component), str(folder),
                                                        is_trainable=False).eval()
    return pipeline, adapted


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"


def generate_images(adapter_dir: str | Path, prompts: list[str], out: str | Path, model: str | None = None,
                    sampling: ImageSampling = ImageSampling(), base: bool = False) -> list[Path]:
    """Sample `sampling.num_images` images per prompt from the adapted pipeline and write PNGs to `out`
    (`NNN-<prompt>.png`; with `base`, also the base pipeline's as `base-NNN-<prompt>.png`, same seeds).

    Prompt i samples from a generator seeded with `sampling.seed + i`: the same seed gives the same images.

    Returns:
        The written paths, in order.
    """
    if not prompts:
        raise DeltaConfigError("generate needs at least one prompt")
    pipeline, adapted = load_adapted_pipeline(adapter_dir, model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [("", ExitStack)] + ([("base-", lambda: _disabled(adapted))] if base else [])
    written = []
    bar = tqdm(total=len(runs) * len(prompts), desc="generate", unit="prompt", dynamic_ncols=True, leave=False)
    for prefix, context in runs:
        with context(), torch.no_grad():
            for index, prompt in enumerate(prompts):
                generator = torch.Generator("cpu").manual_seed(sampling.seed + index)
                images = pipeline(prompt, num_inference_steps=sampling.steps, guidance_scale=sampling.guidance_scale,
                                  height=sampling.height, width=sampling.width,
                                  num_images_per_prompt=sampling.num_images, generator=generator).images
                for number, image in enumerate(images):
                    path = out / f"{prefix}{index * sampling.num_images + number:03d}-{_slug(prompt)}.png"
                    image.save(path)
                    written.append(path)
                bar.update(1)
    bar.close()
    return written


def _disabled(adapted: dict) -> ExitStack:
    stack = ExitStack()
    for model in adapted.values():
        stack.enter_context(model.disable_adapter())
    return stack
