"""The fused LoRA linear branch against the plain formula: values and gradients, with and without dropout."""

import pytest
import torch

from deltatune.methods.lora_ops import LoraLinearFunction, lora_linear


def test_gradcheck_without_dropout():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(*t, 0.7, 0.0), (x, base, a, b))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_reference_with_same_mask(dropout):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, requires_grad=True)
    base = torch.randn(4, 6, 10)
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(10, 3, requires_grad=True)
    torch.manual_seed(7)
    ours = lora_linear(x, base, a, b, 1.5, dropout)
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    torch.manual_seed(7)  # the same draw: a Bernoulli(1 - p) keep-mask over (N, in)
    flat = x.reshape(-1, 8)
    keep = torch.empty_like(flat, dtype=torch.bool).bernoulli_(1 - dropout).float() if dropout else 1.0
    reference = base + ((flat * keep / (1 - dropout)) @ a.T @ b.T * 1.5).view(4, 6, 10)
    reference.square().sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)  # float32 sums in another order
    for got, want in zip(grads, (x.grad, a.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
