"""A forward never changes a parameter, and a refused merge changes nothing.

OFT with COFT: PEFT projects `oft_R` in place inside forward, so two forwards in a row differ (3e-8 on
tiny Llama) and disable == base / save-load exactness break. Here the forward projects functionally and
`after_optimizer_step` keeps the trained parameter inside the eps-ball, written as a fixed point of the
projection (PEFT then reads it unchanged).
"""

from __future__ import annotations

import peft
import torch

import deltatune as dt
from deltatune.core.layer import DeltaLayer
from tiny_models import tiny_llama, token_batch


def coft_model(eps: float = 0.3) -> dt.DeltaModel:
    config = dt.OFTConfig(r=0, oft_block_size=4, coft=True, eps=eps, target_modules=["q_proj", "down_proj"])
    model = dt.get_peft_model(tiny_llama(), config)
    with torch.no_grad():  # far outside the ball, as the conformance table's randomized adapter is
        generator = torch.Generator().manual_seed(5)
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def block_norms(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for _, layer in model.delta_layers():
        if isinstance(layer, DeltaLayer):
            adapter = layer.adapters["default"]
            skew = adapter.oft_R.skew(adapter.oft_R.weight)
            radius = adapter.eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))  # PEFT's _project_batch radius
            out.append((torch.norm(skew, dim=(1, 2)), radius))
    return out


def test_coft_forward_is_pure_and_repeatable():
    model, inputs = coft_model(), {"input_ids": token_batch()}
    before = trained(model)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        first = model(**inputs).logits
        second = model(**inputs).logits
        torch.testing.assert_close(second, first, atol=0, rtol=0)
        for name, value in trained(model).items():
            assert torch.equal(value, before[name]), f"{mode} forward changed {name}"


def test_coft_training_step_keeps_the_parameter_in_the_ball_as_a_fixed_point(tmp_path):
    model, inputs = coft_model(), {"input_ids": token_batch()}
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert any((norm > radius).any() for norm, radius in block_norms(model))  # the step left the ball
    model.after_optimizer_step(1, optimizer)
    assert all((norm <= radius).all() for norm, radius in block_norms(model))
    projected = trained(model)
    model.after_optimizer_step(2, optimizer)  # a fixed point: projecting again writes the same bits
    assert all(torch.equal(v, projected[n]) for n, v in trained(model).items())

    model.eval()
    ours = model(**inputs).logits
    model.save_pretrained(str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    loaded = {n: p.detach().clone() for n, p in theirs.named_parameters() if "oft_R" in n}
    torch.testing.assert_close(theirs(**inputs).logits, ours, atol=1e-5, rtol=1e-5)
    # PEFT projects in place in its forward: our saved weight is already projected, so it stays bit-equal
    assert all(torch.equal(p, loaded[n]) for n, p in theirs.named_parameters() if "oft_R" in n)


def test_peft_bias_all_file_with_a_trained_classifier_loads(tmp_path):
    """peft's bias="all" also writes classifier.modules_to_save.bias (the copy's bias again) and
    classifier.original_module.bias (the frozen base value): the file loads, gives peft's output (also
    when hand-edited values in those keys disagree), and disabled it is still the base exactly."""
    from safetensors.torch import load_file, save_file

    from tiny_models import tiny_bert_cls

    config = dict(r=2, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS")
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tiny_bert_cls(), peft.LoraConfig(**config))
    with torch.no_grad():
        for param in theirs.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape) * 0.2)
    theirs.save_pretrained(str(tmp_path))
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    head = "base_model.model.classifier"
    assert {f"{head}.original_module.bias", f"{head}.modules_to_save.bias"} <= set(tensors)
    tensors[f"{head}.original_module.bias"] += 1.0
    tensors[f"{head}.modules_to_save.bias"] += 100.0
    save_file(tensors, str(file))

    inputs = {"input_ids": token_batch()}
    reference = peft.PeftModel.from_pretrained(tiny_bert_cls(), str(tmp_path)).eval()
    loaded = dt.DeltaModel.from_pretrained(tiny_bert_cls(), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-5)
        with loaded.disable_adapter():
            torch.testing.assert_close(loaded(**inputs).logits, tiny_bert_cls()(**inputs).logits, atol=0, rtol=0)


# ---------------------------------------------------------------------- a refused merge changes nothing
def snapshot(model) -> dict:
    """Every parameter and buffer by name (bitwise copies), and every module's type: what a refused merge
    must leave exactly as it was (a created bias or a dequantized layer shows up too)."""
    state = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    return {"state": state, "types": [(n, type(m).__name__) for n, m in model.named_modules()]}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (a planted NaN equals itself)."""
    flat = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(flat(a), flat(b))


def assert_unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["types"] == before["types"], "module types changed (a dequantized or created module)"
    assert after["state"].keys() == before["state"].keys(), sorted(after["state"].keys() ^ before["state"].keys())
    changed = [n for n, t in before["state"].items() if not same_bits(after["state"][n], t)]
    assert not changed, f"a refused merge changed {changed[:5]}"


def plant_nan(model, suffix: str) -> None:
    """Put one NaN into the adapter parameter whose name ends with `suffix`."""
    (param,) = [p for n, p in model.named_parameters() if n.endswith(suffix)]
    with torch.no_grad():
        param.view(-1)[0] = float("nan")


def random_trained(model, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name or ".copies." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)


def test_ulora_without_default_task_is_refused_before_any_layer_is_merged():
    """Replays the issue: LoRA "a" and ULoRA "u" (num_tasks=2, no default_task) on q_proj; merging both
    without safe_merge used to merge "a" into layers.0.q_proj, then raise."""
    import pytest

    from deltatune.core.merging import MergeError

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("u", dt.registered_methods()["ULORA"](r=2, num_tasks=2, target_modules=["q_proj"]))
    random_trained(model)
    before = snapshot(model)
    with pytest.raises(MergeError) as refused:
        model.merge_adapter(["a", "u"])
    assert_unchanged(model, before)
    assert "default_task" in str(refused.value) and "layers.0.self_attn.q_proj" in str(refused.value)
    assert all(not layer.merged for _, layer in model.delta_layers())


def gpt2_with_planning_side_effects() -> dt.DeltaModel:
    """BitFit (writes biases), IA3 on outputs (scales biases) and LN tuning (writes norms) on every block
    of tiny GPT-2, and LoRA on c_fc: all four active, so one merge plans them layer by layer."""
    from tiny_models import tiny_gpt2

    methods = dt.registered_methods()
    model = dt.get_peft_model(tiny_gpt2(), methods["BITFIT"](target_modules=["c_attn", "c_fc"]), adapter_name="bf")
    model.add_adapter("ia", methods["IA3"](target_modules=["c_attn"], feedforward_modules=[]))
    model.add_adapter("ln", methods["LN_TUNING"](target_modules=["ln_1", "ln_2"]))
    model.add_adapter("lo", dt.LoraConfig(r=2, target_modules=["c_fc"], fan_in_fan_out=True))
    model.set_adapter(["bf", "ia", "ln", "lo"])
    random_trained(model)
    return model


def test_refused_safe_merge_rolls_back_what_planning_wrote():
    """NaN in the last block's LoRA, after good BitFit / IA3 / LN-tuning layers were planned: the
    refused safe merge leaves every base parameter (biases, norms) bit-identical."""
    import pytest

    from deltatune.core.merging import MergeError

    model = gpt2_with_planning_side_effects()
    plant_nan(model, "transformer.h.1.mlp.c_fc.adapters.lo.lora_B.weight")
    before = snapshot(model)
    with pytest.raises(MergeError, match="h.1.mlp.c_fc"):
        model.merge_adapter(["bf", "ia", "ln", "lo"], safe_merge=True)
    assert_unchanged(model, before)
    # after the refusal the good adapters still merge exactly as they would have
    inputs = {"input_ids": token_batch()}
    model.set_adapter(["bf", "ia", "ln"])
    unmerged = model(**inputs).logits
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(model(**inputs).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_nan_in_a_bias_writing_adapter_is_refused_before_any_layer_is_merged():
    """BitFit's own NaN used to raise from inside the merge of its layer, after earlier layers merged."""
    import pytest

    from deltatune.core.merging import MergeError

    model = gpt2_with_planning_side_effects()
    plant_nan(model, "transformer.h.1.mlp.c_fc.adapters.bf.bitfit_bias")
    before = snapshot(model)
    with pytest.raises(MergeError, match="NaN"):
        model.merge_adapter(["bf", "ia", "ln", "lo"])
    assert_unchanged(model, before)


def test_refused_dequantizing_merge_leaves_the_base_quantized():
    """merge_and_unload(dequantize=True) used to dequantize first, so a refused merge had already turned
    the base to float. Refusals: an adapter that cannot merge, and (safe_merge) a NaN merged weight."""
    import pytest

    from conformance_rows import llama64
    from deltatune import quant
    from deltatune.core.merging import MergeError

    model = dt.get_peft_model(quant.quantize(llama64(), "nf4"), dt.LoraConfig(r=2, target_modules=["q_proj"]),
                              adapter_name="a")
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    random_trained(model)
    plant_nan(model, "model.layers.1.self_attn.v_proj.adapters.b.lora_B.weight")
    before = snapshot(model)
    with pytest.raises(MergeError, match="v_proj"):
        model.merge_and_unload(safe_merge=True, adapter_names=["a", "b"], dequantize=True)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.merge_and_unload(adapter_names=["a", "nope"], dequantize=True)
    assert_unchanged(model, before)
