"""Best-checkpoint selection and early stopping (training.metric_for_best, early_stopping_patience,
load_best_at_end): the stopping step for an evaluation sequence we control, the saved adapter equal to
the best checkpoint's, the state surviving --resume, and refusals before any model loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.core.config import DeltaConfigError
from deltatune.train import finish, loop
from deltatune.train.loop import train
from deltatune.train.run.early_stop import BestTracker
from helpers_train import QUIET, run_cli, run_config, run_files, write_config

# eval loss by step: best at 2, then worse at 3 and 4 -> patience 2 stops after step 4
LOSSES = {1: 3.0, 2: 2.0, 3: 2.5, 4: 2.4, 5: 1.0, 6: 0.5, 7: 0.4, 8: 0.3}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("early")
    return run_files(root)


def config_for(files, name: str, overrides=(), with_eval: bool = True, **training):
    return run_config(files, name, overrides, with_eval, **training)


@pytest.fixture
def scripted_evals(monkeypatch):
    """The loop's evaluations return LOSSES[step] (the step read from the optimizer count so far)."""
    calls = []

    def evaluate(config, accelerator, model, tokenizer, eval_set, generation):
        calls.append(len(calls))
        return {"eval_loss": LOSSES[steps_done[0]], "eval_ppl": 1.0}, []

    steps_done = [0]
    original = loop.log_record

    def count_steps(accelerator, record, kind):  # train records come every step (log_every=1)
        if kind == "train":
            steps_done[0] = record["step"]
        original(accelerator, record, kind)

    monkeypatch.setattr(loop, "evaluate_run", evaluate)
    monkeypatch.setattr(loop, "log_record", count_steps)
    return calls


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_tracker_counts_evaluations_without_improvement():
    model = torch.nn.Linear(2, 2)
    tracker = BestTracker("eval_loss", patience=2, threshold=0.1, keep_weights=True)
    seen = []
    for step, value in [(1, 3.0), (2, 2.0), (3, 1.95), (4, 1.5), (5, 1.6), (6, 1.7), (7, 0.1)]:
        torch.nn.init.constant_(model.weight, float(step))
        seen.append((tracker.update(step, {"eval_loss": value}, model), tracker.should_stop))
    # 1.95 beats 2.0 by less than the threshold 0.1: no improvement
    assert seen == [(True, False), (True, False), (False, False), (True, False), (False, False),
                    (False, True), (True, False)]
    assert tracker.best_step == 7 and tracker.best_weights["weight"].eq(7.0).all()
    scores = BestTracker("exact_match", patience=1)
    assert scores.update(1, {"exact_match": 50.0}, model)
    assert not scores.update(2, {"exact_match": 25.0}, model)
    assert scores.should_stop and scores.best_weights == {}  # weights only kept for load_best_at_end


def test_patience_stops_and_the_saved_adapter_is_the_best_checkpoint(files, scripted_evals):
    config = config_for(files, "stop", max_steps=8, eval_every=1, save_every=1, keep_checkpoints=20,
                        early_stopping_patience=2, load_best_at_end=True)
    result = train(config, **QUIET)
    out = files["root"] / "stop"
    found = records(out)
    assert max(r["step"] for r in found if "loss" in r) == 4 and result.steps == 4
    assert len(scripted_evals) == 4
    (best,) = [r["best"] for r in found if "best" in r]
    assert best == {"metric": "eval_loss", "best_step": 2, "best_value": 2.0, "evals_without_improvement": 2,
                    "stopped_early": True, "loaded_best": True}
    saved = load_file(str(out / "adapter_model.safetensors"))
    at_best = load_file(str(out / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-000004" / "adapter_model.safetensors"))
    assert saved.keys() == at_best.keys()
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert any(not torch.equal(saved[k], last[k]) for k in saved)  # steps 3-4 moved the adapter
    # the final evaluation (finish.py, not scripted) measured the best adapter
    assert found[-1]["step"] == 4 and "eval_loss" in found[-1]


def test_without_load_best_the_last_adapter_is_saved(files, scripted_evals):
    config = config_for(files, "last", max_steps=8, eval_every=1, save_every=1, keep_checkpoints=20,
                        early_stopping_patience=2)
    train(config, **QUIET)
    out = files["root"] / "last"
    saved = load_file(str(out / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-000004" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], last[k]) for k in saved)
    assert [r["best"]["loaded_best"] for r in records(out) if "best" in r] == [False]


def test_resume_keeps_the_count_and_the_best_weights(files, scripted_evals):
    """Killed after step 3 (one evaluation without improvement counted), resumed: it stops at step 4
    as the straight run does, and saves the same best adapter (step 2's, from the checkpoint)."""
    settings = dict(max_steps=8, eval_every=1, save_every=1, keep_checkpoints=20, early_stopping_patience=2,
                    load_best_at_end=True)
    killed = config_for(files, "killed", **settings)
    train(killed, stop_after=3, **QUIET)
    result = train(killed, resume=True, **QUIET)
    assert result.steps == 4
    out = files["root"] / "killed"
    saved = load_file(str(out / "adapter_model.safetensors"))
    at_best = load_file(str(out / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)


def test_a_generation_metric_is_measured_during_training(files, monkeypatch):
    seen = []
    original = finish.score_answers

    def spy(*args, **kwargs):
        seen.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(finish, "score_answers", spy)
    config = config_for(files, "em", ["eval.exact_match=false"], max_steps=4, eval_every=2,
                        metric_for_best="exact_match")
    train(config, **QUIET)
    evals = [r for r in records(files["root"] / "em") if "eval_loss" in r]
    assert [("exact_match" in r, r["step"]) for r in evals] == [(True, 2), (True, 4), (False, 4)]
    assert len(seen) == 2  # steps 2 and 4; the final evaluation follows eval.exact_match=false
    (best,) = [r["best"] for r in records(files["root"] / "em") if "best" in r]
    assert best["metric"] == "exact_match" and best["best_step"] in (2, 4)


@pytest.mark.parametrize(
    "overrides, with_eval, message",
    [
        (["training.early_stopping_patience=2", "training.eval_every=1"], False,
         "training.metric_for_best='eval_loss': needs data.eval"),
        (["training.load_best_at_end=true"], True,
         "training.metric_for_best='eval_loss': needs training.eval_every > 0"),
        (["training.metric_for_best=accuracy", "training.eval_every=1"], True,
         "training.metric_for_best='accuracy': data.eval is scored by exact_match"),
        (["training.load_best_at_end=true", "training.eval_every=1", "method.name=relora"], True,
         "training.load_best_at_end=true: RELORA changes the model between optimizer steps"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_loading(files, monkeypatch, overrides, with_eval,
                                                               message):
    def refuse(*_, **__):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(loop, "load_base", refuse)
    monkeypatch.setattr(loop, "load_tokenizer", refuse)
    config = config_for(files, "refused", overrides, with_eval=with_eval)
    with pytest.raises(DeltaConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        train(config, **QUIET)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.metric_for_best=bleu", "training.metric_for_best='bleu': must be one of"),
        ("training.early_stopping_patience=0", "training.early_stopping_patience=0: must be >= 1"),
    ],
)
def test_config_errors_name_the_key(files, override, message):
    with pytest.raises(DeltaConfigError, match=message):
        config_for(files, "bad", [override])


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_processes_stop_at_the_same_step(files, tmp_path):
    """Only rank 0 evaluates; its decision reaches rank 1 (accelerate's trigger), so both processes stop
    after step 2 and the run ends instead of hanging in the next step's all-reduce."""
    out = tmp_path / "ddp"
    config = write_config(tmp_path / "ddp.yaml", files["model"], files["train"], files["eval"], out,
                          max_steps=6, batch_size=2, eval_every=1, early_stopping_patience=1,
                          early_stopping_threshold=100.0, load_best_at_end=True)
    launched = run_cli("--standalone", "--nproc-per-node", "2", "-m", "deltatune", "train", str(config),
                       "eval.exact_match=false", module="torch.distributed.run", timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    found = records(out)
    assert max(r["step"] for r in found if "loss" in r) == 2
    (best,) = [r["best"] for r in found if "best" in r]
    assert best["best_step"] == 1 and best["stopped_early"]
    assert "stopped early at step 2 of 6" in launched.stdout
