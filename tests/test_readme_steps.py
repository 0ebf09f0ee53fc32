"""The README's "Training on your own data" steps replayed literally in a fresh folder (a copy of
examples/), on a tiny model: data paths that work after `cp examples/own_data.yaml my_run.yaml`, an error
that names the key, the absolute paths tried and the rule, a command-line stopping rule that replaces the
YAML's, `key=null`, and a `method.name` switch that makes the documented `convert` step's input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from deltatune.cli import main
from deltatune.core.config import DeltaConfigError
from deltatune.train.config_file import load_config
from helpers_train import fresh_clone, make_tiny_model_dir

QUICK = ["training.max_steps=2", "training.save_every=0", "training.eval_every=0", "eval.max_new_tokens=4"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("readme") / "model")


@pytest.fixture
def clone(tmp_path, monkeypatch):
    return fresh_clone(tmp_path, monkeypatch)


def test_copied_example_finds_its_data(clone):
    shutil.copy("examples/own_data.yaml", "my_run.yaml")  # cp examples/own_data.yaml my_run.yaml
    config = load_config("my_run.yaml", ["training.lr=5e-4", "method.r=16"])
    assert Path(config.data.train).resolve() == clone / "examples/data/support_train.jsonl"
    assert Path(config.data.eval).resolve() == clone / "examples/data/support_eval.jsonl"
    # the example run in place finds the same files (looked up next to the YAML, then here)
    assert Path(load_config("examples/own_data.yaml").data.train).resolve() == Path(config.data.train).resolve()


def test_data_next_to_the_yaml_wins(clone):
    (clone / "elsewhere").mkdir()
    (clone / "elsewhere" / "t.jsonl").write_text('{"text": "a"}\n')
    (clone / "t.jsonl").write_text('{"text": "b"}\n')
    (clone / "elsewhere" / "run.yaml").write_text("data:\n  train: t.jsonl\n")
    assert Path(load_config("elsewhere/run.yaml").data.train).resolve() == clone / "elsewhere" / "t.jsonl"
    # an override path is relative to the current directory
    config = load_config("elsewhere/run.yaml", ["data.train=t.jsonl"])
    assert Path(config.data.train).resolve() == clone / "t.jsonl"


def test_missing_data_names_key_paths_and_rule(clone, capsys):
    Path("my_run.yaml").write_text(
        Path("examples/own_data.yaml").read_text().replace("examples/data/support_train", "mine/train")
    )
    assert main(["train", "my_run.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.train='mine/train.jsonl' (in my_run.yaml): data file not found")
    assert f"looked for {clone / 'mine/train.jsonl'}" in err  # next to the YAML (here the same folder)
    assert "next to that file, then in the current directory" in err and "\n" not in err
    (clone / "sub").mkdir()
    shutil.copy("my_run.yaml", "sub/my_run.yaml")
    with pytest.raises(Exception,
                       match=f"looked for {clone / 'sub/mine/train.jsonl'} and {clone / 'mine/train.jsonl'}"):
        load_config("sub/my_run.yaml")
    with pytest.raises(Exception, match=rf"data.eval='nope.jsonl' \(on the command line\).*{clone / 'nope.jsonl'}"
                                        r".*current directory"):
        load_config("examples/own_data.yaml", ["data.eval=nope.jsonl"])
    # a bad key is named before a missing file
    with pytest.raises(DeltaConfigError, match="did you mean 'training.lr'"):
        load_config("my_run.yaml", ["training.lrr=1"])


def test_readme_steps_replayed(clone, model, capsys):
    """cp, train as the README shows, then the LoHa run and the `convert` step the README shows."""
    shutil.copy("examples/own_data.yaml", "my_run.yaml")
    method = yaml.safe_load(Path("my_run.yaml").read_text())["method"]
    epochs = yaml.safe_load(Path("my_run.yaml").read_text())["training"]["epochs"]
    tiny = [f"model.name_or_path={model}", *QUICK]
    assert main(["train", "my_run.yaml", *tiny]) == 0
    err = capsys.readouterr().err
    assert f"note: training.max_steps=2 (command line) replaces training.epochs={epochs} from the config file" in err
    assert (clone / "runs/own-data/adapter_model.safetensors").is_file()
    lora = json.loads((clone / "runs/own-data/adapter_config.json").read_text())
    # the run that makes runs/loha: switching the method drops the LoRA-only keys, with a note
    assert main(["train", "my_run.yaml", "method.name=loha", "output_dir=runs/loha", *tiny]) == 0
    err = capsys.readouterr().err
    assert f"dropped method.lora_alpha={method['lora_alpha']}, method.lora_dropout={method['lora_dropout']}" in err
    saved = json.loads((clone / "runs/loha/adapter_config.json").read_text())
    assert saved["peft_type"] == "LOHA" and saved["r"] == method["r"]  # r and target_modules carried over
    assert saved["target_modules"] == lora["target_modules"]
    args = ["convert", "--to", "lora", "--rank", "16", "--adapter", "runs/loha", "--out", "runs/loha-as-lora"]
    assert main(args) == 0
    assert json.loads((clone / "runs/loha-as-lora/adapter_config.json").read_text())["peft_type"] == "LORA"


def test_stopping_rules(clone):
    config = load_config("examples/own_data.yaml", ["training.max_steps=2"], log=lambda _: None)
    assert (config.training.max_steps, config.training.epochs) == (2, None)
    Path("steps.yaml").write_text("training:\n  max_steps: 7\n")
    notes = []
    config = load_config("steps.yaml", ["training.epochs=2"], log=notes.append)
    assert (config.training.max_steps, config.training.epochs) == (None, 2.0)
    assert notes == ["training.epochs=2 (command line) replaces training.max_steps=7 from the config file"]
    with pytest.raises(DeltaConfigError, match="set either training.max_steps or training.epochs, not both"):
        load_config("steps.yaml", ["training.epochs=2", "training.max_steps=3"])
    Path("both.yaml").write_text("training:\n  max_steps: 7\n  epochs: 2\n")
    with pytest.raises(DeltaConfigError, match="not both"):
        load_config("both.yaml")


def _lora_yaml() -> str:
    """The shipped own-data example with a fixed LoRA method section, so these rules do not follow the
    example's tuning."""
    raw = yaml.safe_load(Path("examples/own_data.yaml").read_text())
    raw["method"] = {"name": "lora", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                     "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    Path("lora.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return "lora.yaml"


def test_null_removes_a_key(clone):
    notes = []
    example = _lora_yaml()
    base = load_config(example, log=notes.append)
    assert base.method_config().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and not notes
    config = load_config(
        example,
        ["method.target_modules=null", "training.lr=null", "training.epochs=null", "eval.max_new_tokens="],
    )
    assert "target_modules" not in config.method and config.method_config().target_modules is None
    assert config.training.lr == 2e-4 and config.training.epochs == 1.0  # the defaults
    assert config.eval.max_new_tokens == 64
    # where null is a setting of its own, it is set: no gradient clipping (the default clips at 1.0)
    assert load_config(example, ["training.max_grad_norm=null"]).training.max_grad_norm is None
    # in the YAML, null is a value like any other, checked against the field
    Path("null.yaml").write_text("training:\n  schedule: null\n")
    with pytest.raises(DeltaConfigError, match="training.schedule=None: must be a string, not null"):
        load_config("null.yaml")
    assert load_config("null.yaml", ["training.schedule=null"]).training.schedule == "cosine"
    # the last override wins
    assert load_config(example, ["method.r=null", "method.r=4"]).method["r"] == 4


def test_method_switch(clone):
    notes = []
    example = _lora_yaml()
    config = load_config(example, ["method.name=LoHa", "method.alpha=4"], log=notes.append)
    assert config.method == {"name": "LoHa", "r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                             "alpha": 4}
    assert notes == ["method.name=LoHa (command line): dropped method.lora_alpha=16, method.lora_dropout=0.05 "
                     "from the config file (LoHaConfig has no such keys)"]
    # a key given on the command line is never dropped: it is checked against the new method
    with pytest.raises(DeltaConfigError, match="unknown key method.lora_alpha for LOHA"):
        load_config(example, ["method.name=loha", "method.lora_alpha=8"])
    # without a switch, an unknown key in the file stays an error (a typo is never dropped)
    Path("typo.yaml").write_text("method:\n  name: lora\n  lora_alpah: 4\n")
    with pytest.raises(DeltaConfigError, match="did you mean 'method.lora_alpha'"):
        load_config("typo.yaml")
    with pytest.raises(DeltaConfigError, match="did you mean 'method.lora_alpha'"):
        load_config("typo.yaml", ["method.name=lora"])  # the same method: nothing is dropped
