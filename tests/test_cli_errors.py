"""Every config or data error reaches the user of `deltatune train` as one `error:` line on stderr that
names the field (dotted) or file:line and the expected form, with exit status 2 and no traceback. Each
input below is replayed through the command line's entry point; none of them loads a model."""

from __future__ import annotations

import dataclasses
import json

import pytest

from deltatune import cli
from deltatune.errors import DeltaConfigError, DeltaError, VocabularyMismatchError
from deltatune.train.config import TrainingSection


def run_train(capsys, *args: str) -> str:
    """Run `deltatune train ARGS`; return its single stderr line after checking status and shape."""
    status = cli.main(["train", *args])
    captured = capsys.readouterr()
    assert status == 2, captured
    assert "Traceback" not in captured.err and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  train: train.jsonl\ntraining:\n  max_steps: 3\n", encoding="utf-8")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI"}]}] * 2
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "override, line",
    [
        ("method.target_modules=5",
         "error: method.target_modules=5: must be a list of strings or a string or null"),
        ("training.lr=abc", "error: training.lr='abc': must be a number"),
        ("training.lr=.inf", "error: training.lr=inf: must be a finite number"),
        ("training.weight_decay=.inf", "error: training.weight_decay=inf: must be a finite number"),
        ("training.epochs=.inf", "error: training.epochs=inf: must be a finite number"),
        ("method.lora_alpha=.nan", "error: method.lora_alpha=nan: must be a finite number"),
        ("method.r=abc", "error: method.r='abc': must be an integer"),
        ("training.lr=[unclosed",
         "error: override 'training.lr=[unclosed': the value is not valid YAML (expected ',' or ']', but "
         "got '<stream end>' at line 1, column 10); expected training.lr=VALUE with a YAML value, e.g. 1e-3, "
         "true, [q_proj, v_proj] or 'quoted text'"),
        ("method.rr=4", "error: unknown key method.rr for LORA (did you mean 'method.r'?)"),
    ],
)
def test_config_errors_are_one_line(capsys, config, override, line):
    assert run_train(capsys, str(config), override) == line


def test_unknown_key_names_the_nearest_and_the_valid_keys(capsys, config):
    valid = sorted(f.name for f in dataclasses.fields(TrainingSection))
    assert run_train(capsys, str(config), "training.lrr=1") == (
        f"error: unknown key training.lrr (did you mean 'training.lr'?); valid keys: {valid}"
    )


def test_invalid_yaml_file_names_file_and_line(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("training:\n  max_steps: 3\n  lr: [1e-3,\n", encoding="utf-8")
    assert run_train(capsys, str(path)) == (
        f"error: {path}:4: not valid YAML (expected the node content, but found '<stream end>' at line 4, "
        "column 1); expected sections of key: value lines"
    )


def test_a_prompt_completion_row_among_chats_is_named_as_such(capsys, config, tmp_path):
    """It used to say the row's 'conversations' field was not a list: a field the row never had."""
    data = tmp_path / "train.jsonl"
    with open(data, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"prompt": "hi", "completion": "HI"}) + "\n")
    assert run_train(capsys, str(config)) == (
        f"error: {data}:3: a prompt_completion row (keys ['completion', 'prompt']) in a file whose first "
        f"row ({data}:1) is messages; expected every row in the messages format"
    )
    assert run_train(capsys, str(config), "data.format=messages") == (
        f"error: {data}:3: missing field 'messages' (a list of {{role, content}} messages, or ShareGPT's "
        "'conversations'); row has ['completion', 'prompt']"
    )


def test_a_row_that_fits_no_format_keeps_its_own_message(capsys, config, tmp_path):
    data = tmp_path / "train.jsonl"
    with open(data, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"question": "hi"}) + "\n")
    assert run_train(capsys, str(config)) == (
        f"error: {data}:3: missing field 'messages' (a list of {{role, content}} messages, or ShareGPT's "
        "'conversations'); row has ['question']"
    )


def test_data_error_after_truncation_names_the_file(capsys, config, tmp_path):
    """Caught at tokenization (needs a tokenizer): here through the library call the CLI makes."""
    from deltatune.train.data.files import DataError, read_rows
    from deltatune.train.data.formats import to_samples
    from deltatune.train.data.tokenize import encode
    from helpers_train import make_tokenizer

    samples, _ = to_samples(read_rows(tmp_path / "train.jsonl"))
    with pytest.raises(DataError) as caught:
        encode(samples, make_tokenizer(), max_length=8)
    assert str(caught.value) == (
        f"{tmp_path / 'train.jsonl'}: no usable rows: every row has no answer token within "
        "data.max_length=8 (empty, or cut off); expected rows whose answer starts within max_length tokens"
    )


# ---------------------------------------------------------------------- caught by class, not by name
class RenamedConfigError(DeltaConfigError):
    """A DeltaError under a name the CLI never listed (the old check compared class-name strings)."""


@pytest.mark.parametrize("error", [
    RenamedConfigError("method.r=0: must be a positive integer"),
    VocabularyMismatchError("expert: vocabulary of 10 tokens; expected the base's 12"),
    IsADirectoryError("data.train: is a folder"),  # an OSError the CLI never listed: still a traceback
])
def test_every_delta_error_is_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setattr(cli, "_train", fail)
    if not isinstance(error, DeltaError):  # a bug or an unexpected OS failure: the traceback stays
        with pytest.raises(type(error)):
            cli.main(["train", "run.yaml"])
        return
    assert run_train(capsys, "run.yaml") == f"error: {error}"


def test_builtin_missing_file_and_module_errors_stay_one_line(capsys, monkeypatch):
    for error in (FileNotFoundError("config file 'x.yaml' not found"), ModuleNotFoundError("No module named 'wandb'"),
                  FileExistsError("out: exists")):
        monkeypatch.setattr(cli, "_train", lambda args, error=error: (_ for _ in ()).throw(error))
        assert run_train(capsys, "run.yaml") == f"error: {error}"
