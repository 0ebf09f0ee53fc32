"""`deltatune train` with model.task: text-to-image on a tiny Stable-Diffusion-style pipeline folder: the
loss falls on a fixed (noise, timestep) set, the run writes the same files as a text run, resume ends where
an uninterrupted run ends, the text encoder is adapted only when asked, bf16 autocast runs, and every
adapter family of the issue trains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.io.pipelines import load_pipeline
from deltatune.train import load_config, train
from deltatune.train.image.generate import load_adapted_pipeline
from image_runs import fixed_set_loss, image_files, write_config

QUIET = {"show_progress": False, "log": lambda *_: None}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return image_files(tmp_path_factory.mktemp("t2i"))


def adapter(folder, component: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / component / "adapter_model.safetensors"))


def test_training_lowers_the_noise_prediction_loss(files, capsys):
    """Through the CLI: the UNet's loss on a fixed set of (noise, timestep) pairs over the training images
    falls by more than 5% after 20 steps (LoRA's zero-initialised B makes the base the starting point)."""
    before = fixed_set_loss(load_pipeline(files["pipeline"]), files["data"])
    assert main(["train", str(write_config(files, "falls", max_steps=20, lr=3e-2, save_every=10))]) == 0
    out = files["root"] / "falls"
    after = fixed_set_loss(load_adapted_pipeline(out)[0], files["data"])
    assert after < 0.95 * before, (before, after)
    # the same outputs as a text run: adapter, metrics log, loss plot, run config, checkpoints
    for name in ("adapter/unet/adapter_config.json", "adapter/unet/adapter_model.safetensors", "metrics.jsonl",
                 "loss.png", "run_config.yaml", "checkpoints/step-000010/adapter/unet/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["data"]["train"] == {"images": 8, "class_images": 0}
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21)) and {"images_per_s", "lr", "epoch"} <= set(steps[0])
    config = json.loads((out / "adapter" / "unet" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]  # the default targets
    assert config["base_model_name_or_path"] == str(files["pipeline"].resolve())
    assert "trainable params" in capsys.readouterr().out


def test_resume_gives_the_same_adapter(files):
    """Killed after step 5 (last checkpoint at step 4) and resumed: the same adapters as an uninterrupted run,
    with random crops and flips, grad accumulation, prior preservation and a text-encoder adapter in play."""
    image = {"random_flip": True, "train_text_encoder": True, "class_data": str(files["classes"]),
             "class_prompt": "a square", "snr_gamma": 5.0}
    settings = {"max_steps": 7, "save_every": 2, "grad_accum": 2, "batch_size": 2, "warmup_steps": 2}
    assert main(["train", str(write_config(files, "straight", image, **settings))]) == 0
    killed = load_config(write_config(files, "killed", image, **settings))
    train(killed, stop_after=5, **QUIET)
    assert not (files["root"] / "killed" / "adapter").exists()
    assert main(["train", str(files["root"] / "killed.yaml"), "--resume"]) == 0
    for component in ("unet", "text_encoder"):
        a, b = adapter(files["root"] / "straight", component), adapter(files["root"] / "killed", component)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_text_encoder_adapter_only_when_asked(files):
    """train_text_encoder: true puts an adapter on CLIP's q/k/v/out_proj and trains it (its B leaves zero);
    without it the text encoder gets no adapter and its weights do not move."""
    result = train(load_config(write_config(files, "te", {"train_text_encoder": True}, max_steps=3)), **QUIET)
    saved = adapter(files["root"] / "te", "text_encoder")
    assert {k.split(".")[-3] for k in saved} == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)
    assert result.model.text_encoder.get_nb_trainable_parameters()[0] > 0

    base = load_pipeline(files["pipeline"]).text_encoder.state_dict()
    result = train(load_config(write_config(files, "no-te", max_steps=3)), **QUIET)
    assert not (files["root"] / "no-te" / "adapter" / "text_encoder").exists()
    assert not any(p.requires_grad for p in result.model.text_encoder.parameters())
    after = result.model.text_encoder.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


@pytest.mark.parametrize("method", [
    {"name": "lora", "r": 4, "use_dora": True},
    {"name": "loha", "r": 4},
    {"name": "lokr", "r": 4},
    {"name": "oft", "oft_block_size": 4},
])
def test_adapter_families_train_on_the_unet(files, method):
    """DoRA, LoHa, LoKr and OFT train through the same run config section and save per component."""
    name = f"family-{method['name']}{'-dora' if method.get('use_dora') else ''}"
    train(load_config(write_config(files, name, method=method, max_steps=2)), **QUIET)
    saved = adapter(files["root"] / name)
    assert saved and all(torch.isfinite(v).all() for v in saved.values())


def test_bf16_autocast_runs(files):
    """training.precision: bf16 runs the forward under CPU bf16 autocast; the loss stays finite and the
    adapter stays float32 (the weights' own dtype)."""
    result = train(load_config(write_config(files, "bf16", precision="bf16", max_steps=2)), **QUIET)
    records = [json.loads(line) for line in (files["root"] / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert {v.dtype for v in adapter(files["root"] / "bf16").values()} == {torch.float32}
    assert result.steps == 2
