"""`deltatune eval` and the end of `deltatune train` show progress on stderr and write their answers as
JSON lines (prompt, reference, answer, exact-match flag) next to their metrics."""

from __future__ import annotations

import json

import pytest

from deltatune.cli import main
from helpers_train import make_tiny_model_dir, upper_rows, write_config, write_jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalout")
    model = make_tiny_model_dir(root / "model")
    train_file = write_jsonl(root / "train.jsonl", upper_rows(8))
    eval_file = write_jsonl(root / "eval.jsonl", upper_rows(6, 40))
    config = write_config(root / "run.yaml", model, train_file, eval_file, root / "out", max_steps=2)
    assert main(["train", str(config), "eval.max_samples=null", "eval.batch_size=4"]) == 0
    return {"root": root, "config": config, "eval": eval_file, "out": root / "out"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_train_writes_its_answers(run):
    rows = read_jsonl(run["out"] / "predictions.jsonl")
    final = [json.loads(x) for x in (run["out"] / "metrics.jsonl").read_text().splitlines()][-1]
    expected = [r["messages"] for r in upper_rows(6, 40)]
    assert len(rows) == final["eval_samples"] == 6
    assert [r["reference"] for r in rows] == [m[-1]["content"] for m in expected]
    for row, messages in zip(rows, expected):
        assert set(row) == {"where", "prompt", "reference", "answer", "exact_match"}
        # the prompt as the model saw it: the chat template up to the assistant's turn
        assert row["prompt"].endswith(f"{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n")
        assert row["exact_match"] == (row["answer"].strip() == row["reference"].strip())
    assert rows[0]["where"].endswith("eval.jsonl:1")
    assert 100 * sum(r["exact_match"] for r in rows) / len(rows) == final["exact_match"]


def test_eval_config_and_adapter_write_answers_and_show_progress(run, capsys):
    assert main(["eval", str(run["config"]), "eval.max_samples=null", "eval.batch_size=4"]) == 0
    captured = capsys.readouterr()
    assert "eval loss" in captured.err and "generate" in captured.err and "answer" in captured.err  # the bars
    from_config = read_jsonl(run["out"] / "eval_predictions.jsonl")
    metrics = json.loads((run["out"] / "eval_metrics.json").read_text())
    assert metrics["eval_samples"] == 6 and metrics["adapter"] == str(run["out"])
    # the same adapter on the same rows answers as it did at the end of training
    trained = read_jsonl(run["out"] / "predictions.jsonl")
    assert [r["answer"] for r in from_config] == [r["answer"] for r in trained]

    # an eval file whose references are the model's own answers for half the rows: the flags and the
    # score must both count exactly those rows
    rows = upper_rows(6, 40)
    hits = 0
    for i, (row, answer) in enumerate(zip(rows, from_config)):
        if i % 2 == 0 and answer["answer"].strip():
            row["messages"][-1]["content"] = answer["answer"]
            hits += 1
    own = write_jsonl(run["root"] / "own.jsonl", rows)
    out = run["root"] / "adapter-eval"
    args = ["eval", "--adapter", str(run["out"]), "--data", str(own), "--max-new-tokens", "8", "--out", str(out)]
    assert main(args) == 0
    answers = read_jsonl(out / "eval_predictions.jsonl")
    assert hits >= 1 and sum(r["exact_match"] for r in answers) == hits
    assert json.loads((out / "eval_metrics.json").read_text())["exact_match"] == pytest.approx(100 * hits / 6)
    assert [r["answer"] for r in answers] == [r["answer"] for r in from_config]
    # loss only: no answers, and none left from before
    assert main(["eval", "--adapter", str(run["out"]), "--data", str(own), "--max-samples", "0",
                 "--out", str(out)]) == 0
    assert not (out / "eval_predictions.jsonl").exists() and "exact_match" not in json.loads(
        (out / "eval_metrics.json").read_text())


def test_unwritable_out_stops_before_loading(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    args = ["eval", "--adapter", str(run["out"]), "--data", str(run["eval"]), "--out", str(blocker / "sub")]
    assert main(args) == 2
    assert "error: --out=" in capsys.readouterr().err
