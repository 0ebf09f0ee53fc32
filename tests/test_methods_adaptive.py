"""VeRA, AdaLoRA, ULoRA (task-modulated LoRA), ReLoRA and X-LoRA against independent references.

The life cycle (init, merge, disable, unload, save/load, gradients, counts) runs in the conformance table
(tests/test_conformance.py). Here:
- PEFT_CASES: an adapter with random weights moves both ways between deltatune and the installed `peft`
  package with the same logits (max abs diff <= 1e-5, float32).
- Methods `peft` lacks (ULoRA, ReLoRA) are checked against their formula written out by hand.
Training-time behaviour (AdaLoRA's rank budget, ReLoRA's merge-and-reset) runs on a short fake schedule.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.methods.adalora import AdaLoraConfig
from deltatune.methods.relora import ReLoraConfig, relora_lr_multiplier, to_cumulative_lora
from deltatune.methods.ulora import ULoraConfig
from deltatune.methods.vera import VeraConfig
from deltatune.methods.xlora import XLoraConfig
from tiny_models import image_batch, tiny_convnet, tiny_gpt2, tiny_llama, token_batch

TOL = 1e-5


# ---------------------------------------------------------------------- helpers
@torch.no_grad()
def logits(model: nn.Module, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    out = model(inputs, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random, non-zero values in every trainable tensor, so a wrong key, slice or scaling shows."""
    generator = torch.Generator().manual_seed(seed)
    for _, param in model.named_parameters():
        if param.requires_grad:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


# ---------------------------------------------------------------------- mixed-adapter batches
MIXED = {
    "vera": lambda targets: VeraConfig(r=4, target_modules=targets),
    "adalora": lambda targets: AdaLoraConfig(init_r=3, total_step=10, target_modules=targets),
    "relora": lambda targets: ReLoraConfig(r=2, relora_steps=5, relora_warmup_steps=1,
                                           target_modules=targets),
    "ulora": lambda targets: ULoraConfig(r=2, num_tasks=2, default_task=1, target_modules=targets),
}


@pytest.mark.parametrize("method", list(MIXED))
def test_mixed_adapter_batch_matches_each_sample_alone(method):
    model = dt.get_peft_model(tiny_llama(), MIXED[method](["q_proj", "v_proj"]), adapter_name="a")
    model.add_adapter("b", MIXED[method](["v_proj", "down_proj"]))
    randomize(model)
    with torch.no_grad():  # add_adapter leaves "b" frozen, so randomize it too
        for _, layer in model.delta_layers():
            for param in layer.adapters["b"].parameters() if "b" in layer.adapters else []:
                param.copy_(torch.randn_like(param) * 0.3)
    order = ["a", "b", "__base__", "b"]
    inputs = token_batch(batch=len(order))
    mixed = logits(model, inputs, adapter_names=order)
    assert max_diff(mixed[0], mixed[1]) > 1e-3
    for row, name in enumerate(order):
        if name == "__base__":
            with model.disable_adapter():
                alone = logits(model, inputs[row:row + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, inputs[row:row + 1])
        assert max_diff(mixed[row:row + 1], alone) <= TOL, (row, name)


# ---------------------------------------------------------------------- files and logits match peft
@dataclass
class PeftCase:
    build: Callable[[], nn.Module]
    ours: Callable[[], dt.DeltaConfig]
    theirs: Callable[[], object]
    inputs: Callable[[], torch.Tensor] = token_batch


def adalora_settings(**extra) -> dict:
    return dict(init_r=4, target_r=2, total_step=10, lora_alpha=6, **extra)


PEFT_CASES = {
    "vera": PeftCase(tiny_llama, lambda: VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]),
                     lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])),
    "vera_no_projection_key7": PeftCase(
        tiny_llama,
        lambda: VeraConfig(r=8, target_modules=["k_proj", "down_proj"], save_projection=False,
                           projection_prng_key=7),
        lambda: peft.VeraConfig(r=8, target_modules=["k_proj", "down_proj"], save_projection=False,
                                projection_prng_key=7)),
    "vera_gpt2": PeftCase(
        tiny_gpt2, lambda: VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "adalora": PeftCase(
        tiny_llama, lambda: AdaLoraConfig(**adalora_settings(target_modules=["q_proj", "down_proj"])),
        lambda: peft.AdaLoraConfig(**adalora_settings(target_modules=["q_proj", "down_proj"]))),
    "adalora_gpt2": PeftCase(
        tiny_gpt2, lambda: AdaLoraConfig(**adalora_settings(target_modules=["c_attn"], fan_in_fan_out=True)),
        lambda: peft.AdaLoraConfig(**adalora_settings(target_modules=["c_attn"], fan_in_fan_out=True))),
    "adalora_conv2d": PeftCase(
        tiny_convnet, lambda: AdaLoraConfig(**adalora_settings(target_modules=["conv2d", "fc"])),
        lambda: peft.AdaLoraConfig(**adalora_settings(target_modules=["conv2d", "fc"])), image_batch),
}
DIRECTIONS = [pytest.param("deltatune", "peft", id="deltatune-to-peft"),
              pytest.param("peft", "deltatune", id="peft-to-deltatune")]


def wrap(library: str, case: PeftCase) -> nn.Module:
    if library == "deltatune":
        return dt.get_peft_model(case.build(), case.ours())
    return peft.get_peft_model(case.build(), case.theirs())


def load(library: str, case: PeftCase, path) -> nn.Module:
    if library == "deltatune":
        return dt.DeltaModel.from_pretrained(case.build(), str(path))
    return peft.PeftModel.from_pretrained(case.build(), str(path))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("saver, loader", DIRECTIONS)
@pytest.mark.parametrize("case_id", list(PEFT_CASES))
def test_moves_between_libraries_with_same_logits(case_id, saver, loader, tmp_path):
    case = PEFT_CASES[case_id]
    inputs = case.inputs()
    trained = wrap(saver, case)
    randomize(trained)
    expected = logits(trained, inputs)
    assert max_diff(expected, logits(case.build(), inputs)) > 1e-3
    trained.save_pretrained(str(tmp_path))
    assert max_diff(logits(load(loader, case, tmp_path), inputs), expected) <= TOL


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case_id", list(PEFT_CASES))
def test_fresh_adapters_save_the_same_files_as_peft(case_id, tmp_path):
    """Same keys, shapes and config values; VeRA's regenerated projections are bit-identical."""
    case = PEFT_CASES[case_id]
    files = {}
    for library in ("deltatune", "peft"):
        wrap(library, case).save_pretrained(str(tmp_path / library))
        files[library] = (load_file(str(tmp_path / library / "adapter_model.safetensors")),
                          json.loads((tmp_path / library / "adapter_config.json").read_text()))
    (ours, our_config), (theirs, their_config) = files["deltatune"], files["peft"]
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    for key in ("vera_A", "vera_B"):
        if f"base_model.{key}" in theirs:
            assert torch.equal(ours[f"base_model.{key}"], theirs[f"base_model.{key}"])
    for key, value in our_config.items():
        if key == "target_modules":
            assert sorted(value) == sorted(their_config[key])
        elif key in their_config:
            assert value == their_config[key], key


def test_vera_projection_regenerated_without_file_tensors(tmp_path):
    model = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"], save_projection=False))
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in saved)
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=4, target_modules=["q_proj"]))
    assert torch.equal(model.model_adapters["default"].vera_A, theirs.base_model.vera_A["default"])


def test_vera_formula_by_hand():
    model = dt.get_peft_model(tiny_llama(), VeraConfig(r=4, target_modules=["q_proj"]))
    randomize(model)
    layer = model.model.model.layers[0].self_attn.q_proj
    adapter, shared = layer.adapters["default"], model.model_adapters["default"]
    x = torch.randn(2, 5, 16)
    a, b = shared.vera_A[:, :16], shared.vera_B[:16]
    expected = layer.base_layer(x) + adapter.vera_lambda_b * ((adapter.vera_lambda_d * (x @ a.T)) @ b.T)
    assert max_diff(layer(x), expected) <= 1e-6


# ---------------------------------------------------------------------- AdaLoRA's rank budget
ADALORA_SCHEDULE = {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2, "total_step": 8, "deltaT": 1,
                    "lora_alpha": 6,
                        "target_modules": ["q_proj", "v_proj", "up_proj"]}


def train_adalora(model: nn.Module, library: str, steps: int, orth: bool = True) -> list[int]:
    """SGD on a fake loss, calling the budget hooks as a training loop does; kept triplets per step."""
    inputs = token_batch(batch=2, length=5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    kept = []
    for step in range(steps):
        loss = model(inputs).logits.pow(2).mean()
        if library == "deltatune":
            if orth:
                loss = loss + model.extra_loss()
            loss.backward()
            model.before_optimizer_step(step)
            optimizer.step()
            model.after_optimizer_step(step, optimizer)
            kept.append(sum(int((layer.adapters["default"].lora_E != 0).sum())
                            for _, layer in model.delta_layers()))
        else:
            loss.backward()
            optimizer.step()
            model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    return kept


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adalora_budget_prunes_to_target_r_and_saves_rank_pattern(tmp_path):
    config = AdaLoraConfig(**ADALORA_SCHEDULE)
    model = dt.get_peft_model(tiny_llama(), config)
    randomize(model)
    n_layers = len(list(model.delta_layers()))
    initial, target = 6 * n_layers, 2 * n_layers
    kept = train_adalora(model, "deltatune", steps=8)
    stored = model.peft_config["default"]
    for step, count in enumerate(kept):
        budget, masked = stored.budget(step, initial, target) if step < 6 else (target, True)
        assert count == (budget if masked else initial), (step, kept)
    assert kept[1] == initial and kept[2] < initial and kept[-1] == target == 2 * n_layers
    assert kept[2] > kept[4] > kept[5] >= target  # the cubic decrease
    pattern = stored.rank_pattern
    assert sorted(pattern) == sorted(f"{path}.lora_E" for path, _ in model.delta_layers())
    assert sum(map(sum, pattern.values())) == target

    inputs = token_batch()
    expected = logits(model, inputs)
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    for key, mask in pattern.items():
        assert saved[f"base_model.model.{key}"].shape == (sum(mask), 1)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"] == pattern
    ours = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert max_diff(logits(ours, inputs), expected) <= 1e-6
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert max_diff(logits(theirs, inputs), expected) <= TOL


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adalora_budget_matches_peft_rank_allocator(tmp_path):
    """Same weights, same updates: the same triplets are pruned at every step as peft's RankAllocator."""
    settings = dict(ADALORA_SCHEDULE, orth_reg_weight=0.0)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**settings))
    randomize(theirs)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True)
    ours.peft_config["default"].orth_reg_weight = 0.0
    train_adalora(theirs, "peft", steps=8)
    train_adalora(ours, "deltatune", steps=8, orth=False)
    their_pattern = {k.replace(".default", ""): v
                     for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert ours.peft_config["default"].rank_pattern == their_pattern
    assert max_diff(logits(ours, token_batch()), logits(theirs, token_batch())) <= TOL


def test_adalora_orthogonality_regulariser_by_hand():
    model = dt.get_peft_model(tiny_llama(), AdaLoraConfig(init_r=3, total_step=5, target_modules=["q_proj"],
                                                          orth_reg_weight=0.3))
    randomize(model)
    adapters = [layer.adapters["default"] for _, layer in model.delta_layers()]
    eye = torch.eye(3)
    norms = [torch.linalg.norm(a.lora_A @ a.lora_A.T - eye) for a in adapters]
    norms += [torch.linalg.norm(a.lora_B.T @ a.lora_B - eye) for a in adapters]
    assert torch.allclose(model.extra_loss(), 0.3 * sum(norms) / len(norms))


@pytest.mark.parametrize("field, value", [("total_step", None), ("tinit", 10), ("beta1", 1.0), ("init_r", 0),
                                          ("orth_reg_weight", -1.0)])
def test_adalora_config_errors_name_the_field(field, value):
    settings = {"total_step": 10, "target_modules": ["q_proj"]}
    with pytest.raises(dt.DeltaConfigError, match=field):
        AdaLoraConfig(**{**settings, field: value})


# ---------------------------------------------------------------------- ULoRA: per-sample tasks, by hand
def test_ulora_mixed_task_batch_matches_formula_and_each_sample_alone():
    config = ULoraConfig(r=4, num_tasks=3, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = dt.get_peft_model(tiny_llama(), config)
    randomize(model)
    inputs, task_ids = token_batch(batch=4, length=5), torch.tensor([2, 0, 1, 2])
    mixed = logits(model, inputs, task_ids=task_ids)
    assert max_diff(mixed[0], mixed[1]) > 1e-3
    greedy = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    generated = model.generate(inputs, task_ids=task_ids, **greedy)
    for row, task in enumerate(task_ids.tolist()):
        alone = logits(model, inputs[row:row + 1], task_ids=torch.tensor([task]))
        assert max_diff(mixed[row:row + 1], alone) <= 1e-6
        one = model.generate(inputs[row:row + 1], task_ids=torch.tensor([task]), **greedy)
        assert torch.equal(generated[row:row + 1], one)
    # one layer, written out: W x + (alpha / r) * B diag(v_t) A x per sample
    layer = model.model.model.layers[0].self_attn.q_proj
    adapter = layer.adapters["default"]
    x = torch.randn(4, 5, 16)
    with torch.no_grad(), model._route(None, task_ids):
        got = layer(x)
    a, b, v = adapter.lora_A.weight, adapter.lora_B.weight, adapter.ulora_task_vectors
    expected = torch.stack([layer.base_layer(x[i]) + 2.0 * x[i] @ (b @ torch.diag(v[t]) @ a).T
                            for i, t in enumerate(task_ids.tolist())])
    assert max_diff(got, expected) <= 1e-5


def test_ulora_only_the_used_tasks_vectors_get_gradients():
    model = dt.get_peft_model(tiny_llama(), ULoraConfig(r=4, num_tasks=3, target_modules=["q_proj"]))
    randomize(model)
    model.train()(token_batch(batch=2), task_ids=torch.tensor([0, 2])).logits.pow(2).mean().backward()
    grad = model.model.model.layers[0].self_attn.q_proj.adapters["default"].ulora_task_vectors.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and torch.all(grad[1] == 0)


def test_ulora_without_task_ids_or_default_is_a_clear_error():
    model = dt.get_peft_model(tiny_llama(), ULoraConfig(r=2, num_tasks=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="task_ids"):
        logits(model, token_batch())
    with pytest.raises(dt.DeltaConfigError, match="default_task"):
        ULoraConfig(num_tasks=2, default_task=2)


# ---------------------------------------------------------------------- ReLoRA: merge, reset, re-warm
@pytest.mark.parametrize("step, expected", [(0, 1.0), (4, 1.0), (5, 1 / 3), (6, 2 / 3), (7, 1.0), (9, 1.0),
                                            (10, 1 / 3), (11, 2 / 3), (12, 1.0)])
def test_relora_lr_multiplier_is_jagged(step, expected):
    assert relora_lr_multiplier(step, relora_steps=5, relora_warmup_steps=2) == pytest.approx(expected)


def relora_model(mode: str = "zero", **extra) -> dt.DeltaModel:
    config = ReLoraConfig(r=2, lora_alpha=4, relora_steps=3, relora_warmup_steps=1, optimizer_reset=mode,
                          target_modules=["q_proj", "v_proj", "embed_tokens"], **extra)
    return dt.get_peft_model(tiny_llama(), config)


def lora_layers(model) -> dict:
    return {path: layer for path, layer in model.delta_layers()}


@pytest.mark.parametrize("mode, prune_ratio", [("zero", 0.0), ("prune", 0.75)])
def test_relora_merges_and_resets_at_the_right_steps(mode, prune_ratio):
    model = relora_model(mode, prune_ratio=prune_ratio).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    inputs = token_batch()
    resets = []
    for step in range(7):
        model(inputs).logits.pow(2).mean().backward()
        optimizer.step()
        bases = {p: layer.base_layer.weight.detach().clone() for p, layer in lora_layers(model).items()}
        with torch.no_grad():
            before = model.eval()(inputs).logits
        model.after_optimizer_step(step, optimizer)
        with torch.no_grad():
            after = model(inputs).logits
        model.train()
        optimizer.zero_grad()
        assert max_diff(before, after) <= TOL  # output continuous across a reset
        changed = [not torch.equal(layer.base_layer.weight, bases[p])
                   for p, layer in lora_layers(model).items()]
        if any(changed):
            resets.append(step)
            assert all(changed)
            for layer in lora_layers(model).values():
                adapter = layer.adapters["default"]
                assert torch.count_nonzero(adapter.A if adapter.kind == "embedding" else adapter.B) == 0
                for param in adapter.parameters():
                    for key in ("exp_avg", "exp_avg_sq"):
                        zeros = (optimizer.state[param][key] == 0).float().mean().item()
                        assert zeros == 1.0 if mode == "zero" else zeros >= prune_ratio, (key, zeros)
    assert resets == [2, 5]
    assert all(len(layer.adapters["default"].relora_merged) == 2 for layer in lora_layers(model).values())


def test_relora_pruned_optimizer_state_keeps_updates_bounded():
    """A pruned reset keeps the same entries of Adam's two moments: no entry is left with a first moment
    and no second one (an update of lr * m / eps). The step after a reset moves no weight by more than a
    few learning rates, as any Adam step."""
    lr = 1e-3
    model = relora_model("prune", prune_ratio=0.9).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    inputs = token_batch()
    for step in range(4):  # the reset follows step 2
        model(inputs).logits.pow(2).mean().backward()
        before = {p: p.detach().clone() for p in optimizer.param_groups[0]["params"]}
        optimizer.step()
        if step == 3:
            assert max((p - before[p]).abs().max().item() for p in before) <= 5 * lr
        model.after_optimizer_step(step, optimizer)
        optimizer.zero_grad()
        if step == 2:
            for state in optimizer.state.values():
                assert not ((state["exp_avg"] != 0) & (state["exp_avg_sq"] == 0)).any()


def test_relora_cumulative_adapter_is_a_plain_lora_for_the_original_base(tmp_path):
    original = tiny_llama()
    model = relora_model().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    inputs = token_batch()
    for step in range(7):
        model(inputs).logits.pow(2).mean().backward()
        optimizer.step()
        model.after_optimizer_step(step, optimizer)
        optimizer.zero_grad()
    model.eval()
    expected = logits(model, inputs)
    assert max_diff(expected, logits(original, inputs)) > 1e-3
    merged = logits(copy.deepcopy(model).merge_and_unload(), inputs)
    assert max_diff(merged, expected) <= TOL

    config = to_cumulative_lora(model)
    assert config.peft_type == "LORA" and config.r == 3 * 2
    assert max_diff(logits(model, inputs), expected) <= TOL
    for path, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base_layer.weight, original.get_submodule(path).weight,
                                   atol=1e-6, rtol=0)
    model.save_pretrained(str(tmp_path))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ours = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    assert max_diff(logits(ours, inputs), expected) <= TOL
    assert max_diff(logits(theirs, inputs), expected) <= TOL


def test_relora_needs_the_optimizer_and_refuses_dora():
    model = relora_model()
    model.after_optimizer_step(0)  # not a reset step: nothing to do
    with pytest.raises(ValueError, match="optimizer"):
        model.after_optimizer_step(2)
    with pytest.raises(dt.DeltaConfigError, match="use_dora"):
        ReLoraConfig(use_dora=True)
    with pytest.raises(dt.DeltaConfigError, match="relora_warmup_steps"):
        ReLoraConfig(relora_steps=5, relora_warmup_steps=5)


# ---------------------------------------------------------------------- X-LoRA: gated frozen experts
EXPERT_TARGETS = [["q_proj", "v_proj"], ["v_proj", "down_proj"], ["q_proj"]]


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, str]:
    """Three LoRA experts with random weights, saved as adapter directories {"0": dir, ...}."""
    root = tmp_path_factory.mktemp("experts")
    for index, targets in enumerate(EXPERT_TARGETS):
        expert = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        randomize(expert, seed=index)
        expert.save_pretrained(str(root / str(index)))
    return {str(i): str(root / str(i)) for i in range(len(EXPERT_TARGETS))}


def tiny_llama_no_cache() -> nn.Module:
    model = tiny_llama()
    model.config.use_cache = False  # peft's X-LoRA refuses a model that caches
    return model


XLORA_SETTINGS = {
    "dense": {},
    "layerwise_topk_softmax": {"layerwise_scalings": True, "top_k_lora": 2, "enable_softmax_topk": True,
                               "scaling_pass_value": 0.3, "global_scaling_weight": 0.7,
                               "softmax_temperature": 0.5},
    "depth2_no_softmax": {"xlora_depth": 2, "xlora_size": 8, "xlora_dropout_p": 0.0, "enable_softmax": False,
                          "top_k_lora": 1},
}


def xlora_configs(experts: dict, settings: dict):
    common = dict(task_type="CAUSAL_LM", hidden_size=16, adapters=experts, **settings)
    return XLoraConfig(**common), peft.XLoraConfig(**common)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("settings_id", list(XLORA_SETTINGS))
def test_xlora_matches_peft(settings_id, experts, tmp_path):
    """Same experts and classifier weights: same logits and greedy tokens as peft; our file loads in peft.
    (peft -> deltatune is checked in memory: peft's save drops classifier keys `layers.<i>` whose index
    equals an expert's name, "0", "1", ..., so its X-LoRA files are incomplete.)"""
    ours_config, their_config = xlora_configs(experts, XLORA_SETTINGS[settings_id])
    theirs = peft.get_peft_model(tiny_llama_no_cache(), their_config).eval()
    randomize(theirs, seed=3)  # only the classifier is trainable
    classifier = {k.split("internal_xlora_classifier.")[1]: v for k, v in theirs.state_dict().items()
                  if "internal_xlora_classifier" in k}
    ours = dt.get_peft_model(tiny_llama_no_cache(), ours_config).eval()
    ours.model_adapters["default"].load_state_dict(classifier)
    inputs = token_batch()
    expected = logits(theirs, inputs)
    assert max_diff(expected, logits(tiny_llama(), inputs)) > 1e-3
    assert max_diff(logits(ours, inputs), expected) <= TOL

    ours.save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(tiny_llama_no_cache(), str(tmp_path), adapters=experts).eval()
    assert max_diff(logits(loaded, inputs), expected) <= TOL
    greedy = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(inputs, **greedy), theirs.generate(input_ids=inputs, **greedy))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_xlora_layer_formula_by_hand(experts):
    settings = {"layerwise_scalings": True, "top_k_lora": 2, "global_scaling_weight": 0.5}
    config, _ = xlora_configs(experts, settings)
    model = dt.get_peft_model(tiny_llama_no_cache(), config).eval()
    randomize(model, seed=4)
    classifier = model.model_adapters["default"]
    layer = model.model.model.layers[1].self_attn.v_proj  # adapted by experts 0 and 1, layer number 4
    adapter = layer.adapters["default"]
    assert adapter.layer_number == 4 and sorted(adapter.experts) == ["0", "1"]
    x = torch.randn(2, 5, 16)
    scalings = torch.softmax(torch.randn(2, 5, classifier.n_layers, 3), dim=-1)
    classifier.scalings = scalings
    with torch.no_grad():
        got = layer(x)
    classifier.scalings = None
    gates = scalings[:, :, 4, :]
    gates = gates * (gates >= gates.topk(2, dim=-1).values[..., -1:])  # keep the 2 largest per token
    expected = layer.base_layer(x)
    for index in ("0", "1"):
        expert = adapter.experts[index]
        delta = expert.lora_B.weight @ expert.lora_A.weight * expert.scaling
        expected = expected + 0.5 * (x * gates[:, :, int(index), None]) @ delta.T
    assert max_diff(got, expected) <= 1e-6


def test_xlora_config_errors_name_the_field(experts, tmp_path):
    with pytest.raises(dt.DeltaConfigError, match="adapters"):
        XLoraConfig(adapters={})
    with pytest.raises(dt.DeltaConfigError, match="adapters"):
        XLoraConfig(adapters={"0": str(tmp_path)})
    with pytest.raises(dt.DeltaConfigError, match="top_k_lora"):
        XLoraConfig(adapters=experts, top_k_lora=4)
