"""DeltaModel behaviour beyond the life-cycle table: targeting rules, several active adapters,
mixed-adapter batches in forward and generate, delete, and merging in half precision."""


import pytest
import torch

import deltatune as dt
from deltatune.core.layer import DeltaLayer
from deltatune.methods.lora import LoraAdapter
from tiny_models import tiny_gpt2, tiny_llama, token_batch


def adapted(model) -> list[str]:
    return [name for name, m in model.model.named_modules() if isinstance(m, DeltaLayer)]


@pytest.mark.parametrize("config,expected", [
    (dict(target_modules=["q_proj"]), ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    (dict(target_modules=["self_attn.v_proj"]), ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]),
    (dict(target_modules=r".*\.1\.mlp\.(up|down)_proj"),
     ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]),
    (dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
     ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    (dict(target_modules=["q_proj"], layers_to_transform=0), ["model.layers.0.self_attn.q_proj"]),
    (dict(target_modules="all-linear", exclude_modules=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "o_proj"]),
     [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"]),
])
def test_targeting_rules(config, expected):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, **config))
    assert sorted(adapted(model)) == sorted(expected)


def test_all_linear_skips_output_head_and_embeddings():
    names = adapted(dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules="all-linear")))
    assert len(names) == 14 and "lm_head" not in names and not any("embed" in n for n in names)
    gpt2 = adapted(dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, target_modules="all-linear")))
    assert len(gpt2) == 8 and "lm_head" not in gpt2  # Conv1D layers count as linear


def test_rank_and_alpha_pattern():
    config = dt.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                           rank_pattern={"v_proj": 6}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 10})
    model = dt.get_peft_model(tiny_llama(), config)
    layers = dict(model.delta_layers())
    v, q0, q1 = (layers[f"model.layers.{n}"].adapters["default"] for n in
                 ("0.self_attn.v_proj", "0.self_attn.q_proj", "1.self_attn.q_proj"))
    assert (v.r, v.scaling) == (6, 4 / 6) and (q0.r, q0.scaling) == (2, 2.0) and (q1.r, q1.scaling) == (2, 5.0)


@torch.no_grad()
def two_adapter_model(dora_second: bool = False):
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "up_proj"]),
                              adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=4, target_modules=["v_proj", "down_proj"], use_dora=dora_second))
    for name, param in model.named_parameters():
        if ".adapters." in name:
            param.add_(torch.randn_like(param) * 0.3)
    return model


@torch.no_grad()
def test_several_active_adapters_sum_and_merge():
    model = two_adapter_model()
    ids = token_batch(3, 5)
    base = model.model.model.embed_tokens  # unwrapped
    assert not isinstance(base, DeltaLayer)
    model.set_adapter(["a", "b"])
    both = model(ids).logits
    model.merge_adapter()
    torch.testing.assert_close(model(ids).logits, both, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    model.set_adapter("a")
    only_a = model(ids).logits
    assert (both - only_a).abs().max() > 1e-3


@pytest.mark.parametrize("dora_second", [False, True])
@torch.no_grad()
def test_mixed_batch_equals_each_sample_alone(dora_second):
    model = two_adapter_model(dora_second)
    ids = token_batch(6, 5)
    names = ["a", "b", "__base__", "b", "a", "a"]
    mixed = model(ids, adapter_names=names).logits
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model(ids[i: i + 1]).logits
        else:
            model.set_adapter(name)
            alone = model(ids[i: i + 1]).logits
        torch.testing.assert_close(mixed[i: i + 1], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_mixed_lora_batch_runs_no_per_adapter_loop(monkeypatch):
    model = two_adapter_model()
    calls = []
    monkeypatch.setattr(LoraAdapter, "forward", lambda *a, **k: calls.append(1))
    model(token_batch(8, 4), adapter_names=["a", "b"] * 4)
    assert calls == []  # every LoRA layer took the batched (gather + bmm) path


@torch.no_grad()
def test_generate_with_adapter_names_matches_each_alone():
    model = two_adapter_model()
    ids = token_batch(3, 4)
    names = ["b", "__base__", "a"]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    mixed = model.generate(input_ids=ids, adapter_names=names, **kwargs)
    for i, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=ids[i: i + 1], **kwargs)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=ids[i: i + 1], **kwargs)
        assert torch.equal(mixed[i: i + 1], alone)


def test_mixed_batch_rejects_unknown_adapter_and_merged_state():
    model = two_adapter_model()
    with pytest.raises(ValueError, match="'zz'"):
        model(token_batch(2, 3), adapter_names=["a", "zz"])
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(token_batch(2, 3), adapter_names=["a", "b"])


def test_delete_adapter_unwraps_modules_it_alone_used():
    model = two_adapter_model()
    model.delete_adapter("b")
    assert model.active_adapters == ["a"] and list(model.peft_config) == ["a"]
    assert not any("down_proj" in n for n in adapted(model))
    assert all(list(layer.adapters) == ["a"] for _, layer in model.delta_layers())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_merge_adds_a_float32_delta_once(dtype):
    model = two_adapter_model()
    model.set_adapter("a")
    layer = dict(model.delta_layers())["model.layers.0.self_attn.q_proj"]
    layer.to(dtype)
    weight = layer.base_layer.weight.detach().clone()
    expected = (weight.float() + layer.adapters["a"].delta_weight(layer.base_layer).float()).to(dtype)
    layer.merge(["a"])
    assert torch.equal(layer.base_layer.weight, expected)


def test_trainable_parameter_report_matches_peft():
    import peft

    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none")
    ours = dt.get_peft_model(tiny_llama(), dt.LoraConfig(**config)).get_nb_trainable_parameters()
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config)).get_nb_trainable_parameters()
    assert ours == theirs


@torch.no_grad()
def test_adapters_follow_the_wrapped_models_train_mode():
    model = dt.get_peft_model(tiny_llama().eval(), dt.LoraConfig(r=2, target_modules=["q_proj"], lora_dropout=0.5))
    ids = token_batch(2, 4)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(ids).logits, model(ids).logits, atol=0, rtol=0)
