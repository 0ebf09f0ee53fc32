"""A run whose loss or gradient stops being finite stops with an error naming the step, and leaves what
is on disk as it was: the last checkpoint, the adapter of an earlier run, metrics without NaN."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from deltatune import cli
from deltatune.train.config_file import load_config
from deltatune.train.loop import train
from deltatune.train.run.divergence import DivergenceError, check_step
from helpers_train import make_tiny_model_dir, upper_rows, write_config, write_jsonl

QUIET = {"show_progress": False, "log": lambda *_: None}
DIVERGED = r"^training diverged at step (\d+): the (loss is (nan|inf)|gradient norm is (nan|inf) \(loss .*\)); "


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("diverge")
    return {
        "root": root,
        "model": make_tiny_model_dir(root / "model"),
        "train": write_jsonl(root / "train.jsonl", upper_rows(24)),
    }


def config_file(files, name: str, **training):
    return write_config(files["root"] / f"{name}.yaml", files["model"], files["train"], None,
                        files["root"] / name, **training)


def file_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finite_params(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("max_grad_norm", [1.0, None], ids=["clipped", "unclipped"])
def test_diverging_run_stops_at_the_first_bad_step(files, max_grad_norm):
    """`training.lr=100` (issue 15, 6): the error names step k; a run stopped after k-1 steps is finite
    everywhere, so k is the first step that went bad, and nothing of step k reached the disk."""
    name = f"lr100_{max_grad_norm}"
    path = config_file(files, name, lr=100.0, max_steps=30, save_every=2, warmup_steps=0)
    with pytest.raises(DivergenceError, match=DIVERGED) as caught:
        train(load_config(path), **QUIET)
    step = int(re.match(DIVERGED, str(caught.value)).group(1))
    assert 1 <= step < 30
    out = files["root"] / name
    assert not (out / "adapter_model.safetensors").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == step - 1 and all(math.isfinite(v) for v in losses)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []
    assert kept[-1:] == ([f"step-{2 * ((step - 1) // 2):06d}"] if step > 2 else [])
    for folder in kept:  # no NaN reached a checkpoint
        tensors = load_file(str(out / "checkpoints" / folder / "trainable.safetensors"))
        assert all(torch.isfinite(t).all() for t in tensors.values())
    if step > 1:  # the same run, stopped just before: every parameter finite, the loss too
        before = train(load_config(path, [f"output_dir={files['root'] / (name + '_before')}"]),
                       stop_after=step - 1, **QUIET)
        assert finite_params(before.model)


def test_divergence_on_resume_leaves_adapter_and_checkpoint_untouched(files, capsys):
    """A finished run, resumed to train longer at a rate that diverges: its adapter, checkpoints and
    metrics stay byte for byte, and the command line prints one error line naming the step."""
    path = config_file(files, "good", max_steps=6, save_every=2)
    train(load_config(path), **QUIET)
    out = files["root"] / "good"
    before = file_bytes(out)
    before.pop("run_config.yaml")  # rewritten with the new values and a header saying so
    before.pop("metrics.jsonl")  # the resume record is appended (checked below)
    status = cli.main(["train", str(path), "training.max_steps=40", "training.lr=1000", "--resume"])
    captured = capsys.readouterr()
    assert status == 2 and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and captured.err.rstrip("\n").endswith(errors[0])  # the last line, alone
    assert re.match("error: " + DIVERGED[1:], errors[0]), errors[0]
    after = file_bytes(out)
    assert {k: after.get(k) for k in before} == before  # adapter, loss.png and checkpoint 4 untouched
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_check_step_names_the_step_and_lets_a_scaler_skip_pass(tmp_path):
    """An fp16 loss scaler skips an overflowing step on its own (the gradient norm is inf there): not
    divergence. A non-finite loss is, whatever the scaler did."""
    check_step(7, 2.5, float("inf"), True, tmp_path, 1e-3)  # skipped by the scaler: no error
    check_step(7, 2.5, 0.3, False, tmp_path, 1e-3)
    with pytest.raises(DivergenceError) as caught:
        check_step(7, 2.5, float("inf"), False, tmp_path, 1e-3)
    assert str(caught.value) == (
        "training diverged at step 7: the gradient norm is inf (loss 2.5); nothing from this step was saved "
        "and no adapter was written; no checkpoint was saved yet: start again with a lower training.lr "
        "(now 0.001)"
    )
    with pytest.raises(DivergenceError, match=r"^training diverged at step 8: the loss is nan; "):
        check_step(8, float("nan"), float("inf"), True, tmp_path, 1e-3)
