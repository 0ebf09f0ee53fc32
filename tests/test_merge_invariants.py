"""Merging, disabling and unloading hold their invariants (DESIGN.md section 8), checked against the
model's own unmerged / base outputs (tests/merge_checks.py), not against another library:

- several adapters of any mergeable methods active on one layer, in any order: merged == unmerged and
  unmerge restores the base (issue 14 item 4: several DoRA adapters on one Linear);
- a merge into a weight several modules share unties it first (item 3: tied embeddings and lm_head);
- disable == base exactly and unload returns the base for every option that trains base parameters
  (item 8: LoRA bias="lora_only" / "all", also BitFit, LN tuning, modules_to_save, OFT/VeRA biases).
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune import MergeError
from merge_checks import (
    assert_disable_is_base,
    assert_merged_equals_unmerged,
    assert_unload_is_base,
    base_parameters,
    model_output,
)
from tiny_models import tiny_convnet, tiny_gpt2, tiny_llama, token_batch


@torch.no_grad()
def randomize(model, adapter_name: str, seed: int, scale: float = 0.2) -> None:
    """Move adapter `adapter_name`'s own parameters away from their init (so B = 0 cannot hide a bug)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if f".adapters.{adapter_name}." in name or f".copies.{adapter_name}." in name:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def single_linear(seed: int = 0, features: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(features, features)).eval()


# ------------------------------------------------------------------ item 4: several adapters on one layer
def test_two_and_three_dora_adapters_merge_to_the_unmerged_output():
    """Issue input: Linear(12, 12), DoRA r=1 adapters all active; merge_and_unload was 5-28% off."""
    for count in (2, 3):
        model = dt.get_peft_model(single_linear(), dt.LoraConfig(r=1, use_dora=True, init_lora_weights=False,
                                                                target_modules=["0"]), "a0")
        for i in range(1, count):
            model.add_adapter(f"a{i}", dt.LoraConfig(r=1, use_dora=True, init_lora_weights=False,
                                                     target_modules=["0"]))
        names = [f"a{i}" for i in range(count)]
        model.set_adapter(names)
        x = torch.randn(5, 12, generator=torch.Generator().manual_seed(count))
        unmerged = assert_merged_equals_unmerged(model, x, atol=1e-5, rtol=1e-5)
        plain = model.merge_and_unload()
        relative = ((model_output(plain, x) - unmerged).norm() / unmerged.norm()).item()
        assert relative < 1e-5, (count, relative)


@pytest.mark.parametrize("kind", ["conv", "embedding"])
def test_several_dora_adapters_on_conv_and_embedding_layers(kind):
    if kind == "conv":
        builder, inputs, target = tiny_convnet, torch.randn(2, 3, 8, 8), ["conv2d", "conv1d", "fc"]
    else:
        builder, inputs, target = tiny_llama, {"input_ids": token_batch()}, ["embed_tokens", "q_proj"]
    methods = {"dora": (dt.LoraConfig, dict(r=2, use_dora=True)), "lora": (dt.LoraConfig, dict(r=2))}
    # the tiny Llama's embeddings are N(0, 0.02): noise of that size keeps DoRA's m/n away from 0, where
    # the unmerge (a division by m/n) would magnify float rounding
    model, _ = add_random_adapters(builder, methods, ["dora", "lora", "dora"], {"*": dict(target_modules=target)}, 5,
                                   scale=0.2 if kind == "conv" else 0.02)
    assert_merged_equals_unmerged(model, inputs, atol=1e-5, rtol=1e-5)


LINEAR_METHODS = {  # name: (config class, its settings); PiSSA/OLoRA rewrite the base weight, left out
    "lora": (dt.LoraConfig, dict(r=4, lora_alpha=8)),
    "rslora": (dt.LoraConfig, dict(r=4, lora_alpha=8, use_rslora=True)),
    "dora": (dt.LoraConfig, dict(r=4, lora_alpha=8, use_dora=True)),
    "loha": (dt.LoHaConfig, dict(r=4, alpha=8)),
    "lokr": (dt.LoKrConfig, dict(r=4, alpha=8)),
    "oft": (dt.OFTConfig, dict(r=0, oft_block_size=4)),
    "boft": (dt.BOFTConfig, dict(boft_block_size=4)),
    "vera": (dt.VeraConfig, dict(r=4)),
    "adalora": (dt.AdaLoraConfig, dict(init_r=4, target_r=2, total_step=10, lora_alpha=8)),
    "relora": (dt.ReLoraConfig, dict(r=4, lora_alpha=8, relora_steps=3, relora_warmup_steps=1)),
    "ulora": (dt.ULoraConfig, dict(r=4, num_tasks=3, default_task=1)),
}


def linear_methods() -> dict:
    """Every registered mergeable method that adapts an nn.Linear."""
    methods = dict(LINEAR_METHODS)
    methods.update({
        "ia3": (dt.IA3Config, dict(feedforward_modules=[])),
        "ia3_ff": (dt.IA3Config, dict(feedforward_modules=["0"])),
        "bitfit": (dt.BitFitConfig, dict()),
        "child_tuning": (dt.ChildTuningConfig, dict()),
        "ln_tuning": (dt.LNTuningConfig, dict()),
    })
    return methods


def add_random_adapters(model_builder, methods: dict, picks: list[str], target: dict, seed: int,
                        scale: float = 0.2):
    """A DeltaModel with one adapter per entry of `picks` (methods may repeat), each randomized (noise of
    std `scale`), all active in the order given."""
    model = None
    names = []
    for i, method in enumerate(picks):
        config_class, settings = methods[method]
        config = config_class(**target.get(method, target["*"]), **settings)
        name = f"{method}_{i}"
        if model is None:
            model = dt.get_peft_model(model_builder(), config, name)
        else:
            model.add_adapter(name, config)
        names.append(name)
        randomize(model, name, seed * 100 + i, scale)
    model.set_adapter(names)
    return model.eval(), names


ON_LINEAR = {"*": dict(target_modules=["0"])}  # every method on the Sequential's only Linear
LINEAR_CASES = [pytest.param(seed, id=f"seed{seed}") for seed in range(24)]


@pytest.mark.parametrize("seed", LINEAR_CASES)
def test_random_mixes_of_mergeable_adapters_on_one_linear(seed):
    """Kind: for any set of 2-3 active mergeable adapters (any methods, repeats allowed, any order) on one
    Linear, merge == unmerged forward, unmerge restores the base, merge_and_unload keeps the output."""
    methods = linear_methods()
    rng = random.Random(seed)
    picks = [rng.choice(sorted(methods)) for _ in range(rng.choice((2, 3)))]
    model, names = add_random_adapters(lambda: single_linear(seed), methods, picks, ON_LINEAR, seed)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(seed))
    unmerged = assert_merged_equals_unmerged(model, x, atol=1e-5, rtol=1e-5)
    merged = model_output(model.merge_and_unload(), x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5 * unmerged.abs().max().item(), rtol=1e-5,
                               msg=lambda m: f"{picks}: {m}")


def llama_methods() -> dict:
    methods = linear_methods()
    methods.update({
        "oft": (dt.OFTConfig, dict(r=0, oft_block_size=4)),
        "ia3_ff": (dt.IA3Config, dict(feedforward_modules=["down_proj"])),
        "bitfit": (dt.BitFitConfig, dict(add_missing_bias=True)),
    })
    return methods


LLAMA_TARGETS = {"*": dict(target_modules="all-linear"), "ln_tuning": dict(),  # its default: the norms
                 "ia3_ff": dict(target_modules=["q_proj", "v_proj", "down_proj"])}


@pytest.mark.parametrize("seed", [pytest.param(s, id=f"seed{s}") for s in range(8)])
def test_random_mixes_of_mergeable_adapters_on_tiny_llama(seed):
    methods = llama_methods()
    methods.pop("boft")  # BOFT's block sizes do not fit every tiny-Llama width at once; Linear covers it
    rng = random.Random(1000 + seed)
    picks = [rng.choice(sorted(methods)) for _ in range(rng.choice((2, 3)))]
    # noise of the size of the tiny Llama's N(0, 0.02) weights, so DoRA's m/n stays away from 0 (where the
    # exact unmerge, a division by m/n, would magnify float rounding)
    model, _ = add_random_adapters(lambda: tiny_llama(seed), methods, picks, LLAMA_TARGETS, seed, scale=0.02)
    inputs = {"input_ids": token_batch(seed=seed)}
    unmerged = assert_merged_equals_unmerged(model, inputs, atol=1e-5, rtol=1e-5)
    merged = model_output(model.merge_and_unload(), inputs)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4, msg=lambda m: f"{picks}: {m}")


def test_mixed_pairs_the_issue_names_in_both_orders():
    """LoRA + DoRA, DoRA + OFT, IA3 + LoRA (and the feed-forward IA3), each in both orders."""
    methods = linear_methods()
    pairs = [("lora", "dora"), ("dora", "oft"), ("ia3", "lora"), ("ia3_ff", "lora"), ("dora", "ia3_ff"),
             ("bitfit", "dora"), ("ia3", "dora"), ("oft", "oft"), ("boft", "ia3_ff")]
    for pair in pairs:
        for picks in (list(pair), list(reversed(pair))):
            model, _ = add_random_adapters(lambda: single_linear(3), methods, picks, ON_LINEAR, 7)
            x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
            assert_merged_equals_unmerged(model, x, atol=1e-5, rtol=1e-5)


def test_merge_follows_the_active_order_not_the_order_named():
    methods = linear_methods()
    model, names = add_random_adapters(single_linear, methods, ["dora", "lora", "dora"],
                                       ON_LINEAR, 3)
    x = torch.randn(4, 12)
    assert_merged_equals_unmerged(model, x, atol=1e-5, rtol=1e-5, adapter_names=list(reversed(names)))


def test_a_merge_that_would_change_the_output_is_refused_before_anything_is_written():
    methods = linear_methods()
    model, names = add_random_adapters(single_linear, methods, ["lora", "dora"],
                                       ON_LINEAR, 4)
    before = base_parameters(model)
    with pytest.raises(MergeError, match=r"0: merging \['lora_0'\] while the active adapters \['dora_1'\]"):
        model.merge_adapter(["lora_0"])  # DoRA's unmerged forward reads the base weight
    assert all(torch.equal(before[k], v) for k, v in base_parameters(model).items())
    model.set_adapter(["lora_0"])
    model.merge_adapter(["lora_0"])
    model.set_adapter(names)
    with pytest.raises(MergeError, match=r"on top of the already merged \['lora_0'\]"):
        model.merge_adapter(["dora_1"])
    model.unmerge_adapter()
    for key, value in base_parameters(model).items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6)
    # additive adapters merge one by one, with others still unmerged
    model, _ = add_random_adapters(single_linear, methods, ["lora", "loha"], ON_LINEAR, 4)
    x = torch.randn(4, 12)
    unmerged = model_output(model, x)
    model.merge_adapter(["loha_1"])
    torch.testing.assert_close(model_output(model, x), unmerged, atol=1e-5, rtol=1e-5)
    model.merge_adapter(["lora_0"])
    torch.testing.assert_close(model_output(model, x), unmerged, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ item 3: shared (tied) weights
def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_merge_into_tied_lm_head_unties_it(tmp_path):
    """Issue input: tied tiny Llama, LoRA on lm_head only, init_lora_weights=False: merge_and_unload moved
    the logits by 7.8 and the untargeted embed_tokens by 0.45."""
    base = tied_llama()
    embed = base.model.embed_tokens.weight.detach().clone()
    inputs = {"input_ids": token_batch()}
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    assert_merged_equals_unmerged(model, inputs, atol=1e-5, rtol=1e-5)
    assert model.model.lm_head.base_layer.weight is model.model.model.embed_tokens.weight  # tied again
    unmerged = model_output(model, inputs)
    warning = r"lm_head.weight is also model.embed_tokens.weight: merging gives lm_head its own copy"
    with pytest.warns(UserWarning, match=warning):
        plain = model.merge_and_unload()
    torch.testing.assert_close(model_output(plain, inputs), unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(plain.model.embed_tokens.weight, embed)
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    plain.save_pretrained(tmp_path)  # the untied head survives saving and loading
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(model_output(reloaded, inputs), unmerged, atol=1e-5, rtol=1e-5)


def test_merge_into_both_tied_modules_and_disable_while_merged():
    base = tied_llama()
    inputs = {"input_ids": token_batch()}
    base_out = model_output(base, inputs)
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["lm_head", "embed_tokens"],
                                                  init_lora_weights=False))
    unmerged = assert_merged_equals_unmerged(model, inputs, atol=1e-5, rtol=1e-5)
    model.merge_adapter()
    assert_disable_is_base(model, base_out, inputs)  # unmerged inside: ties again, bit-exact base
    torch.testing.assert_close(model_output(model, inputs), unmerged, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert model.model.lm_head.base_layer.weight is model.model.model.embed_tokens.base_layer.weight


class SharedTwice(nn.Module):
    """One Linear used at two places (a shared module, not only a shared parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(6, 6)
        self.second = self.first
        self.head = nn.Linear(6, 6)
        self.head.weight = self.first.weight  # and a parameter shared with a third module

    def forward(self, x):
        return self.head(self.second(self.first(x)))


def test_merge_into_a_module_used_twice_leaves_the_other_use_alone():
    torch.manual_seed(0)
    model = dt.get_peft_model(SharedTwice().eval(), dt.LoraConfig(r=2, target_modules=["first"],
                                                                  init_lora_weights=False))
    x = torch.randn(3, 6)
    assert_merged_equals_unmerged(model, x, atol=1e-5, rtol=1e-5)
    unmerged = model_output(model, x)
    plain = model.merge_and_unload()
    torch.testing.assert_close(model_output(plain, x), unmerged, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ item 8: base parameters trained in place
def test_trained_lora_only_bias_is_not_seen_by_disable_or_unload():
    """Issue input: Linear(4, 3), LoRA bias="lora_only", bias moved by 1.0: disable differed from the
    base by 1.0 and unload() returned the moved bias."""
    base = single_linear(0, 4)
    base[0] = nn.Linear(4, 3)
    x = torch.randn(2, 4)
    base_out, base_params = model_output(base, x), base_parameters(base)
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, bias="lora_only", target_modules=["0"]))
    with torch.no_grad():
        model.model[0].base_layer.bias.add_(1.0)
    assert (model_output(model, x) - base_out).abs().max() > 0.5
    assert_disable_is_base(model, base_out, x)
    assert (model_output(model, x) - base_out).abs().max() > 0.5  # the trained bias is back after the block
    assert_unload_is_base(model, base_params, base_out, x)


TRAINS_BASE = {  # options that train base-model parameters or copies of them, on GPT-2 (which has biases)
    "lora_bias_all": (dt.LoraConfig, dict(r=2, bias="all", target_modules=["c_attn"])),
    "lora_bias_lora_only": (dt.LoraConfig, dict(r=2, bias="lora_only", target_modules=["c_attn"])),
    "dora_bias_all": (dt.LoraConfig, dict(r=2, bias="all", use_dora=True, target_modules=["c_attn"])),
    "vera_bias_all": (dt.VeraConfig, dict(r=4, bias="all", target_modules=["c_attn"])),
    "adalora_bias_all": (dt.AdaLoraConfig, dict(init_r=4, target_r=2, total_step=10, bias="all",
                                                target_modules=["c_attn"])),
    "bitfit": (dt.BitFitConfig, dict(target_modules=["c_attn", "c_fc", "ln_1"])),
    "ln_tuning": (dt.LNTuningConfig, dict()),
    "modules_to_save": (dt.LoraConfig, dict(r=2, target_modules=["c_attn"], modules_to_save=["ln_f"])),
}


@pytest.mark.parametrize("option", sorted(TRAINS_BASE))
def test_disable_is_base_and_unload_returns_base_for_options_that_train_base_parameters(option):
    base = tiny_gpt2()
    inputs = {"input_ids": token_batch()}
    base_out, base_params = model_output(base, inputs), base_parameters(base)
    config_class, settings = TRAINS_BASE[option]
    model = dt.get_peft_model(base, config_class(**settings)).eval()
    with torch.no_grad():  # a "training run": every trainable parameter moves, biases included
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    adapted = model_output(model, inputs)
    assert (adapted - base_out).abs().max() > 1e-2
    assert_disable_is_base(model, base_out, inputs)
    torch.testing.assert_close(model_output(model, inputs), adapted, atol=0, rtol=0)
    unloaded, deleted = copy.deepcopy(model), copy.deepcopy(model)
    assert_unload_is_base(unloaded, base_params, base_out, inputs)
    deleted.delete_adapter("default")  # nothing left that trains them: the base values come back
    assert_unload_is_base(deleted, base_params, base_out, inputs)
    model.merge_adapter()  # after a merge and unmerge: the base up to float rounding of W + d - d
    assert_disable_is_base(model, base_out, inputs, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert_unload_is_base(model, base_params, base_out, inputs, atol=1e-5, rtol=1e-5)


def test_shared_bias_keeps_its_base_value_until_the_last_adapter_that_trains_it_goes():
    base = tiny_gpt2()
    inputs = {"input_ids": token_batch()}
    base_out, base_params = model_output(base, inputs), base_parameters(base)
    model = dt.get_peft_model(base, dt.LoraConfig(r=2, bias="all", target_modules=["c_attn"]), "a")
    model.add_adapter("b", dt.LoraConfig(r=2, bias="all", target_modules=["c_attn"]))
    model.set_adapter(["a", "b"])
    with torch.no_grad():
        model.model.transformer.h[0].attn.c_attn.base_layer.bias.add_(0.5)
    model.delete_adapter("a")
    assert not torch.equal(model.model.transformer.h[0].attn.c_attn.base_layer.bias,
                           base_params["transformer.h.0.attn.c_attn.bias"])  # "b" still trains it
    assert_disable_is_base(model, base_out, inputs)
    assert_unload_is_base(model, base_params, base_out, inputs)


def test_relora_folds_are_not_seen_by_disable_or_unload():
    """ReLoRA folds its update into the base weight every `relora_steps`: disable and unload still give
    the base exactly; merge_and_unload keeps every fold and the live LoRA."""
    base = tiny_llama()
    inputs = {"input_ids": token_batch()}
    base_out, base_params = model_output(base, inputs), base_parameters(base)
    model = dt.get_peft_model(base, dt.ReLoraConfig(r=2, target_modules=["q_proj", "v_proj"], relora_steps=2,
                                                    relora_warmup_steps=1))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(4):  # two folds, each after the adapter has moved
        randomize(model, "default", step)
        model.after_optimizer_step(step, optimizer)
    randomize(model, "default", 9)
    model.eval()
    adapted = model_output(model, inputs)
    assert (adapted - base_out).abs().max() > 1e-3
    assert_disable_is_base(model, base_out, inputs)
    torch.testing.assert_close(model_output(model, inputs), adapted, atol=0, rtol=0)
    merged = model_output(copy.deepcopy(model).merge_and_unload(), inputs)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert_unload_is_base(model, base_params, base_out, inputs)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_init_that_rewrites_a_tied_weight_is_refused_before_anything_changes(init):
    base = tied_llama()
    before = base_parameters(base)
    with pytest.raises(dt.DeltaConfigError, match=r"'lm_head' shares its weight with \['model.embed_tokens.weight'\]"):
        dt.get_peft_model(base, dt.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=init))
    after = base_parameters(base)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
