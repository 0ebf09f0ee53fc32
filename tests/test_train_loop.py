"""The training loop on a tiny random Llama: outputs on disk, resume equality, gradient checkpointing
with a frozen embedding, bf16 autocast, schedules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from deltatune.train.loop import train
from deltatune.train.run.schedule import lr_factor
from helpers_train import QUIET, run_config, run_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("loop")
    return run_files(root)


def config_for(files, name: str, overrides=(), with_eval: bool = False, **training):
    return run_config(files, name, overrides, with_eval, **training)


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def test_run_writes_adapter_metrics_and_plot(files):
    config = config_for(files, "plain", with_eval=True, eval_every=3)
    result = train(config, **QUIET)
    out = files["root"] / "plain"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "run_config.yaml",
    ):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert {"lr", "tokens_per_s", "peak_mem_mb", "epoch"} <= set(steps[0])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and "exact_match" in evals[-1] and "eval_ppl" in evals[-1]
    assert result.metrics["eval_samples"] == 4 and len(result.predictions) == 4
    # the saved adapter is the trained model's adapter, and it moved away from its initial value
    trained = {n: p for n, p in result.model.named_parameters() if "lora_B" in n}
    assert all(p.abs().sum() > 0 for p in trained.values())


def test_resume_gives_the_same_adapter(files):
    """A run killed after step 5 (last checkpoint at step 4) and resumed ends where an uninterrupted
    run ends, with dropout, gradient accumulation, warmup and a second epoch in play."""
    settings = {"max_steps": 8, "save_every": 2, "grad_accum": 2, "batch_size": 3, "warmup_steps": 2}
    train(config_for(files, "straight", **settings), **QUIET)
    killed = config_for(files, "killed", **settings)
    train(killed, stop_after=5, **QUIET)
    checkpoints = sorted(p.name for p in (files["root"] / "killed" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002", "step-000004"]
    assert not (files["root"] / "killed" / "adapter_model.safetensors").exists()
    train(killed, resume=True, **QUIET)
    a, b = adapter(files["root"] / "straight"), adapter(files["root"] / "killed")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    straight = (files["root"] / "straight" / "metrics.jsonl").read_text().splitlines()
    resumed = (files["root"] / "killed" / "metrics.jsonl").read_text().splitlines()
    assert len(straight) == len(resumed)  # steps after the checkpoint were dropped, then redone


def test_resume_without_checkpoint_is_a_clear_error(files):
    from deltatune.core.config import DeltaConfigError

    with pytest.raises(DeltaConfigError, match="--resume: no checkpoint"):
        train(config_for(files, "never"), resume=True, **QUIET)


def test_gradient_checkpointing_matches_plain_training(files):
    """With a frozen embedding, checkpointed blocks still pass gradients to the adapters."""
    settings = {"max_steps": 2, "lr": 1e-3}
    plain = train(config_for(files, "gc_off", ["method.lora_dropout=0"], **settings), **QUIET)
    checkpointed = train(
        config_for(files, "gc_on", ["method.lora_dropout=0"], gradient_checkpointing=True, **settings),
        **QUIET,
    )
    base = checkpointed.model.get_base_model()
    assert any(getattr(m, "gradient_checkpointing", False) for m in base.modules())
    a, b = adapter(files["root"] / "gc_off"), adapter(files["root"] / "gc_on")
    moved = [k for k in a if "lora_B" in k and a[k].abs().sum() > 0]
    assert len(moved) == len([k for k in a if "lora_B" in k])  # every adapter got a gradient
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    del plain


def test_offloaded_checkpoints_hold_layer_inputs_in_host_memory(files, monkeypatch):
    """training.offload_checkpoints: each checkpointed layer's input goes through save_on_cpu (a no-op
    copy on this CPU machine, a device-to-host move on a GPU) and training ends with the same adapter."""
    packed_shapes = []

    class Recording(torch.autograd.graph.save_on_cpu):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pack = self.pack_hook
            self.pack_hook = lambda tensor: (packed_shapes.append(tuple(tensor.shape)), pack(tensor))[1]

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Recording)
    settings = {"max_steps": 2, "lr": 1e-3, "gradient_checkpointing": True}
    train(config_for(files, "gc_plain", ["method.lora_dropout=0"], **settings), **QUIET)
    assert packed_shapes == []
    result = train(config_for(files, "gc_offload", ["method.lora_dropout=0", "training.offload_checkpoints=true"],
                              **settings), **QUIET)
    hidden = result.model.get_base_model().config.hidden_size
    layers = result.model.get_base_model().config.num_hidden_layers
    assert sum(shape[-1] == hidden and len(shape) == 3 for shape in packed_shapes) >= 2 * layers  # 2 steps
    a, b = adapter(files["root"] / "gc_plain"), adapter(files["root"] / "gc_offload")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_bf16_autocast_trains(files):
    result = train(config_for(files, "bf16", with_eval=True, precision="bf16", max_steps=2), **QUIET)
    assert result.metrics["eval_loss"] == pytest.approx(result.metrics["eval_loss"])  # finite
    assert torch.isfinite(torch.tensor(result.metrics["eval_loss"]))


def test_epochs_and_packing(files):
    result = train(
        config_for(
            files,
            "epochs",
            ["data.packing=true", "data.max_length=128", "training.max_steps=null", "training.epochs=2"],
            batch_size=2,
        ),
        **QUIET,
    )
    records = [json.loads(x) for x in (files["root"] / "epochs" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == records[-1]["step"] and records[-1]["epoch"] >= 2.0
    assert result.steps < 24  # 24 rows, two epochs of batch 2: packing put several rows in each sequence


def test_schedules():
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0


def test_compiled_training_matches_eager(files):
    """training.compile: Inductor-compiled decoder body, same adapter after two steps as eager (dropout 0)."""
    settings = {"max_steps": 2, "lr": 1e-3}
    eager = train(config_for(files, "compile_off", ["method.lora_dropout=0"], **settings), **QUIET)
    said = []
    compiled = train(config_for(files, "compile_on", ["method.lora_dropout=0"], compile=True, **settings),
                     show_progress=False, log=said.append)
    assert any("training.compile: on a CPU" in line for line in said)  # measured slower here: it says so
    body = compiled.model.get_base_model().base_model
    assert body._compiled_call_impl is not None  # the body really ran compiled
    assert eager.model.get_base_model().base_model._compiled_call_impl is None
    a, b = adapter(files["root"] / "compile_off"), adapter(files["root"] / "compile_on")
    assert all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # every adapter moved
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
