"""torch.compile takes a DeltaModel for inference and training (aot_eager: dynamo + autograd tracing,
without a C++ toolchain run)."""

import copy

import torch

import deltatune as dt
from tiny_models import tiny_llama, token_batch


def test_compiled_model_matches_eager_in_forward_and_gradients():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear", use_dora=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    eager = copy.deepcopy(model).train()
    compiled = torch.compile(model.train(), backend="aot_eager")
    ids = token_batch(2, 6)
    loss_eager = eager(input_ids=ids, labels=ids).loss
    loss_compiled = compiled(input_ids=ids, labels=ids).loss
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4)


def test_compiled_training_with_dropout_and_dora_runs():
    """Dropout masks (shared by sibling layers) and the DoRA function under torch.compile: a step runs,
    the loss is finite and every adapter parameter gets a gradient."""
    for dora in (False, True):
        torch.manual_seed(0)
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear",
                                                              use_dora=dora))
        compiled = torch.compile(model.train(), backend="aot_eager")
        ids = token_batch(2, 6)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
