"""AdapterFusion over bottleneck adapters: the formula by hand, init at the adapters' average, only the
fusion trains, loading needs the fused adapters first, errors name what is wrong. The life cycle (disable,
refused merge, save/load, gradients, counts) runs in the conformance table (tests/test_conformance.py)."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.compose.fusion import AdapterFusionConfig, add_fusion, stack_adapters
from deltatune.core.call import CallContext
from deltatune.core.config import DeltaConfigError
from deltatune.methods.bottleneck import BottleneckConfig
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, token_batch

TOL = 1e-5
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert_cls, "t5": tiny_t5}


def inputs_for(model_name: str) -> dict:
    ids = token_batch(batch=2, length=5)
    return {"input_ids": ids, "decoder_input_ids": ids[:, :3]} if model_name == "t5" else {"input_ids": ids}


@torch.no_grad()
def output(model, inputs) -> torch.Tensor:
    out = model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states if getattr(out, "hidden_states", None) is not None else out.decoder_hidden_states
    return torch.cat([out.logits.flatten(), hidden[-1].flatten()])


def fused_model(model_name: str = "llama"):
    """Two trained (random) bottleneck adapters, a third elsewhere, and a fusion over the first two."""
    torch.manual_seed(0)
    model = dt.get_peft_model(MODELS[model_name](), BottleneckConfig(bottleneck_type="houlsby", bottleneck_size=4,
                                                                     init_weights=False), adapter_name="a")
    model.add_adapter("b", BottleneckConfig(bottleneck_type="pfeiffer", bottleneck_size=2, init_weights=False,
                                            non_linearity="gelu"))
    add_fusion(model, ["a", "b"], "ab")
    return model


@torch.no_grad()
def randomize_fusion(model) -> None:
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "fusion_" in name:
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def test_fusion_formula_by_hand():
    model = fused_model()
    randomize_fusion(model)
    mlp = model.model.model.layers[0].mlp
    fusion, a, b = (mlp.adapters[n] for n in ("ab", "a", "b"))
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        h = mlp.base_layer(x)
        # keys and values over each adapter's update (its up-projection), the residual h added after
        updates = [a.adapter_up(torch.relu(a.adapter_down(h))),
                   b.adapter_up(torch.nn.functional.gelu(b.adapter_down(h)))]
        q = fusion.fusion_query(h)
        scores = torch.stack([(fusion.fusion_key(u) * q).sum(-1) for u in updates], -1)  # (2, 3, n)
        probs = torch.softmax(scores / fusion.temperature, -1)
        expected = h + sum(probs[..., i:i + 1] * fusion.fusion_value(u) for i, u in enumerate(updates))
        assert fusion.fusion_value.bias is None  # `adapters`' value projection has none
        torch.testing.assert_close(mlp(x), expected)
    attn = model.model.model.layers[0].self_attn  # only "a" sits there: no fusion
    assert "ab" not in attn.adapters


def test_fusion_starts_at_the_average_of_its_adapters():
    model = fused_model()
    mlp = model.model.model.layers[1].mlp
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        h = mlp.base_layer(x)
        call = CallContext()
        average = (mlp.adapters["a"](x, h, mlp.base, call) + mlp.adapters["b"](x, h, mlp.base, call)) / 2
        torch.testing.assert_close(mlp(x), average)


def test_only_the_fusion_trains_and_loads_after_its_adapters(tmp_path):
    """The fused adapters stay frozen; a fusion saved with them loads only once they are there. (Disable,
    refused merge, save/load, gradients and counts run in the conformance table.)"""
    model = fused_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.ab.fusion_" in n for n in trainable)
    randomize_fusion(model)
    inputs = inputs_for("llama")
    fused = output(model, inputs)
    model.set_adapter("a")
    assert (output(model, inputs) - fused).abs().max() > 1e-4
    model.set_adapter("ab")
    model.save_pretrained(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["a", "ab", "b"]
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), str(tmp_path / "a"), adapter_name="a")
    with pytest.raises(DeltaConfigError, match="add or load them before the fusion"):
        loaded.load_adapter(str(tmp_path / "ab"), adapter_name="ab")  # "b" is not there yet
    loaded.load_adapter(str(tmp_path / "b"), adapter_name="b")
    loaded.load_adapter(str(tmp_path / "ab"), adapter_name="ab")
    loaded.set_adapter("ab")
    torch.testing.assert_close(output(loaded, inputs), fused, atol=0, rtol=0)
    assert loaded.peft_config["ab"].adapter_names == ["a", "b"]


def test_fusion_mixed_batch_rows_match_each_adapter_alone():
    model = fused_model()
    randomize_fusion(model)
    ids = token_batch(batch=3)
    mixed = model(ids, adapter_names=["ab", "a", "__base__"]).logits
    for row, name in enumerate(["ab", "a"]):
        model.set_adapter(name)
        torch.testing.assert_close(mixed[row:row + 1], model(ids[row:row + 1]).logits, atol=TOL, rtol=TOL)


def test_fusion_and_stack_errors_name_the_problem():
    model = fused_model()
    model.add_adapter("lora", dt.LoraConfig(target_modules=["lm_head"]))
    with pytest.raises(DeltaConfigError, match="'lora' is LORA"):
        add_fusion(model, ["a", "lora"], "bad")
    with pytest.raises(DeltaConfigError, match="'lora' is LORA"):
        stack_adapters(model, ["a", "lora"])
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        add_fusion(model, ["a", "nope"], "bad")
    with pytest.raises(DeltaConfigError, match="adapter_names"):
        AdapterFusionConfig(adapter_names=["a"], target_modules=["mlp"])
    with pytest.raises(DeltaConfigError, match="temperature"):
        AdapterFusionConfig(adapter_names=["a", "b"], temperature=0)
