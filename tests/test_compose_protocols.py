"""compose/ asks the adapter protocols (core/protocols.py), never a method's name.

- DoRA's `delta_weight` is its true update: exactly what merging writes into the base weight. So an svd
  combination or an extraction of DoRA needs no DoRA case, and at full rank its LoRA gives the merged model's
  output (an invariant computed by core's merge, not by compose).
- An adapter class made up here, named nowhere in compose/, is combined and extracted by what it declares:
  Additive (its delta_weight) or Reparameterizing (merged_weight - W); the factor-mixing types, which need
  `LowRank` factors, refuse it with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.compose.extract import extract_lora
from deltatune.compose.weighted import add_weighted_adapter
from deltatune.core.base import BaseLayer
from deltatune.core.call import CallContext
from deltatune.core.config import DeltaConfig
from deltatune.core.protocols import Additive, LayerAdapter, Reparameterizing, check_adapter_class
from tiny_models import tiny_gpt2, tiny_llama, token_batch

TOL = dict(atol=1e-5, rtol=1e-5)
FAMILIES = {"llama": (tiny_llama, ["q_proj", "v_proj"], False, 16),  # full rank of a 16 x 16 layer
            "gpt2": (tiny_gpt2, ["c_attn"], True, 16)}  # Conv1D (16, 48): full rank 16


@torch.no_grad()
def randomize(model, names):
    generator = torch.Generator().manual_seed(5)
    for key, param in model.named_parameters():
        if any(f".adapters.{n}." in key for n in names):
            noise = torch.randn(param.shape, generator=generator) * 0.3
            param.add_(noise) if key.endswith("lora_magnitude_vector") else param.copy_(noise)
    return model.eval()


def dora_and_lora(family):
    """DoRA adapter "a" (magnitude moved off its init) and plain LoRA "b" on the same layers."""
    build, targets, fan_in_fan_out, _ = FAMILIES[family]
    torch.manual_seed(0)
    kwargs = dict(r=2, lora_alpha=4, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    model = dt.get_peft_model(build(), dt.LoraConfig(use_dora=True, **kwargs), adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(**kwargs))
    return randomize(model, ["a", "b"])


@torch.no_grad()
def merged_logits(model, names, ids):
    model.set_adapter(names)
    model.merge_adapter()
    try:
        return model(ids).logits
    finally:
        model.unmerge_adapter()


# ------------------------------------------------------------------------------------------ (a) DoRA
@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_dora_delta_weight_is_exactly_what_merging_writes(family):
    model = dora_and_lora(family)
    layers = [layer for _, layer in model.delta_layers()]
    before = [layer.base.read_weight() for layer in layers]
    deltas = [layer.adapters["a"].delta_weight(layer.base) for layer in layers]
    model.set_adapter("a")
    model.merge_adapter()
    for layer, weight, delta in zip(layers, before, deltas):
        assert torch.equal(layer.base.read_weight() - weight, delta), layer.module_name
    model.unmerge_adapter()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_dora_svd_combination_and_extraction_at_full_rank_give_the_merged_model(family):
    model = dora_and_lora(family)
    full = FAMILIES[family][3]
    ids = token_batch(2, 5)
    both, dora_alone = merged_logits(model, ["a", "b"], ids), merged_logits(model, ["a"], ids)
    add_weighted_adapter(model, ["a", "b"], [1.0, 1.0], "ab", combination_type="svd", svd_rank=full)
    extract_lora(model, "a", rank=full, new_adapter_name="a_lora")
    assert not model.peft_config["ab"].use_dora and not model.peft_config["a_lora"].use_dora
    model.set_adapter("ab")
    torch.testing.assert_close(model(ids).logits, both, **TOL)
    model.set_adapter("a_lora")
    torch.testing.assert_close(model(ids).logits, dora_alone, **TOL)
    add_weighted_adapter(model, ["a"], [1.0], "a_svd", combination_type="svd")  # default rank: DoRA's r
    assert model.peft_config["a_svd"].r == 2


def test_dora_refuses_the_factor_types_naming_it():
    model = dora_and_lora("llama")
    for kind in ("cat", "linear", "ties"):
        with pytest.raises(dt.DeltaConfigError, match=f"combination_type='{kind}' is not supported for DoRA"):
            add_weighted_adapter(model, ["a", "b"], [1, 1], "m", combination_type=kind, density=0.5)
    assert "m" not in model.peft_config


# ------------------------------------------------------------------------------------------ (b) made-up ones
class DenseDelta(nn.Module, Additive):
    """A full trainable update D (out, in) of a linear layer: out = W x + D x. Its delta_weight is D in the
    base's layout (Conv1D: transposed), the true update."""

    merge_rule = "additive"

    def __init__(self, base: BaseLayer) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(base.out_features, base.in_features, **base.factory))

    def forward(self, x, base_out, base: BaseLayer, call: CallContext, owns_base_out: bool = False):
        return base_out + F.linear(x.to(self.delta.dtype), self.delta).to(base_out.dtype)

    def merge_refusal(self):
        return None

    def delta_weight(self, base: BaseLayer) -> torch.Tensor:
        return base.from_out_first(self.delta.detach().float())


class ChannelScale(nn.Module, Reparameterizing):
    """Scales each output channel of the output so far, bias included: out = l * y. Merging scales the
    weight's rows and writes the scaled bias into the base, which a weight delta cannot carry."""

    merge_rule = "sequential"

    def __init__(self, base: BaseLayer) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(base.out_features, **base.factory))

    def forward(self, x, base_out, base: BaseLayer, call: CallContext, owns_base_out: bool = False):
        return base_out * self.scale.to(base_out.dtype)

    def merge_refusal(self):
        return None

    def merged_weight(self, base: BaseLayer, weight, reference):
        if base.bias is not None:
            base.bias.copy_((base.bias.float() * self.scale.float()).to(base.bias.dtype))
        return base.from_out_first(base.to_out_first(weight) * self.scale.float()[:, None])

    def unmerged_weight(self, base: BaseLayer, weight):
        if base.bias is not None:
            base.bias.copy_((base.bias.float() / self.scale.float()).to(base.bias.dtype))
        return base.from_out_first(base.to_out_first(weight) / self.scale.float()[:, None])


def made_up_config(adapter_type):
    @dataclass
    class MadeUpConfig(DeltaConfig):
        peft_type = f"TEST_{adapter_type.__name__.upper()}"
        adapter_types = (adapter_type,)

        def supports(self, base):
            return base.kind == "linear"

        def make_adapter(self, base, module_name, shared=None):
            return adapter_type(base)

    return MadeUpConfig


@pytest.mark.parametrize("family", sorted(FAMILIES))
@torch.no_grad()
def test_a_made_up_additive_adapter_is_combined_and_extracted_by_its_protocol(family):
    check_adapter_class(DenseDelta, LayerAdapter)  # what register_method checks
    build, targets, fan_in_fan_out, full = FAMILIES[family]
    torch.manual_seed(0)
    model = dt.get_peft_model(build(), made_up_config(DenseDelta)(target_modules=targets), adapter_name="d")
    model.add_adapter("b", dt.LoraConfig(r=2, lora_alpha=4, target_modules=targets,
                                         fan_in_fan_out=fan_in_fan_out))
    randomize(model, ["d", "b"])
    ids = token_batch(2, 5)
    model.set_adapter(["d", "b"])
    unmerged_both = model(ids).logits  # the adapters' own forwards, not their delta_weight
    model.set_adapter("d")
    unmerged_d = model(ids).logits
    add_weighted_adapter(model, ["d", "b"], [1.0, 1.0], "db", combination_type="svd", svd_rank=full)
    extract_lora(model, "d", rank=full, new_adapter_name="d_lora")
    assert model.peft_config["db"].peft_type == model.peft_config["d_lora"].peft_type == "LORA"
    model.set_adapter("db")
    torch.testing.assert_close(model(ids).logits, unmerged_both, **TOL)
    model.set_adapter("d_lora")
    torch.testing.assert_close(model(ids).logits, unmerged_d, **TOL)
    torch.testing.assert_close(merged_logits(model, ["d", "b"], ids), unmerged_both, **TOL)
    with pytest.raises(dt.DeltaConfigError, match="'cat' is not supported for TEST_DENSEDELTA adapters"):
        add_weighted_adapter(model, ["d", "b"], [1, 1], "m", combination_type="cat")
    with pytest.raises(dt.DeltaConfigError, match="svd_rank is required"):
        add_weighted_adapter(model, ["d"], [1], "m", combination_type="svd")
    assert "m" not in model.peft_config


@torch.no_grad()
def test_a_made_up_reparameterizing_adapter_is_extracted_and_its_bias_reported():
    gpt2 = tiny_gpt2()
    for block in gpt2.transformer.h:
        block.attn.c_attn.bias.normal_()  # the scale moves it; a LoRA cannot
    model = dt.get_peft_model(gpt2, made_up_config(ChannelScale)(target_modules=["c_attn"]), adapter_name="s")
    generator = torch.Generator().manual_seed(1)
    for key, param in model.named_parameters():
        if ".adapters.s." in key:
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    bias = model.model.transformer.h[0].attn.c_attn.base_layer.bias.detach().clone()
    report = extract_lora(model, "s", rank=16)  # full rank of the (16, 48) Conv1D
    assert report.skipped == ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    assert torch.equal(model.model.transformer.h[0].attn.c_attn.base_layer.bias, bias)  # put back
    assert report.overall_error < 1e-5
    layer = dict(model.delta_layers())["transformer.h.0.attn.c_attn"]
    weight = layer.base.read_weight()  # (in, out): the scale acts on the output columns
    expected = weight * layer.adapters["s"].scale.float()[None, :] - weight
    torch.testing.assert_close(layer.adapters["s_lora"].delta_weight(layer.base), expected, **TOL)
    model.set_adapter("s")
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):  # its update depends on W
        extract_lora(model, "s", rank=16, new_adapter_name="again")
    model.unmerge_adapter()
    assert "again" not in model.peft_config


def test_a_source_that_runs_the_whole_model_is_refused_not_dropped():
    """A soft prompt (TakesOverForward) has no weight update: an svd merge used to leave it out silently."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="l")
    model.add_adapter("p", dt.PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    with pytest.raises(dt.DeltaConfigError, match=r"adapters \['p'\] act on the whole model"):
        add_weighted_adapter(model, ["l", "p"], [1, 1], "m", combination_type="svd", svd_rank=2)
    assert "m" not in model.peft_config
