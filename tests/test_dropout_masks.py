"""The fused dropout masks (methods/dropout_masks.py, `training.compile` on a CPU): Inductor's compiled
masking equals its eager reference bit for bit, the masks are unbiased independent Bernoulli draws, and the
run option turns them on before training starts."""

import pytest
import torch

import deltatune as dt
from deltatune.methods import dropout_masks
from deltatune.methods.dropout_masks import compiled_masking, draw_keep_mask, masked, warm_up_fused_masks
from deltatune.methods.lora_common import KEEP_LEVELS, keep_threshold
from deltatune.train.run.runtime import compile_for_training
from tiny_models import tiny_llama, token_batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (13, 7), (300, 33)])
def test_compiled_masking_equals_its_eager_reference(dtype, shape):
    t = torch.randn(shape).to(dtype)
    seed = 2**61 + 12345  # both 32-bit keys non-zero
    keep = draw_keep_mask(torch.Size(shape), 0.3, t.device, seed, fused=True)
    assert keep.dtype == torch.uint8 and keep.shape == shape
    got = masked(t, 0.3, seed, fused=True)
    assert got.dtype == dtype
    assert torch.equal(got, t * keep)  # the compiled loop and the eager hash draw the same mask
    assert torch.equal(got, compiled_masking()(t, *dropout_masks._keys(seed), keep_threshold(0.3)))


@pytest.mark.parametrize("dropout", [0.05, 0.5])
def test_fused_masks_are_unbiased_and_independent(dropout):
    p_keep = keep_threshold(dropout) / KEEP_LEVELS
    first = draw_keep_mask(torch.Size([2000, 999]), dropout, torch.device("cpu"), seed=7, fused=True).float()
    second = draw_keep_mask(torch.Size([2000, 999]), dropout, torch.device("cpu"), seed=8, fused=True).float()
    sd = (p_keep * (1 - p_keep) / first.numel()) ** 0.5
    assert abs(first.mean().item() - p_keep) < 5 * sd
    assert abs(second.mean().item() - p_keep) < 5 * sd
    flat = first.reshape(-1)  # neighbours, rows apart and columns apart: P(both kept) = P(keep)^2
    for lag in (1, 2, 999, 4096):
        assert abs((flat[:-lag] * flat[lag:]).mean().item() - p_keep**2) < 10 * sd, lag
    assert abs((first * second).mean().item() - p_keep**2) < 10 * sd  # seeds one apart: independent masks
    by_row = first.mean(1)  # no row (token) is favoured
    assert (by_row - p_keep).abs().max() < 6 * (p_keep * (1 - p_keep) / 999) ** 0.5


def test_training_compile_on_a_cpu_turns_on_fused_masks_and_trains():
    torch.manual_seed(0)
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear",
                                                          use_dora=True))
    assert not model.fused_dropout_masks
    assert compile_for_training(model) is model and model.fused_dropout_masks
    ids = token_batch(2, 6)
    loss = model.train()(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0, A's grads too


def test_a_machine_where_inductor_cannot_compile_fails_before_training(monkeypatch):
    def no_compiler():
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(dropout_masks, "compiled_masking", lambda: lambda *a: no_compiler())
    with pytest.raises(RuntimeError, match="training.compile.*no C\\+\\+ compiler"):
        warm_up_fused_masks()
