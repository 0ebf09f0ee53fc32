"""A training run killed with SIGKILL at a random step and resumed ends with the adapter an uninterrupted
run gives; two runs with the same seed write byte-identical adapters; a checkpoint save that fails
(disk full) names the file and leaves the previous checkpoint loadable; a torn metrics line, a killed
save or prune, and a stale lock never block `--resume`; an adapter save killed between its two files
is refused at load; two trainers on one folder: the second gets one clear error."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import deltatune as dt
import deltatune.io.adapter_files as adapter_files
import deltatune.io.atomic as atomic
import deltatune.train.run.checkpoint as checkpoint
from deltatune.core.config import DeltaConfigError
from deltatune.io.adapter_files import AdapterFileError
from deltatune.io.atomic import WriteError
from deltatune.train.config_file import load_config
from deltatune.train.loop import train
from deltatune.train.run.output_dir import claim_output_dir
from helpers_train import ROOT, make_tiny_model_dir, upper_rows, write_config, write_jsonl
from tiny_models import tiny_llama

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


def test_a_failed_checkpoint_save_names_the_file_says_the_disk_is_full_and_keeps_the_previous_one(
        files, monkeypatch):
    config = load_config(config_file(files, "disk_full"), [])
    real_save = checkpoint.save_file

    def fills_the_disk(tensors, path, *args, **kwargs):
        if ".step-000003." in str(path):  # the third checkpoint: write part of it, then fail
            open(path, "wb").write(b"\0" * 64)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_the_disk)
    with pytest.raises(WriteError, match="step-000003: could not write it: the disk is full") as raised:
        train(config, show_progress=False, log=lambda *_: None)
    assert raised.value.errno == errno.ENOSPC
    saved = checkpoint.list_checkpoints(files["root"] / "disk_full")
    assert [p.name for p in saved] == ["step-000001", "step-000002"]  # nothing half-written among them
    assert sorted(p.name for p in (files["root"] / "disk_full" / "checkpoints").iterdir()) == [
        "step-000001", "step-000002"]  # and no temporary folder left behind
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    resumed = train(load_config(config_file(files, "disk_full"), []), resume=True,
                    show_progress=False, log=lambda *_: None)
    assert resumed.steps == STEPS


def test_a_full_disk_on_the_final_adapter_is_one_clear_line_and_resume_finishes(files, monkeypatch):
    path = config_file(files, "full_at_end")
    real_write = atomic.write_bytes

    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full(target, data):  # the final adapter's write meets a full disk; checkpoints still fit
        return real_write(target, data) if "checkpoints" in str(target) else atomic.atomic_write(target, no_space)

    monkeypatch.setattr(adapter_files, "write_bytes", full)
    message = r"full_at_end/adapter_model.safetensors: could not write it: the disk is full"
    with pytest.raises(WriteError, match=message):
        train(load_config(path, []), show_progress=False, log=lambda *_: None)
    monkeypatch.setattr(adapter_files, "write_bytes", real_write)
    assert not (files["root"] / "full_at_end" / "adapter_model.safetensors").exists()
    assert not [p for p in (files["root"] / "full_at_end").iterdir() if p.name.endswith(".tmp")]
    assert train(load_config(path, []), resume=True, show_progress=False, log=lambda *_: None).steps == STEPS


def killed_run(files, name: str, stop_after: int = 5, **training) -> tuple:
    """A run that stopped at `stop_after` as if killed (checkpoints every step, the newest 2 kept)."""
    path = write_config(files["root"] / f"{name}.yaml", files["model"], files["train"], None,
                        files["root"] / name, max_steps=8, save_every=1, **training)
    train(load_config(path, []), stop_after=stop_after, show_progress=False, log=lambda *_: None)
    return path, files["root"] / name


def resume(path):
    return train(load_config(path, []), resume=True, show_progress=False, log=lambda *_: None)


def test_resume_tolerates_a_torn_last_metrics_line(files):
    path, out = killed_run(files, "torn")
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"step": 6, "loss": 0.12')  # killed in the middle of a write
    assert resume(path).steps == 8
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))  # the torn line is gone


def test_resume_removes_temporaries_and_counts_only_complete_checkpoints(files):
    path, out = killed_run(files, "leftovers")
    root = out / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000004", "step-000005"]
    stale_save = root / ".step-000006.abc123"  # a save killed before its rename
    stale_save.mkdir()
    (stale_save / "trainable.safetensors").write_bytes(b"\0" * 10)
    stale_delete = root / ".step-000003.deleting"  # a prune killed part way
    stale_delete.mkdir()
    stale_file = out / ".adapter_model.safetensors.a1b2c3d4.tmp"  # an atomic write killed part way
    stale_file.write_bytes(b"\0" * 10)
    (root / "step-000005" / "trainable.safetensors").unlink()  # a checkpoint damaged after it was saved
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-000004"]
    resumed = resume(path)
    assert resumed.steps == 8
    assert not stale_save.exists() and not stale_delete.exists() and not stale_file.exists()
    straight = files["root"] / "leftovers_straight"
    train(load_config(write_config(files["root"] / "ls.yaml", files["model"], files["train"], None, straight,
                                   max_steps=8, save_every=1), []), show_progress=False, log=lambda *_: None)
    for key, tensor in load_file(str(straight / "adapter_model.safetensors")).items():
        torch.testing.assert_close(load_file(str(out / "adapter_model.safetensors"))[key], tensor,
                                   atol=1e-6, rtol=0)  # resumed from step 4: the same adapter


def test_an_interrupted_prune_never_leaves_a_half_deleted_checkpoint(files, monkeypatch):
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        path = Path(path)
        if path.is_dir() and path.name.startswith(".step-") and path.name.endswith(".deleting"):
            next(path.glob("*.safetensors")).unlink()  # some files gone, then the process dies
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        killed_run(files, "prune", stop_after=8)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    out = files["root"] / "prune"
    folders = [p.name for p in checkpoint.checkpoint_folders(out)]
    assert folders == ["step-000002", "step-000003"]  # step-1 was being pruned: it no longer counts
    assert all(checkpoint.is_complete(p) for p in checkpoint.checkpoint_folders(out))


def test_an_adapter_save_killed_between_its_two_files_refuses_to_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    model.peft_config["default"].lora_alpha = 64  # the next save differs in config and weights
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(1.0)
    real_replace = os.replace

    def killed_after_the_weights(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("adapter_model.safetensors"):
            raise KeyboardInterrupt  # SIGINT/kill between the two renames

    monkeypatch.setattr(atomic.os, "replace", killed_after_the_weights)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    with pytest.raises(AdapterFileError, match="interrupted between adapter_model.safetensors and adapter_c"):
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    model.save_pretrained(tmp_path)  # saving again completes the pair
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].lora_alpha == 64
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in loaded.named_parameters():
        if name in trained:
            assert torch.equal(param, trained[name]), name
    assert not (tmp_path / ".adapter_save.json").exists()


@pytest.mark.parametrize("killed_at", ["before the weights", "after the config"])
def test_an_adapter_save_killed_outside_the_window_loads_one_whole_save(tmp_path, monkeypatch, killed_at):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    old = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model.peft_config["default"].lora_alpha = 64
    real_replace, real_unlink = os.replace, Path.unlink

    def killed_before_weights(src, dst):
        if str(dst).endswith("adapter_model.safetensors"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    def killed_before_journal_goes(self, *args, **kwargs):
        if self.name == ".adapter_save.json":
            raise KeyboardInterrupt
        return real_unlink(self, *args, **kwargs)

    if killed_at == "before the weights":
        monkeypatch.setattr(atomic.os, "replace", killed_before_weights)
    else:
        monkeypatch.setattr(Path, "unlink", killed_before_journal_goes)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert (tmp_path / ".adapter_save.json").exists()
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    expected = 8 if killed_at == "before the weights" else 64  # the old save (default alpha), or the new one
    assert loaded.peft_config["default"].lora_alpha == expected
    if killed_at == "before the weights":
        assert all((tmp_path / name).read_bytes() == data for name, data in old.items())


def test_two_trainers_on_one_output_dir_the_second_gets_one_clear_error(files):
    out = files["root"] / "shared"
    path = write_config(files["root"] / "shared.yaml", files["model"], files["train"], None, out,
                        max_steps=100_000, save_every=1)  # outlasts the second run's start
    first = cli(str(path))
    deadline = time.monotonic() + 240
    while not checkpoint.list_checkpoints(out):  # the first run is writing
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
        time.sleep(0.05)
    for extra in ((), ("--resume",)):
        second = cli(str(path), *extra)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2
        assert err.strip().splitlines() == [
            f"error: output_dir={out}: another run (pid {first.pid}) is writing in it; wait for it to end or "
            "choose another output_dir"]
    assert first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[:-1]]  # last: torn?
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one writer only
    with claim_output_dir(out, resume=True, overwrite=False):  # the killed run's lock went with it
        pass


def test_a_lock_held_in_this_process_refuses_a_second_run_and_is_released_after_a_crash(files):
    path, out = killed_run(files, "locked", stop_after=2)
    with claim_output_dir(out, resume=True, overwrite=False):
        with pytest.raises(DeltaConfigError, match="another run .* is writing in it"):
            resume(path)
    with pytest.raises(RuntimeError, match="crash"), claim_output_dir(out, resume=True, overwrite=False):
        raise RuntimeError("crash")
    assert resume(path).steps == 8  # the lock went with the crash
