"""A forward never changes a parameter, and a refused merge changes nothing.

OFT with COFT: PEFT projects `oft_R` in place inside forward, so two forwards in a row differ (3e-8 on
tiny Llama) and disable == base / save-load exactness break. Here the forward projects functionally and
`after_optimizer_step` keeps the trained parameter inside the eps-ball, written as a fixed point of the
projection (PEFT then reads it unchanged).
"""

from __future__ import annotations

import peft
import torch
from tiny_models import tiny_llama, token_batch

import deltatune as dt
from deltatune.core.layer import DeltaLayer


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
