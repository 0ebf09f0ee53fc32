"""Fixtures for text-to-image runs: a tiny pipeline folder, folders of small generated images with a
metadata.jsonl, run configs written as YAML, and the noise-prediction loss on a fixed (noise, timestep) set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from tiny_diffusion import save_tiny_pipeline

COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 220, 30)}
TIMESTEPS = (20, 150, 300, 500, 700, 900)  # the fixed set of the before/after loss


def square(rgb: tuple[int, int, int], size: int = 32, inset: int = 0) -> np.ndarray:
    """A size x size RGB image: grey background, a square of colour `rgb` (inset pixels from each edge)."""
    image = np.full((size, size, 3), 128, np.uint8)
    image[inset : size - inset, inset : size - inset] = rgb
    return image


def write_image_folder(folder: Path, items: dict[str, np.ndarray], captions: dict[str, str] | None = None,
                       caption_column: str = "text") -> Path:
    """Write each image as NAME.png and, with `captions`, a metadata.jsonl ({file_name, caption_column})."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, pixels in items.items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
    if captions is not None:
        rows = [{"file_name": f"{name}.png", caption_column: captions[name]} for name in items]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def image_files(root: Path) -> dict[str, Path]:
    """A pipeline folder, an instance folder (solid and inset squares of four colours, captioned) and a
    class folder (two grey-bordered squares, no metadata)."""
    pipeline = save_tiny_pipeline(root / "pipeline")
    items, captions = {}, {}
    for name, rgb in COLOURS.items():
        items[f"{name}-solid"], captions[f"{name}-solid"] = square(rgb), f"a {name} square"
        items[f"{name}-small"], captions[f"{name}-small"] = square(rgb, inset=8), f"a small {name} square"
    data = write_image_folder(root / "images", items, captions)
    classes = write_image_folder(root / "classes", {"c0": square((90, 90, 90), inset=4),
                                                    "c1": square((160, 160, 160), inset=10)})
    return {"root": root, "pipeline": pipeline, "data": data, "classes": classes}


def write_config(files: dict, name: str, image: dict | None = None, method: dict | None = None,
                 **training) -> Path:
    """A text-to-image run config YAML for `files`, output_dir root/NAME; returns its path."""
    config = {
        "model": {"name_or_path": str(files["pipeline"]), "task": "text-to-image"},
        "method": method or {"name": "lora", "r": 8, "lora_alpha": 8},
        "data": {"train": str(files["data"])},
        "image": {"resolution": 32, **(image or {})},
        "training": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "seed": 3, **training},
        "output_dir": str(files["root"] / name),
    }
    path = files["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@torch.no_grad()
def fixed_set_loss(pipeline, data: Path) -> float:
    """Mean noise-prediction loss of `pipeline`'s UNet (adapters as loaded) over every image of `data` at
    each of TIMESTEPS, with noise from a fixed generator and the VAE's mean latents: the same set for any
    adapter, so two values compare adapters, not random draws."""
    from diffusers import DDPMScheduler

    from deltatune.train.image.data import caption_rows, load_image
    from deltatune.train.image.loss import noise_prediction_loss

    rows = caption_rows(data, "text")
    pixels = torch.stack([load_image(path, 32) for path, _ in rows])
    latents = pipeline.vae.encode(pixels).latent_dist.mean * pipeline.vae.config.scaling_factor
    ids = pipeline.tokenizer([c for _, c in rows], padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt").input_ids
    hidden = pipeline.text_encoder(ids)[0]
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for t in TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.full((len(rows),), t)
        losses.append(noise_prediction_loss(pipeline.unet, scheduler, latents, hidden, noise, timesteps).mean())
    return float(torch.stack(losses).mean())
