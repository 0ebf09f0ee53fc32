"""model.task chooses the head: a BERT encoder trains a sequence-classification head from the CLI (its loss
starts near ln(num_labels), not ln(vocab)), and a causal-LM config on an encoder-only checkpoint is refused
with the checkpoint's class, never trained as a random LM head."""

from __future__ import annotations

import json
import math
import string

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.core.config import DeltaConfigError
from deltatune.train.config_file import load_config
from helpers_train import fresh_clone

CHARS = list(string.ascii_lowercase + string.digits + string.punctuation)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + CHARS + ["##" + c for c in CHARS]


def make_tiny_bert_dir(path):
    """A 2-layer random BertModel (no task head, as sentence encoders ship) with a character WordPiece
    tokenizer, saved as a Transformers directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast(str(path / "vocab.txt"))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_tiny_bert_dir(tmp_path_factory.mktemp("bert") / "model")


@pytest.fixture
def clone(tmp_path, monkeypatch):
    return fresh_clone(tmp_path, monkeypatch)


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_classification_example_holds_out_its_eval_rows(clone):
    config = load_config("examples/classification.yaml")
    texts = {name: {line.split(",")[0] for line in open(getattr(config.data, name)).read().splitlines()[1:]}
             for name in ("train", "eval")}
    assert texts["eval"] and not texts["train"] & texts["eval"]


def test_cli_trains_a_classification_head_on_an_encoder(clone, bert, capsys):
    overrides = [f"model.name_or_path={bert}", "model.task=sequence_classification",
                 "method.target_modules=[query, value]", "training.max_steps=6", "training.lr=1e-2",
                 "output_dir=runs/bert-cls"]
    assert main(["train", "examples/classification.yaml", *overrides]) == 0
    out = clone / "runs/bert-cls"
    steps = [r for r in records(out / "metrics.jsonl") if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 0.35  # two labels: ln 2 = 0.69, not ln(141) = 4.95
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and "classifier" in saved["modules_to_save"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    head = [k for k in weights if "classifier" in k]
    assert head and weights[[k for k in head if k.endswith("weight")][0]].shape == (2, 32)
    final = records(out / "metrics.jsonl")[-1]
    assert final["eval_samples"] == 8 and "accuracy" in final
    answers = records(out / "predictions.jsonl")
    assert {a["answer"] for a in answers} <= {"negative", "positive"} and len(answers) == 8
    assert 100 * sum(a["exact_match"] for a in answers) / 8 == final["accuracy"]
    # the saved adapter (LoRA + the trained head) reloads to the same scores
    assert main(["eval", "examples/classification.yaml", *overrides]) == 0
    again = json.loads((out / "eval_metrics.json").read_text())
    assert again["accuracy"] == final["accuracy"]
    assert again["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-4)
    capsys.readouterr()
    # --adapter alone cannot know the class names: refused with the way that works
    assert main(["eval", "--adapter", str(out), "--data", "examples/data/sentiment_eval.csv"]) == 2
    assert "deltatune eval CONFIG.yaml" in capsys.readouterr().err


def test_causal_lm_on_an_encoder_is_refused(clone, bert, capsys):
    args = ["train", "examples/classification.yaml", f"model.name_or_path={bert}",
            "method.target_modules=[query, value]", "output_dir=runs/refused"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a BertModel, not a causal language model" in err and "BertLMHeadModel" in err
    assert "model.task: sequence_classification" in err
    assert not (clone / "runs/refused/adapter_model.safetensors").exists()


def test_task_settings_are_checked(clone):
    with pytest.raises(DeltaConfigError, match="model.task='regression': must be one of"):
        load_config("examples/classification.yaml", ["model.task=regression"])
    with pytest.raises(DeltaConfigError, match="data.packing=True: packs token sequences"):
        load_config("examples/classification.yaml", ["model.task=sequence_classification", "data.packing=true"])
    with pytest.raises(DeltaConfigError, match=r"method.task_type='SEQ_CLS': disagrees with model.task=causal_lm"):
        load_config("examples/classification.yaml", ["method.task_type=SEQ_CLS"])
    config = load_config("examples/classification.yaml", ["model.task=sequence_classification"])
    assert config.method_config().task_type.value == "SEQ_CLS"
