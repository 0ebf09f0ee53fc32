"""A training run killed with SIGKILL at a random step and resumed ends with the adapter an uninterrupted
run gives; two runs with the same seed write byte-identical adapters; a checkpoint save that fails
(disk full) leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers_train import ROOT, make_tiny_model_dir, upper_rows, write_config, write_jsonl
from safetensors.torch import load_file

import deltatune.train.checkpoint as checkpoint
from deltatune.train.config_file import load_config
from deltatune.train.loop import train

STEPS = 16  # the kill lands in the first half: the steps left outlast the polling delay


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    return {"root": root, "model": make_tiny_model_dir(root / "model"),
            "train": write_jsonl(root / "train.jsonl", upper_rows(32))}


def config_file(files, name: str):
    return write_config(files["root"] / f"{name}.yaml", files["model"], files["train"], None,
                        files["root"] / name, max_steps=STEPS, save_every=1)


def cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "deltatune", "train", *args], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]


def test_sigkill_at_a_random_step_then_resume_matches_and_reruns_are_byte_identical(files):
    for name in ("straight", "again"):
        finish(cli(str(config_file(files, name))))
    straight = files["root"] / "straight" / "adapter_model.safetensors"
    assert straight.read_bytes() == (files["root"] / "again" / "adapter_model.safetensors").read_bytes()

    killed_at = random.Random().randint(1, STEPS // 2)
    path = config_file(files, "killed")
    process = cli(str(path))
    deadline = time.monotonic() + 240
    while not any(int(p.name[5:]) >= killed_at for p in checkpoint.list_checkpoints(files["root"] / "killed")):
        assert process.poll() is None and time.monotonic() < deadline, "run ended before the kill"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (files["root"] / "killed" / "adapter_model.safetensors").exists()
    finish(cli(str(path), "--resume"))
    resumed = load_file(str(files["root"] / "killed" / "adapter_model.safetensors"))
    for key, tensor in load_file(str(straight)).items():
        torch.testing.assert_close(resumed[key], tensor, atol=1e-6, rtol=0, msg=f"{key} (killed at {killed_at})")


def test_a_failed_checkpoint_save_keeps_the_previous_one(files, monkeypatch):
    config = load_config(config_file(files, "disk_full"), [])
    real_save = checkpoint.save_file
    calls = []

    def fills_the_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:  # the third checkpoint: write part of it, then fail
            open(path, "wb").write(b"\0" * 64)
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    with pytest.raises(OSError, match="No space"):
        train(config, show_progress=False, log=lambda *_: None)
    saved = checkpoint.list_checkpoints(files["root"] / "disk_full")
    assert [p.name for p in saved] == ["step-000001", "step-000002"]  # nothing half-written among them
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    resumed = train(load_config(config_file(files, "disk_full"), []), resume=True,
                    show_progress=False, log=lambda *_: None)
    assert resumed.steps == STEPS
