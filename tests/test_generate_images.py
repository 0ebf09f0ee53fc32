"""`deltatune generate` on an image adapter: PNGs of the requested size, one per prompt x --num-images, the
same bytes for the same seed, different from the base pipeline's, whose own images (--base) equal a plain
pipeline's sampled with the same seed (the adapters disabled leave the base exactly)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deltatune.cli import main
from deltatune.io.pipelines import load_pipeline
from image_runs import image_files, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    files = image_files(tmp_path_factory.mktemp("t2i-generate"))
    config = write_config(files, "run", {"train_text_encoder": True}, max_steps=8, lr=5e-2)
    assert main(["train", str(config)]) == 0
    return files


def generate(trained, out: str, capsys, *extra: str) -> list[str]:
    args = ["generate", "--adapter", str(trained["root"] / "run"), "a red square", "a small blue square",
            "--steps", "3", "--num-images", "2", "--out", str(trained["root"] / out), *extra]
    assert main(args) == 0
    return capsys.readouterr().out.split()


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_deterministic_pngs_unlike_the_base(trained, capsys):
    paths = generate(trained, "first", capsys, "--seed", "7", "--base")
    ours = [p for p in paths if "/base-" not in p]
    base = [p for p in paths if "/base-" in p]
    assert [p.rsplit("/", 1)[1] for p in ours] == ["000-a-red-square.png", "001-a-red-square.png",
                                                   "002-a-small-blue-square.png", "003-a-small-blue-square.png"]
    assert all(pixels(p).shape == (32, 32, 3) for p in paths)  # the pipeline's own size (latent 16 x VAE 2)
    again = generate(trained, "second", capsys, "--seed", "7")
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(ours, again))
    other_seed = generate(trained, "third", capsys, "--seed", "8")
    assert not np.array_equal(pixels(ours[0]), pixels(other_seed[0]))
    assert all(not np.array_equal(pixels(a), pixels(b)) for a, b in zip(ours, base))

    # --base's images are the plain pipeline's (no adapter loaded), with the same seed per prompt
    pipeline = load_pipeline(trained["pipeline"])
    with torch.no_grad():
        plain = pipeline("a red square", num_inference_steps=3, num_images_per_prompt=2, guidance_scale=7.5,
                         generator=torch.Generator().manual_seed(7)).images
    assert np.array_equal(np.asarray(plain[0]), pixels(base[0]))
    assert np.array_equal(np.asarray(plain[1]), pixels(base[1]))


def test_generate_size_and_errors(trained, capsys):
    paths = generate(trained, "sized", capsys, "--height", "16", "--width", "48")
    assert pixels(paths[0]).shape == (16, 48, 3)
    assert main(["generate", "--adapter", str(trained["root"]), "x"]) == 2  # a folder with no adapter
    assert main(["generate", "--adapter", str(trained["root"] / "run"), "x", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "--steps 0: must be >= 1" in err
