"""Training options users reach for: the optimizer (and its resume), NEFTune noise, experiment trackers
through accelerate, `merge --dtype`, and the loss plot (title, learning-rate axis, a missing matplotlib)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import tomllib
import torch
from safetensors.torch import load_file

from deltatune import cli
from deltatune.core.config import DeltaConfigError
from deltatune.train import loop
from deltatune.train.config import TrainingSection
from deltatune.train.loop import train
from deltatune.train.run.checkpoint import decode_state, encode_state
from deltatune.train.run.neftune import add_neftune
from deltatune.train.run.optim import make_optimizer
from deltatune.train.run.plot import loss_figure
from helpers_train import QUIET, ROOT, run_config, run_files, write_config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    return run_files(root)


def config_for(files, name: str, overrides=(), with_eval: bool = False, **training):
    return run_config(files, name, overrides, with_eval, **training)


def adapter(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


def refuse_loading(monkeypatch):
    def refuse(*_, **__):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(loop, "load_base", refuse)
    monkeypatch.setattr(loop, "load_tokenizer", refuse)


# ------------------------------------------------------------------------------------------ optimizer
OPTIMIZERS = [
    {"optimizer": "adamw", "adam_beta1": 0.8, "adam_beta2": 0.99, "adam_epsilon": 1e-6},
    {"optimizer": "adamw_8bit"},
    {"optimizer": "sgd", "momentum": 0.9},
    {"optimizer": "adafactor"},
]


@pytest.mark.parametrize("settings", OPTIMIZERS, ids=lambda s: s["optimizer"])
def test_each_optimizer_steps_and_its_state_round_trips(settings):
    """Each optimizer moves its parameters, and its state survives the checkpoint encoding exactly:
    a restored copy takes the same next step as the original."""
    torch.manual_seed(0)
    weights = [torch.randn(64, 80), torch.randn(80)]  # 5,120 elements: 8-bit AdamW quantizes the first
    training = TrainingSection(max_steps=1, lr=1e-2, weight_decay=0.01, **settings)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = make_optimizer(params, training)
    for _ in range(2):
        for p in params:
            p.grad = torch.sin(p.detach() * 3)
        optimizer.step()
    assert all(not torch.equal(p.detach(), w) for p, w in zip(params, weights))
    tensors: dict = {}
    state = decode_state(encode_state(optimizer.state_dict(), tensors), tensors)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = make_optimizer(copies, training)
    restored.load_state_dict(state)
    for group in (params, copies):
        for p in group:
            p.grad = torch.cos(p.detach())
    optimizer.step()
    restored.step()
    assert all(torch.equal(a, b) for a, b in zip(params, copies))
    if settings["optimizer"] == "adamw":
        assert optimizer.param_groups[0]["betas"] == (0.8, 0.99) and optimizer.param_groups[0]["eps"] == 1e-6
    if settings["optimizer"] == "adamw_8bit":
        assert optimizer.state[params[0]]["state1"].dtype == torch.uint8  # really 8-bit, on this CPU


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "sgd", "adafactor"])
def test_resume_restores_any_optimizer(files, optimizer):
    settings = {"max_steps": 6, "save_every": 2, "optimizer": optimizer}
    if optimizer == "sgd":
        settings.update(momentum=0.9, lr=0.5)
    train(config_for(files, f"straight_{optimizer}", **settings), **QUIET)
    killed = config_for(files, f"killed_{optimizer}", **settings)
    train(killed, stop_after=3, **QUIET)
    train(killed, resume=True, **QUIET)
    a, b = adapter(files["root"] / f"straight_{optimizer}"), adapter(files["root"] / f"killed_{optimizer}")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it trained


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.optimizer=lion",
         r"training.optimizer='lion': must be one of \['adamw', 'adamw_8bit', 'sgd', 'adafactor'\]"),
        ("training.momentum=0.9", "training.momentum=0.9: training.optimizer='adamw' does not use it "
         r"\(it reads training.adam_beta1, training.adam_beta2, training.adam_epsilon\)"),
        ("training.adam_beta2=1.5", r"training.adam_beta2=1.5: must be in \[0, 1\)"),
        ("training.neftune_noise_alpha=0", "training.neftune_noise_alpha=0.0: must be > 0"),
        ("training.report_to=comet", "training.report_to='comet': unknown tracker 'comet'"),
    ],
)
def test_option_errors_name_the_key(files, override, message):
    with pytest.raises(DeltaConfigError, match=message):
        config_for(files, "bad", [override])
    both = ["training.optimizer=sgd", "training.adam_beta1=0.9"]
    with pytest.raises(DeltaConfigError, match="training.adam_beta1=0.9: training.optimizer='sgd' does not"):
        config_for(files, "bad", both)


def test_transformers_optimizer_names_are_accepted(files):
    assert config_for(files, "a", ["training.optimizer=adamw_bnb_8bit"]).training.optimizer == "adamw_8bit"
    assert config_for(files, "alias", ["training.optimizer=adamw_torch"]).training.optimizer == "adamw"


def test_missing_bitsandbytes_is_refused_before_loading(files, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    refuse_loading(monkeypatch)
    with pytest.raises(DeltaConfigError, match="training.optimizer='adamw_8bit': needs the bitsandbytes"):
        train(config_for(files, "no_bnb", optimizer="adamw_8bit"), **QUIET)


# ------------------------------------------------------------------------------------------ NEFTune
def test_neftune_noise_in_training_only_and_within_its_bound(files):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(files["model"])
    ids = torch.randint(0, 200, (3, 17))
    embedding = model.get_input_embeddings()
    clean = embedding(ids).detach()
    reference = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    alpha = 5.0
    handle = add_neftune(model, alpha)
    bound = alpha / math.sqrt(17 * clean.shape[-1])  # alpha / sqrt(L * d)
    model.train()
    noise = embedding(ids).detach() - clean
    assert noise.abs().max() <= bound * (1 + 1e-6)
    assert noise.abs().max() > 0.9 * bound and noise.abs().mean() > 0.4 * bound  # uniform on [-b, b]
    assert not torch.equal(embedding(ids), embedding(ids))  # fresh noise at every forward
    model.eval()
    assert torch.equal(embedding(ids), clean)
    assert torch.equal(model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False), reference)
    handle.remove()
    model.train()
    assert torch.equal(embedding(ids), clean)


def test_neftune_run_trains_with_noise_and_returns_a_clean_model(files):
    settings = {"max_steps": 2, "lr": 1e-3}
    plain = train(config_for(files, "no_noise", ["method.lora_dropout=0"], **settings), **QUIET)
    noisy = train(config_for(files, "noise", ["method.lora_dropout=0"], neftune_noise_alpha=50.0, **settings),
                  **QUIET)
    a, b = adapter(files["root"] / "no_noise"), adapter(files["root"] / "noise")
    assert any(not torch.allclose(a[k], b[k], atol=1e-7) for k in a if "lora_B" in k)
    embedding = noisy.model.get_base_model().get_input_embeddings()
    assert not embedding._forward_hooks  # the hook ends with training
    ids = torch.tensor([[5, 6, 7]])
    noisy.model.train()
    assert torch.equal(embedding(ids), plain.model.get_base_model().get_input_embeddings()(ids))


def test_share_dropout_masks_reaches_the_model_and_changes_the_draws(files):
    """training.share_dropout_masks=false gives each layer its own dropout mask (peft's way): the trained model
    carries the choice, and the same seed trains to other weights than with the shared masks."""
    settings = {"max_steps": 2, "lr": 1e-2}
    shared = train(config_for(files, "shared", ["method.lora_dropout=0.3"], **settings), **QUIET)
    own = train(config_for(files, "own", ["method.lora_dropout=0.3"], share_dropout_masks=False, **settings),
                **QUIET)
    assert shared.model.share_dropout_masks is True and own.model.share_dropout_masks is False
    a, b = adapter(files["root"] / "shared"), adapter(files["root"] / "own")
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_A" in k)


# ------------------------------------------------------------------------------------------ trackers
def test_tensorboard_events_hold_loss_and_lr(files):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = config_for(files, "tb", with_eval=True, max_steps=4, eval_every=2, report_to="tensorboard")
    train(config, **QUIET)
    out = files["root"] / "tb"
    events = EventAccumulator(str(out / "tensorboard" / "tb"))
    events.Reload()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for tag, key, source in (("train/loss", "loss", "loss"), ("train/lr", "lr", "loss"),
                             ("eval/loss", "eval_loss", "eval_loss")):
        scalars = [(e.step, e.value) for e in events.Scalars(tag)]
        expected = [(r["step"], r[key]) for r in logged if source in r]
        assert [s for s, _ in scalars] == [s for s, _ in expected], tag
        assert [v for _, v in scalars] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    assert [s for s, _ in [(e.step, e.value) for e in events.Scalars("eval/loss")]] == [2, 4]


@pytest.mark.parametrize("tracker", ["mlflow", "wandb", "trackio"])
def test_a_tracker_not_installed_is_refused_before_loading(files, monkeypatch, tracker):
    refuse_loading(monkeypatch)
    config = config_for(files, f"no_{tracker}", report_to=["tensorboard", tracker])
    expected = f"training.report_to='{tracker}': the {tracker} package is not installed \\(pip install "
    with pytest.raises(DeltaConfigError, match=expected):
        train(config, **QUIET)
    assert not (files["root"] / f"no_{tracker}" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------ merge --dtype
@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_merge_dtype_casts_the_float32_merge(files, tmp_path, dtype, torch_dtype):
    from transformers import AutoModelForCausalLM

    from deltatune import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(files["model"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model.peft_config["default"].base_model_name_or_path = str(files["model"])
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.save_pretrained(str(tmp_path / "adapter"))
    reference = {k: v for k, v in model.merge_and_unload().state_dict().items()}  # float32 merge
    assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "m"),
                     "--dtype", dtype]) == 0
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch_dtype}
    for key, tensor in saved.items():
        assert torch.equal(tensor, reference[key].to(torch_dtype)), key
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == str(torch_dtype).split(".")[1]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.dtype == torch_dtype


# ------------------------------------------------------------------------------------------ the plot
def test_loss_plot_has_the_run_title_and_a_learning_rate_axis():
    records = [{"step": s, "loss": 3.0 / s, "lr": 1e-3 * s / 4} for s in range(1, 5)] + [
        {"step": 4, "eval_loss": 1.0, "eval_ppl": 2.7}]
    fig = loss_figure(records, "my_run (lora)")
    loss_axis, lr_axis = fig.axes
    assert loss_axis.get_title() == "my_run (lora)" and lr_axis.get_ylabel() == "learning rate"
    (rate,) = lr_axis.get_lines()
    assert list(rate.get_xdata()) == [1, 2, 3, 4] and list(rate.get_ydata()) == [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    assert [line.get_label() for line in loss_axis.get_lines()] == ["train loss", "eval loss"]


def test_a_run_titles_its_plot(files, monkeypatch):
    from deltatune.train.run import plot

    titles = []
    original = plot.loss_figure
    def spy(records, title=None):
        titles.append(title)
        return original(records, title)

    monkeypatch.setattr(plot, "loss_figure", spy)
    train(config_for(files, "titled", max_steps=1), **QUIET)
    assert titles == ["titled (lora)"] and (files["root"] / "titled" / "loss.png").stat().st_size > 1000


def test_matplotlib_is_a_default_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(dep.split(">")[0].split("=")[0].strip() == "matplotlib" for dep in project["dependencies"])


def test_without_matplotlib_a_run_says_so_in_one_line(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config_for(files, "no_plot", max_steps=1), show_progress=False, log=lines.append)
    out = files["root"] / "no_plot"
    assert not (out / "loss.png").exists() and (out / "adapter_model.safetensors").is_file()
    assert lines[-1] == (f"adapter and metrics.jsonl written to {out}; no loss.png: matplotlib is not "
                         "installed (pip install matplotlib)")
    assert not [w for w in caught if "matplotlib" in str(w.message)]


def test_without_matplotlib_the_cli_prints_no_warning_source_line(files, tmp_path):
    config = write_config(tmp_path / "c.yaml", files["model"], files["train"], None, tmp_path / "run",
                          max_steps=1)
    code = ("import sys; sys.modules['matplotlib'] = None; from deltatune.cli import main; "
            f"sys.exit(main(['train', {str(config)!r}]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no loss.png: matplotlib is not installed (pip install matplotlib)" in result.stdout
    assert "warn" not in result.stderr.lower() and "matplotlib" not in result.stderr


def test_a_checkpoint_from_before_these_options_resumes(files):
    """A checkpoint whose stored config predates a field ran with that field's default: --resume takes
    it (it used to be refused as `training.optimizer None -> 'adamw'`)."""
    config = config_for(files, "older", max_steps=4, save_every=2)
    train(config, stop_after=3, **QUIET)
    state_file = files["root"] / "older" / "checkpoints" / "step-000002" / "state.json"
    stored = json.loads(state_file.read_text())
    for key in ("optimizer", "neftune_noise_alpha", "report_to", "metric_for_best", "load_best_at_end"):
        del stored["state"]["config"]["training"][key]
    state_file.write_text(json.dumps(stored))
    assert train(config, resume=True, **QUIET).steps == 4
