"""Image folders with captions, read and checked before any model loads.

The layout is the `datasets` image-folder convention: image files plus a `metadata.jsonl` whose rows
give `file_name` (relative to the folder) and a caption field (`image.caption_column`, default `text`):

    pets/metadata.jsonl   {"file_name": "0001.png", "text": "a photo of sks dog"}
    pets/0001.png

We read it with json and Pillow rather than `datasets.load_dataset("imagefolder")`: the same files and
fields, but every image is opened up front, so a bad row or an unreadable image stops the run before
training with the file and line at fault (the imagefolder loader decodes lazily, mid-run). A class-image
folder for prior preservation needs no metadata: every image in it gets `image.class_prompt`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import DataError

METADATA = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class ImageExample:
    """One training image, resized so its shorter side is the run's resolution (cropped per step)."""

    pixels: torch.Tensor  # (3, H, W) in [-1, 1], min(H, W) == resolution
    caption: str
    path: Path


def _folder(folder: str | Path, key: str) -> Path:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"{key}={str(folder)!r}: not a folder; expected a folder of images"
                        + (f" with a {METADATA}" if key == "data.train" else ""))
    return path


def caption_rows(folder: str | Path, caption_column: str) -> list[tuple[Path, str]]:
    """(image path, caption) for every row of `folder/metadata.jsonl`, in file order.

    Raises:
        DataError: no folder or no metadata.jsonl; a line that is not a JSON object; a row without
            `file_name` or without the caption field (naming `image.caption_column`); a file that does not
            exist. Each names `metadata.jsonl:LINE`.
    """
    root = _folder(folder, "data.train")
    metadata = root / METADATA
    if not metadata.is_file():
        raise DataError(f"{metadata}: missing; an image folder needs a {METADATA} with one row per image, "
                        f'e.g. {{"file_name": "0001.png", "{caption_column}": "a photo of ..."}}')
    rows = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object with file_name and {caption_column!r}")
        if not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise DataError(f"{where}: no file_name (the image's path relative to {root})")
        caption = row.get(caption_column)
        if not isinstance(caption, str):
            found = sorted(k for k, v in row.items() if isinstance(v, str) and k != "file_name")
            raise DataError(f"{where}: no caption field {caption_column!r} (image.caption_column); "
                            f"text fields in this row: {found}")
        path = root / row["file_name"]
        if not path.is_file():
            raise DataError(f"{where}: image file {row['file_name']!r} not found in {root}")
        rows.append((path, caption))
    if not rows:
        raise DataError(f"{metadata}: no rows; expected one row per training image")
    return rows


def class_rows(folder: str | Path, class_prompt: str) -> list[tuple[Path, str]]:
    """(image path, class_prompt) for every image file in `folder` (sorted by name).

    Raises:
        DataError: not a folder, or no image files in it.
    """
    root = _folder(folder, "image.class_data")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise DataError(f"image.class_data={str(folder)!r}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [(p, class_prompt) for p in paths]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image as (3, H, W) float in [-1, 1], resized (bilinear) so that min(H, W) == resolution.

    Raises:
        DataError: Pillow cannot read the file (naming it).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_examples(rows: list[tuple[Path, str]], resolution: int) -> list[ImageExample]:
    """Every row's image loaded (see load_image), so a bad file stops the run now."""
    return [ImageExample(load_image(path, resolution), caption, path) for path, caption in rows]


def crop_and_flip(pixels: torch.Tensor, resolution: int, center_crop: bool, random_flip: bool) -> torch.Tensor:
    """A resolution x resolution crop of (3, H, W) pixels, centred or at a random offset, flipped left-right
    with probability 1/2 when `random_flip`. Random draws use torch's global generator, which the loop
    seeds before every micro-batch, so a resumed run crops and flips as an uninterrupted one."""
    height, width = pixels.shape[1:]
    if center_crop:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = int(torch.randint(0, height - resolution + 1, ()))
        left = int(torch.randint(0, width - resolution + 1, ()))
    crop = pixels[:, top : top + resolution, left : left + resolution]
    if random_flip and bool(torch.rand(()) < 0.5):
        crop = crop.flip(-1)
    return crop
