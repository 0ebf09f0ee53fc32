"""`--resume` against the config (and training data) a checkpoint was made with: a change that would
make the files lie is refused by field name before any model loads; the changes listed in
SAFE_ON_RESUME really apply from the resumed step on and are recorded."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from deltatune import cli
from deltatune.core.config import DeltaConfigError
from deltatune.train import loop
from deltatune.train.config_file import load_config
from deltatune.train.loop import train
from deltatune.train.run.resume_check import SAFE_ON_RESUME
from deltatune.train.run.schedule import lr_factor
from helpers_train import make_tiny_model_dir, upper_rows, write_config, write_jsonl

QUIET = {"show_progress": False, "log": lambda *_: None}
MAY_CHANGE = ", ".join(SAFE_ON_RESUME)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = make_tiny_model_dir(root / "model")
    data = write_jsonl(root / "train.jsonl", upper_rows(24))
    # one run stopped after step 3 (checkpoint at step 2), shared by the refusal tests
    path = write_config(root / "base.yaml", model, data, None, root / "base", max_steps=8, save_every=2)
    train(load_config(path), stop_after=3, **QUIET)
    return {"root": root, "model": model, "train": data, "base": path}


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_model_loads(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(loop, "load_base", refuse)
    monkeypatch.setattr(loop, "load_tokenizer", refuse)


def refusal(checkpoint, *changes: str) -> str:
    return (
        f"--resume: {checkpoint} was trained with other values of {', '.join(changes)}; these cannot "
        f"change within a run (fields that may: {MAY_CHANGE}); expected the old values, or a fresh run "
        "in another output_dir"
    )


@pytest.mark.parametrize(
    "overrides, changes",
    [
        (["method.r=8"], ["method.r 4 -> 8"]),  # was a raw size-mismatch traceback
        (["method.lora_alpha=16"], ["method.lora_alpha 8 -> 16"]),  # was resumed silently
        (["method.use_dora=true"], ["method.use_dora False -> True"]),
        (["method.target_modules=[q_proj]"], ["method.target_modules 'all-linear' -> ['q_proj']"]),
        (["training.batch_size=2", "training.seed=4"], ["training.batch_size 4 -> 2", "training.seed 3 -> 4"]),
        (["data.max_length=32"], ["data.max_length 64 -> 32"]),
        (["model.dtype=bf16"], ["model.dtype 'float32' -> 'bfloat16'"]),
    ],
)
def test_changed_fields_are_refused_by_name_before_loading(files, monkeypatch, overrides, changes):
    out = files["root"] / "base"
    before = folder_bytes(out)
    no_model_loads(monkeypatch)
    with pytest.raises(DeltaConfigError) as caught:
        train(load_config(files["base"], overrides), resume=True, **QUIET)
    checkpoint = out / "checkpoints" / "step-000002"
    assert str(caught.value) == refusal(checkpoint, *changes)
    assert folder_bytes(out) == before


def test_changed_training_data_is_refused_by_content(files, monkeypatch):
    """Compared by SHA-256 of the whole file: other rows at another path are refused; the same bytes at
    another path are not a change."""
    changed = write_jsonl(files["root"] / "other.jsonl", upper_rows(24, offset=3))
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (files["train"], changed)}
    sizes = {p: p.stat().st_size for p in (files["train"], changed)}
    no_model_loads(monkeypatch)
    with pytest.raises(DeltaConfigError) as caught:
        train(load_config(files["base"], [f"data.train={changed}"]), resume=True, **QUIET)
    old = f"sha256 {digest[files['train']]} ({sizes[files['train']]} bytes)"
    new = f"sha256 {digest[changed]} ({sizes[changed]} bytes)"
    assert str(caught.value) == refusal(files["root"] / "base" / "checkpoints" / "step-000002",
                                        f"data.train {old!r} -> {new!r}")


def test_moved_data_with_the_same_content_resumes(files):
    root = files["root"]
    path = write_config(root / "moved.yaml", files["model"], files["train"], None, root / "moved", max_steps=4,
                        save_every=2)
    train(load_config(path), stop_after=3, **QUIET)
    copy = root / "copy.jsonl"
    copy.write_bytes(files["train"].read_bytes())
    result = train(load_config(path, [f"data.train={copy}"]), resume=True, **QUIET)
    assert result.steps == 4 and (root / "moved" / "adapter_model.safetensors").is_file()
    assert not [r for r in records(root / "moved") if "resumed" in r]  # nothing changed


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def logged_lrs(out) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in records(out) if "loss" in r}


def test_changed_lr_applies_from_the_resumed_step_and_is_recorded(files):
    """It was ignored while run_config.yaml recorded it (issue 15, 7): steps 1-2 ran at 1e-2, steps 3-8
    run at 5e-3 on the same linear schedule, and both files say so."""
    root = files["root"]
    path = write_config(root / "lr.yaml", files["model"], files["train"], None, root / "lr", max_steps=8,
                        save_every=2)
    train(load_config(path), stop_after=3, **QUIET)
    train(load_config(path, ["training.lr=5e-3"]), resume=True, **QUIET)
    lrs = logged_lrs(root / "lr")
    expected = {s: (1e-2 if s <= 2 else 5e-3) * lr_factor(s - 1, 8, 1, "linear") for s in range(1, 9)}
    assert lrs == pytest.approx(expected, rel=1e-12)
    resumed = [r for r in records(root / "lr") if "resumed" in r]
    assert resumed == [{"step": 2, "resumed": "step-000002", "changed": {"training.lr": [0.01, 0.005]}}]
    text = (root / "lr" / "run_config.yaml").read_text()
    assert text.splitlines()[0] == (
        "# resumed at step 2 from step-000002 with training.lr 0.01 -> 0.005 (steps 1-2 ran with the earlier "
        "values)"
    )
    assert yaml.safe_load(text)["training"]["lr"] == 5e-3


def test_a_longer_run_stretches_the_schedule(files):
    root = files["root"]
    path = write_config(root / "long.yaml", files["model"], files["train"], None, root / "long", max_steps=4,
                        save_every=2)
    train(load_config(path), **QUIET)  # finished: checkpoint at step 2, adapter at step 4
    result = train(load_config(path, ["training.max_steps=10"]), resume=True, **QUIET)
    assert result.steps == 10
    lrs = logged_lrs(root / "long")
    expected = {s: 1e-2 * lr_factor(s - 1, 4 if s <= 2 else 10, 1, "linear") for s in range(1, 11)}
    assert lrs == pytest.approx(expected, rel=1e-12)
    with pytest.raises(DeltaConfigError) as caught:
        train(load_config(path, ["training.max_steps=6"]), resume=True, **QUIET)  # newest: step 8
    assert str(caught.value) == (
        "--resume: training.max_steps=6 ends at or before step-000008; expected a run longer than 8 steps"
    )


def test_cli_refusal_is_one_line(files, capsys):
    status = cli.main(["train", str(files["base"]), "method.r=8", "--resume"])
    captured = capsys.readouterr()
    checkpoint = files["root"] / "base" / "checkpoints" / "step-000002"
    assert status == 2 and "Traceback" not in captured.err
    assert captured.err == "error: " + refusal(checkpoint, "method.r 4 -> 8") + "\n"
