"""Weighted merges (compose/weighted.py, compose/merge_ops.py): every deterministic combination type
gives the same new adapter as `peft` for the same inputs; DARE follows its definition for a fixed seed."""

import pytest
import torch

import deltatune as dt
from deltatune.compose import merge_ops
from deltatune.compose.weighted import add_weighted_adapter
from deltatune.io.keymap import adapter_slots
from tiny_models import tiny_gpt2, tiny_llama, token_batch

DETERMINISTIC = ["linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd"]
ADAPTERS = {"t1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
            "t2": dict(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"]),
            "t3": dict(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"])}


@torch.no_grad()
def peft_and_ours(tmp_path, names=("t1", "t2", "t3"), build=tiny_llama, adapters=ADAPTERS):
    """The same randomized LoRA adapters in a peft model and (loaded from peft's files) in ours."""
    import peft

    torch.manual_seed(0)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**adapters[name]))
    for key, param in theirs.named_parameters():
        if "lora_" in key:
            param.copy_(torch.randn_like(param) * 0.5)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.DeltaModel.from_pretrained(build(), str(tmp_path / names[0]), adapter_name=names[0])
    for name in names[1:]:
        ours.load_adapter(str(tmp_path / name), adapter_name=name)
    return theirs, ours


def merged_tensors(theirs, ours, name):
    import peft

    expected = peft.get_peft_model_state_dict(theirs, adapter_name=name)
    got = {k: v.detach() for k, v in adapter_slots(ours, name).items()}
    return expected, got


@pytest.mark.parametrize("combination_type", DETERMINISTIC)
def test_deterministic_types_equal_peft(tmp_path, combination_type):
    theirs, ours = peft_and_ours(tmp_path)
    kwargs = dict(combination_type=combination_type, density=0.5)
    names, weights = (["t1", "t2"], [0.7, -0.4])
    theirs.add_weighted_adapter(names, weights, "m", **kwargs)
    ours.add_weighted_adapter(names, weights, "m", **kwargs)  # the DeltaModel method, as peft users call it
    expected, got = merged_tensors(theirs, ours, "m")
    assert sorted(expected) == sorted(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)
    ids = token_batch(2, 5)
    theirs.set_adapter("m")
    ours.set_adapter("m")
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combination_type,kwargs", [
    ("cat", {}), ("svd", dict(svd_rank=3, svd_clamp=0.9)),
    ("ties_svd", dict(density=0.3, majority_sign_method="frequency"))])
def test_different_ranks_and_svd_options_equal_peft(tmp_path, combination_type, kwargs):
    theirs, ours = peft_and_ours(tmp_path)
    theirs.add_weighted_adapter(["t1", "t3"], [1.0, 0.5], "m", combination_type=combination_type, **kwargs)
    add_weighted_adapter(ours, ["t1", "t3"], [1.0, 0.5], "m", combination_type=combination_type, **kwargs)
    expected, got = merged_tensors(theirs, ours, "m")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)


def test_conv1d_svd_equals_peft(tmp_path):
    adapters = {"t1": dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
                "t2": dict(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)}
    theirs, ours = peft_and_ours(tmp_path, ("t1", "t2"), tiny_gpt2, adapters)
    theirs.add_weighted_adapter(["t1", "t2"], [0.5, 0.5], "m", combination_type="svd")
    add_weighted_adapter(ours, ["t1", "t2"], [0.5, 0.5], "m", combination_type="svd")
    expected, got = merged_tensors(theirs, ours, "m")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties_svd"])
def test_dare_with_the_same_seed_equals_peft(tmp_path, combination_type):
    theirs, ours = peft_and_ours(tmp_path)
    torch.manual_seed(123)
    theirs.add_weighted_adapter(["t1", "t2"], [0.6, 0.4], "m", combination_type=combination_type, density=0.4)
    torch.manual_seed(123)
    add_weighted_adapter(ours, ["t1", "t2"], [0.6, 0.4], "m", combination_type=combination_type, density=0.4)
    expected, got = merged_tensors(theirs, ours, "m")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-5, msg=key)


def test_dare_follows_its_definition():
    """DARE (arXiv:2311.03099): keep each entry with probability p, divide survivors by p; then a weighted
    sum (dare_linear) or TIES' sign election and disjoint mean (dare_ties)."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 32, generator=gen) for _ in range(3)]
    weights = torch.tensor([0.5, -1.0, 2.0])
    density = 0.3

    linear = merge_ops.dare_linear(tensors, weights, density, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    kept = [torch.bernoulli(torch.full((64, 32), density), generator=g) for _ in tensors]
    expected = sum(w * t * m / density for w, t, m in zip(weights, tensors, kept))
    torch.testing.assert_close(linear, expected)
    assert abs(torch.stack(kept).mean().item() - density) < 0.03  # the drop rate is 1 - density

    ties = merge_ops.dare_ties(tensors, weights, density, "total", torch.Generator().manual_seed(7))
    pruned = torch.stack([t * m / density for t, m in zip(tensors, kept)])
    elected = torch.where(pruned.sum(0) >= 0, 1.0, -1.0)
    agree = pruned.sign() == elected
    weighted = pruned * weights[:, None, None]
    expected = (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)
    torch.testing.assert_close(ties, expected)


def test_dare_is_unbiased_on_average():
    tensor = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    mean = torch.stack([merge_ops.random_prune(tensor, 0.5, True, torch.Generator().manual_seed(s))
                        for s in range(40)]).mean(0)
    assert (mean - tensor).abs().mean() < 0.15 * tensor.abs().mean()


def test_svd_merge_of_one_layer_is_the_best_rank_r_approximation(tmp_path):
    _, ours = peft_and_ours(tmp_path)
    add_weighted_adapter(ours, ["t1", "t3"], [1.0, 1.0], "m", combination_type="svd", svd_rank=6,
                         svd_full_matrices=False)
    layer = dict(ours.delta_layers())["model.layers.0.self_attn.q_proj"]
    base = layer.base
    exact = sum(layer.adapters[n].delta_weight(base) for n in ("t1", "t3"))  # rank <= 6: exact
    torch.testing.assert_close(layer.adapters["m"].delta_weight(base), exact, atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem(tmp_path):
    _, ours = peft_and_ours(tmp_path)
    with pytest.raises(dt.DeltaConfigError, match="equal rank"):
        add_weighted_adapter(ours, ["t1", "t3"], [1, 1], "m", combination_type="linear")
    with pytest.raises(dt.DeltaConfigError, match="density"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "m", combination_type="ties")
    with pytest.raises(dt.DeltaConfigError, match="combination_type='mean'"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "m", combination_type="mean")
    with pytest.raises(dt.DeltaConfigError, match="already exists"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "t1")
    with pytest.raises(dt.DeltaConfigError, match="unknown adapters"):
        add_weighted_adapter(ours, ["t1", "zz"], [1, 1], "m")
    with pytest.raises(dt.DeltaConfigError, match="weights has 1"):
        add_weighted_adapter(ours, ["t1", "t2"], [1], "m")
    assert "m" not in ours.peft_config


@torch.no_grad()
def test_dora_takes_svd_types_only():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True,
                                                          init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with pytest.raises(dt.DeltaConfigError, match="not supported for DoRA"):
        add_weighted_adapter(model, ["a", "b"], [1, 1], "m", combination_type="linear")
    add_weighted_adapter(model, ["a", "b"], [1, 1], "m", combination_type="svd", svd_rank=4)
    layer = dict(model.delta_layers())["model.layers.0.self_attn.q_proj"]
    base = layer.base
    weight = base.weight.detach().clone()
    dora_delta = layer.adapters["a"].merged_weight(base, weight.clone(), {"weight": weight}) - weight
    exact = dora_delta + layer.adapters["b"].delta_weight(base)
    u, s, vh = torch.linalg.svd(exact)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(layer.adapters["m"].delta_weight(base), best, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------ other methods
@torch.no_grad()
def randomized(model):
    for name, param in model.named_parameters():
        if ".adapters." in name:
            param.copy_(torch.randn_like(param) * 0.3 + (1.0 if name.endswith("ia3_l") else 0.0))
    return model


def test_ia3_linear_equals_peft(tmp_path):
    import peft

    kwargs = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config(**kwargs), adapter_name="t1")
    theirs.add_adapter("t2", peft.IA3Config(**kwargs))
    with torch.no_grad():
        for key, param in theirs.named_parameters():
            if "ia3_l" in key:
                param.copy_(torch.rand_like(param) + 0.5)
    theirs.save_pretrained(str(tmp_path))
    ours = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path / "t1"), adapter_name="t1")
    ours.load_adapter(str(tmp_path / "t2"), adapter_name="t2")
    theirs.add_weighted_adapter(["t1", "t2"], [0.3, 0.7], "m")
    add_weighted_adapter(ours, ["t1", "t2"], [0.3, 0.7], "m", combination_type="linear")
    expected, got = merged_tensors(theirs, ours, "m")
    assert sorted(expected) == sorted(got)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    with pytest.raises(dt.DeltaConfigError, match="svd_rank is required"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "n", combination_type="svd")
    with pytest.raises(dt.DeltaConfigError, match="not supported for IA3"):
        add_weighted_adapter(ours, ["t1", "t2"], [1, 1], "n", combination_type="cat")


@torch.no_grad()
def test_loha_lokr_ia3_merge_by_svd_into_a_lora():
    from deltatune.methods.ia3 import IA3Config
    from deltatune.methods.loha import LoHaConfig
    from deltatune.methods.lokr import LoKrConfig

    model = dt.get_peft_model(tiny_llama(), LoHaConfig(r=2, target_modules=["q_proj", "v_proj"]),
                              adapter_name="h")
    model.add_adapter("k", LoKrConfig(r=2, target_modules=["v_proj"]))
    model.add_adapter("i", IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    randomized(model)
    with pytest.raises(dt.DeltaConfigError, match="not supported for LOHA/LOKR"):
        add_weighted_adapter(model, ["h", "k"], [1, 1], "m", combination_type="linear")
    add_weighted_adapter(model, ["h", "k", "i"], [0.5, 1.0, 2.0], "m", combination_type="svd", svd_rank=16)
    assert model.peft_config["m"].peft_type == "LORA"
    layers = dict(model.delta_layers())
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        layer = layers[path]
        base = layer.base
        weight = base.weight.detach().clone()
        reference = {"weight": weight, "bias": base.bias}
        expected = sum(w * (layer.adapters[n].merged_weight(base, weight.clone(), reference) - weight
                            if n == "i" else layer.adapters[n].delta_weight(base))
                       for n, w in (("h", 0.5), ("k", 1.0), ("i", 2.0)) if n in layer.adapters)
        torch.testing.assert_close(layer.adapters["m"].delta_weight(base), expected, atol=1e-5, rtol=1e-5)
    add_weighted_adapter(model, ["h"], [1.0], "h_as_lora", combination_type="svd", svd_rank=16)  # stays svd
    layer = layers["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(layer.adapters["h_as_lora"].delta_weight(layer.base),
                               layer.adapters["h"].delta_weight(layer.base), atol=1e-5, rtol=1e-5)
