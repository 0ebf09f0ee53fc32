"""training.kernels (train/run/kernels.py): Liger Kernel's fused linear cross-entropy gives our loss and
gradients (train/linear_loss.py), Liger's RMSNorm/SwiGLU/RoPE patch leaves the adapters in place, and the
option resolves per device with clear errors.

Liger's kernels are Triton: on a GPU these cases run directly; on a CPU they run through Triton's interpreter
in a child pytest (interpreted.py). Liger's fused linear cross-entropy runs there; its RMSNorm and SwiGLU
kernels do not (Triton 3.9's interpreter fails inside them: "'float' object has no attribute 'to'"), so on a
CPU the patched model's numbers are not checked, only what the patch replaced and kept; on CUDA the patched
model's loss and adapter gradients are held to the unpatched model's."""

import copy

import pytest
import torch

import deltatune as dt
from deltatune.core.config import DeltaConfigError
from deltatune.train.config import TrainingSection
from deltatune.train.linear_loss import linear_cross_entropy
from deltatune.train.run import kernels
from interpreted import assert_passed_in_child, interpreted_report, needs_child

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def child_report() -> str:
    return interpreted_report(__file__, "interpreted")


def in_child(request) -> bool:
    """On a CPU without the interpreter: check this case's result in the child run instead."""
    if needs_child():
        assert_passed_in_child(request.getfixturevalue("child_report"), __file__, request.node.name)
        return True
    return False


@pytest.mark.parametrize("with_bias", [False, True])
def test_interpreted_liger_loss_equals_ours(with_bias, request):
    """Summed loss and the gradients of hidden, head weight and bias: Liger's kernel == our chunked path,
    with ignored rows (-100) among the targets."""
    if in_child(request):
        return
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=generator).to(DEVICE)
    weight = (torch.randn(40, 16, generator=generator) * 0.3).to(DEVICE)
    bias = (torch.randn(40, generator=generator) * 0.1).to(DEVICE) if with_bias else None
    targets = torch.randint(0, 40, (12,), generator=generator).to(DEVICE)
    targets[[2, 7]] = -100
    results = []
    for choice in ("none", "liger"):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, *([bias] if with_bias else []))]
        loss = linear_cross_entropy(leaves[0], leaves[1], leaves[2] if with_bias else None, targets, choice)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (ours, our_grads), (liger, liger_grads) = results
    want = torch.nn.functional.cross_entropy(hidden @ weight.T + (bias if with_bias else 0), targets,
                                             reduction="sum")  # and both against the plain formula
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(liger, ours, atol=1e-4, rtol=1e-5)
    for got, expected in zip(liger_grads, our_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_interpreted_liger_patch_keeps_the_adapters(request):
    """apply_liger on a LoRA-wrapped Llama: RMSNorms and the MLP forward are Liger's, every adapted
    projection still holds its adapter; on CUDA, loss and adapter gradients equal the unpatched model's."""
    if in_child(request):
        return
    from tiny_models import tiny_llama, token_batch

    model = dt.get_peft_model(tiny_llama().to(DEVICE), dt.LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    plain = copy.deepcopy(model)
    adapted = {n for n, m in model.named_modules() if hasattr(m, "base_layer")}
    kernels.apply_liger(model.get_base_model())
    patched = [m for n, m in model.named_modules() if n.endswith(("norm", "mlp"))]  # Liger binds new forwards
    assert len(patched) == 7 and all(m.forward.__module__.startswith("liger_kernel") for m in patched)
    assert all(not m.forward.__module__.startswith("liger_kernel") for m in plain.modules())
    assert {n for n, m in model.named_modules() if hasattr(m, "base_layer")} == adapted
    if DEVICE.type != "cuda":  # the interpreter cannot run Liger's RMSNorm (module docstring)
        return
    ids = token_batch(2, 8).to(DEVICE)
    losses = []
    for candidate in (plain, model):
        loss = candidate(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-4)
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-3)


def test_kernels_option_resolves_per_device(monkeypatch):
    assert kernels.resolve_kernels("none", "cuda") == "none"
    assert kernels.resolve_kernels("auto", "cpu") == "none"
    assert kernels.resolve_kernels("auto", "cuda") == "liger"  # installed here (the test extra)
    assert kernels.resolve_kernels("liger", "cuda") == "liger"
    with pytest.raises(DeltaConfigError, match="training.kernels.*CUDA only"):
        kernels.resolve_kernels("liger", "cpu")
    monkeypatch.setattr(kernels, "liger_installed", lambda: False)
    assert kernels.resolve_kernels("auto", "cuda") == "none"
    with pytest.raises(DeltaConfigError, match=r"training.kernels.*deltatune\[kernels\]"):
        kernels.resolve_kernels("liger", "cuda")
    with pytest.raises(DeltaConfigError, match="training.kernels"):
        TrainingSection(kernels="fast")
