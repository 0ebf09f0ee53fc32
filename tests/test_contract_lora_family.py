"""The adapter contract (core/protocols.py) as the LoRA-family and rotation methods declare it (issue 16).

Each protocol decision is held to an independent invariant, not to the method's own code:
- Additive (ULoRA with a default task, AdaLoRA, VeRA, LoHa, LoKr, Child-Tuning): `delta_weight(base)` is the
  true update, i.e. the adapted layer's output equals a plain copy of the base module whose weight is
  W + delta_weight, on every layout (nn.Linear, Transformers' Conv1D stored (in, out), Conv1d/Conv2d).
- Reparameterizing only (OFT, BOFT): the update W' - W depends on W, so no fixed delta_weight exists.
- ULoRA: task ids come with the call; in a mixed adapter_names batch each adapter gets its own rows' ids;
  without a default task there is no single update (delta_weight and merges refuse).
- Child-Tuning_D: the Fisher mask comes from the loss_fn DeltaModel.before_training hands the method.
- ReLoRA reads and writes the base weight through the view (a Conv1D base here).
- Declaring a protocol without its member is an error when the method registers.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.config import DeltaConfig, register_method, registered_methods
from deltatune.core.layer import DeltaLayer
from deltatune.core.protocols import Additive, Reparameterizing, declares
from deltatune.errors import AdapterContractError, MergeError
from tiny_models import tiny_convnet, tiny_gpt2, tiny_llama, token_batch

TOL = 1e-5
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "convnet": tiny_convnet}
ADDITIVE = [  # (method, family, config): every base layout each additive method supports
    ("ulora", "llama", dt.ULoraConfig(r=4, num_tasks=3, default_task=2, target_modules=["q_proj", "down_proj"])),
    ("ulora", "gpt2", dt.ULoraConfig(r=4, num_tasks=3, default_task=1, target_modules=["c_attn", "c_fc"])),
    ("adalora", "gpt2", dt.AdaLoraConfig(init_r=4, total_step=10, target_modules=["c_attn", "c_proj"])),
    ("adalora", "convnet", dt.AdaLoraConfig(init_r=4, total_step=10, target_modules=["conv2d", "fc"])),
    ("vera", "gpt2", dt.VeraConfig(r=4, target_modules=["c_attn", "c_fc"])),
    ("loha", "convnet", dt.LoHaConfig(r=2, target_modules=["conv2d", "conv1d", "fc"])),
    ("loha_effective_conv", "convnet", dt.LoHaConfig(r=2, use_effective_conv2d=True,
                                                     target_modules=["conv2d", "conv1d"])),
    ("lokr", "convnet", dt.LoKrConfig(r=1, target_modules=["conv2d", "conv1d", "fc"])),
    ("lokr", "llama", dt.LoKrConfig(r=2, decompose_both=True, target_modules=["q_proj", "up_proj"])),
    ("child_tuning", "gpt2", dt.ChildTuningConfig(target_modules=["c_attn", "mlp.c_proj"])),
]


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def layer_input(layer: DeltaLayer) -> torch.Tensor:
    """A random input for the wrapped module: (2, 3, in) for a linear layer, (2, C, 8[, 8]) for a conv."""
    generator = torch.Generator().manual_seed(11)
    base = layer.base
    if base.kind == "linear":
        return torch.randn(2, 3, base.in_features, generator=generator)
    return torch.randn(2, base.in_channels, *(8,) * len(base.kernel_size), generator=generator)


# ---------------------------------------------------------------------- Additive: delta_weight is W' - W
@pytest.mark.parametrize("method,family,config", ADDITIVE, ids=[f"{m}-{f}" for m, f, _ in ADDITIVE])
@torch.no_grad()
def test_additive_delta_weight_is_the_true_update(method, family, config):
    model = dt.get_peft_model(BUILDERS[family](), copy.deepcopy(config)).eval()
    randomize(model)
    layers = [layer for _, layer in model.delta_layers()]
    assert layers
    for layer in layers:
        adapter = layer.adapters["default"]
        assert declares(adapter, Additive) and adapter.merge_rule == "additive" and adapter.merge_refusal() is None
        x = layer_input(layer)
        plain = copy.deepcopy(layer.base_layer)  # the module itself, its own layout and forward
        plain.weight += adapter.delta_weight(layer.base).to(plain.weight.dtype)
        got = layer(x)
        assert (got - layer.base_layer(x)).abs().max() > 1e-3  # the adapter does change this layer
        torch.testing.assert_close(got, plain(x), atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------- Reparameterizing only: OFT, BOFT
@pytest.mark.parametrize("config", [dt.OFTConfig(r=0, oft_block_size=4, target_modules=["q_proj"]),
                                    dt.BOFTConfig(boft_block_size=4, target_modules=["q_proj"])],
                         ids=["oft", "boft"])
@torch.no_grad()
def test_rotations_are_reparameterizing_not_additive(config):
    """W R^T - W depends on W: one fixed delta_weight could not stand for the update."""
    model = dt.get_peft_model(tiny_llama(), config).eval()
    randomize(model)
    layer = next(layer for _, layer in model.delta_layers())
    adapter = layer.adapters["default"]
    assert declares(adapter, Reparameterizing) and not declares(adapter, Additive)
    assert adapter.merge_rule == "reads_base" and adapter.merge_refusal() is None
    weight = layer.base.read_weight()
    merged = adapter.merged_weight(layer.base, weight.clone(), {"weight": weight.clone()})
    x = layer_input(layer)
    plain = copy.deepcopy(layer.base_layer)
    plain.weight.copy_(merged)
    torch.testing.assert_close(layer(x), plain(x), atol=TOL, rtol=TOL)  # merged_weight is the forward's W'
    torch.testing.assert_close(adapter.unmerged_weight(layer.base, merged), weight, atol=TOL, rtol=TOL)
    other = 2 * weight
    shifted = adapter.merged_weight(layer.base, other.clone(), {"weight": other.clone()}) - other
    assert (shifted - (merged - weight)).abs().max() > 1e-3


# ---------------------------------------------------------------------- ULoRA: routing from the call
@torch.no_grad()
def test_ulora_in_a_mixed_adapter_batch_gets_each_rows_task_ids():
    """Before, task_ids with adapter_names was refused; core now hands each adapter its rows' task ids."""
    model = dt.get_peft_model(tiny_llama(), dt.ULoraConfig(r=4, num_tasks=3, target_modules=["q_proj", "v_proj"]),
                              adapter_name="a")
    model.add_adapter("b", dt.ULoraConfig(r=2, num_tasks=2, default_task=0, target_modules=["v_proj", "o_proj"]))
    for name in ("a", "b"):  # only the active adapter trains
        model.set_adapter(name)
        randomize(model, seed=len(name) + ord(name))
    model.eval()
    inputs = token_batch(batch=4, length=5)
    names, task_ids = ["a", "b", "__base__", "a"], torch.tensor([2, 1, 0, 1])
    mixed = model(inputs, adapter_names=names, task_ids=task_ids).logits
    for row, (name, task) in enumerate(zip(names, task_ids.tolist())):
        one = inputs[row:row + 1]
        if name == "__base__":
            with model.disable_adapter():
                alone = model(one).logits
        else:
            model.set_adapter(name)
            alone = model(one, task_ids=torch.tensor([task])).logits
        torch.testing.assert_close(mixed[row:row + 1], alone, atol=TOL, rtol=TOL)
    model.set_adapter("b")
    assert (model(inputs[:1], task_ids=torch.tensor([1])).logits
            - model(inputs[:1], task_ids=torch.tensor([0])).logits).abs().max() > 1e-4  # the ids matter


def test_ulora_without_a_default_task_has_no_single_update():
    model = dt.get_peft_model(tiny_llama(), dt.ULoraConfig(r=2, num_tasks=2, target_modules=["q_proj"]))
    randomize(model)
    layer = next(layer for _, layer in model.delta_layers())
    adapter = layer.adapters["default"]
    assert adapter.merge_rule == "unmergeable" and "default_task" in adapter.merge_refusal()
    with pytest.raises(MergeError, match="default_task"):
        adapter.delta_weight(layer.base)
    before = layer.base_layer.weight.detach().clone()
    with pytest.raises(MergeError, match="default_task"):
        model.merge_adapter()
    assert torch.equal(layer.base_layer.weight, before) and not layer.merged


# ---------------------------------------------------------------------- Child-Tuning_D: the hook's loss
def test_child_tuning_fisher_mask_uses_the_loss_before_training_hands_it():
    """The mask is the top reserve_p of sum (dL/dW)^2 for the caller's loss_fn (here: a loss on the logits
    only, not the model's own), in W's layout: (in, out) for GPT-2's Conv1D."""
    batches = [{"input_ids": token_batch(2, 6, seed=s)} for s in range(3)]
    calls = []

    def loss_fn(model, batch):
        calls.append(model)
        return model(**batch).logits.pow(2).mean()

    config = dt.ChildTuningConfig(child_tuning_mode="D", reserve_p=0.2, fisher_batches=2,
                                  target_modules=["c_attn"])
    model = dt.get_peft_model(tiny_gpt2(), config)
    model.before_training(iter(batches), loss_fn)
    assert len(calls) == 2 and all(c is model for c in calls)

    plain = tiny_gpt2().requires_grad_(False)  # the reference: the plain model, same loss, same batches
    weights = {n: m.weight.requires_grad_(True) for n, m in plain.named_modules() if n.endswith("c_attn")}
    fisher = {n: torch.zeros_like(w) for n, w in weights.items()}
    for batch in batches[:2]:
        plain(**batch).logits.pow(2).mean().backward()
        for n, w in weights.items():
            fisher[n] += w.grad ** 2
            w.grad = None
    flat = torch.cat([f.flatten() for f in fisher.values()])
    threshold = flat.sort(descending=True).values[math.ceil(0.2 * flat.numel()) - 1]
    for name, layer in model.delta_layers():
        mask = layer.adapters["default"].child_mask
        assert mask.shape == layer.base_layer.weight.shape  # (in, out): W's own layout
        torch.testing.assert_close(mask, (fisher[name] >= threshold).to(mask.dtype))


# ---------------------------------------------------------------------- ReLoRA through the view
def test_relora_reset_and_cumulative_lora_on_a_conv1d_base():
    original = tiny_gpt2()
    config = dt.ReLoraConfig(r=2, lora_alpha=4, relora_steps=2, relora_warmup_steps=1, optimizer_reset="zero",
                             target_modules=["c_attn", "c_fc"])
    model = dt.get_peft_model(tiny_gpt2(), config).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    inputs = token_batch()
    for step in range(4):  # resets after steps 1 and 3
        model(inputs).logits.pow(2).mean().backward()
        optimizer.step()
        with torch.no_grad():
            before = model.eval()(inputs).logits
        model.after_optimizer_step(step, optimizer)
        with torch.no_grad():
            torch.testing.assert_close(model(inputs).logits, before, atol=TOL, rtol=TOL)
        model.train()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(inputs).logits
        with model.disable_adapter():  # W0 exactly, though the resets wrote W
            torch.testing.assert_close(model(inputs).logits, original(inputs).logits, atol=0, rtol=0)
        dt.to_cumulative_lora(model)
        torch.testing.assert_close(model(inputs).logits, expected, atol=1e-4, rtol=1e-4)
        for path, layer in model.delta_layers():  # the base holds W0 again
            assert torch.allclose(layer.base_layer.weight, original.get_submodule(path).weight, atol=1e-5)


# ---------------------------------------------------------------------- registration checks the contract
def test_declaring_additive_without_delta_weight_fails_at_registration():
    class HalfAdapter(nn.Module, Additive):
        merge_rule = "additive"

        def forward(self, x, base_out, base, call, owns_base_out=False):
            return base_out

        def merge_refusal(self):
            return None

    @dataclass
    class HalfConfig(DeltaConfig):
        peft_type = "HALF_ADDITIVE_TEST"
        adapter_types = (HalfAdapter,)

    with pytest.raises(AdapterContractError, match="HalfAdapter declares Additive but does not define 'delta_weight'"):
        register_method(HalfConfig)
    assert "HALF_ADDITIVE_TEST" not in registered_methods()
