"""`deltatune train` runs every kind of method through the one loop: the loop calls the training-time
hooks (AdaLoRA's budget, ReLoRA's merge-and-reset, Child-Tuning's masks), adds regularisers, shapes the
learning rate for ReLoRA, scores soft-prompt models, and validates model.quantize before loading."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from deltatune import DeltaConfigError
from deltatune.train.config_file import load_config
from deltatune.train.loop import train
from helpers_train import make_tiny_model_dir, upper_rows, write_config, write_jsonl

QUIET = {"show_progress": False, "log": lambda *_: None}
METHODS = {  # method section of the run config
    "lora": {"name": "lora", "r": 4, "target_modules": "all-linear"},
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1,
                "total_step": 6, "target_modules": ["q_proj", "v_proj"]},
    "relora": {"name": "relora", "r": 4, "relora_steps": 3, "relora_warmup_steps": 1,
               "target_modules": ["q_proj", "v_proj"]},
    "child_tuning": {"name": "child_tuning", "child_tuning_mode": "F", "reserve_p": 0.5,
                     "target_modules": ["q_proj"]},
    "child_tuning_d": {"name": "child_tuning", "child_tuning_mode": "D", "reserve_p": 0.25, "fisher_batches": 2,
                       "target_modules": ["q_proj", "v_proj"]},
    "prompt_tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4, "task_type": "CAUSAL_LM"},
    "ia3": {"name": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"]},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    return {"root": root, "model": make_tiny_model_dir(root / "model"),
            "train": write_jsonl(root / "train.jsonl", upper_rows(24)),
            "eval": write_jsonl(root / "eval.jsonl", upper_rows(4, 50))}


def run_config(files, name: str, method: dict, training: dict | None = None, **model):
    path = write_config(files["root"] / f"{name}.yaml", files["model"], files["train"], files["eval"],
                        files["root"] / name, **(training or {}))
    data = yaml.safe_load(path.read_text())
    data["method"] = method
    data["model"].update(model)
    path.write_text(yaml.safe_dump(data))
    return load_config(path, [])


@pytest.mark.parametrize("name", list(METHODS))
def test_every_kind_of_method_trains_through_the_loop(files, name):
    result = train(run_config(files, name, METHODS[name]), **QUIET)
    out = files["root"] / name
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == result.model.peft_config["default"].peft_type
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # six finite steps
    if name == "child_tuning_d":  # the loop estimated the Fisher mask first: one global top-25% child
        layers = [layer.adapters["default"] for _, layer in result.model.delta_layers()]
        kept = sum(int(adapter.child_mask.sum()) for adapter in layers)
        assert kept == math.ceil(0.25 * sum(adapter.child_mask.numel() for adapter in layers))
        assert all(((adapter.child_delta != 0) <= (adapter.child_mask > 0)).all() for adapter in layers)
        assert sum(saved["child_entries"].values()) > 0
    if name == "adalora":  # the budget ran: the final rank pattern (target_r per layer on average) is saved
        kept = [sum(mask) for mask in saved["rank_pattern"].values()]
        assert len(kept) == 4 and sum(kept) == 2 * 4


def test_relora_resets_and_rewarms_the_learning_rate(files):
    constant = {"schedule": "constant", "warmup_steps": 0, "lr": 1e-2}
    train(run_config(files, "relora_lr", METHODS["relora"], constant), **QUIET)
    lrs = [json.loads(line)["lr"] for line in (files["root"] / "relora_lr" / "metrics.jsonl").read_text()
           .splitlines() if '"lr"' in line]
    # resets after steps 3 and 6 (1-based); each following step re-warms: half the rate, then full
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 1e-2, 1e-2])


def test_model_quantize_is_checked_before_anything_loads(files):
    with pytest.raises(DeltaConfigError, match="model.quantize"):
        run_config(files, "bad_quant", METHODS["lora"], quantize="nf3")
