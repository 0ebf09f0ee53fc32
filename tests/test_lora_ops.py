"""The fused LoRA linear branch against the plain formula: values and gradients, with and without dropout."""

import pytest
import torch

from deltatune.core.call import CallContext
from deltatune.methods.lora_ops import (
    KEEP_LEVELS,
    DropoutMasks,
    LoraLinearFunction,
    draw_keep_mask,
    keep_threshold,
    lora_linear,
    new_mask_seed,
)


def test_gradcheck_without_dropout():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(*t, 0.7, 0.0, False, DropoutMasks(True)),
                                    (base, x, a, b))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_matches_reference_with_same_mask(dropout):
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, requires_grad=True)
    base = torch.randn(4, 6, 10)
    a = torch.randn(3, 8, requires_grad=True)
    b = torch.randn(10, 3, requires_grad=True)
    torch.manual_seed(7)
    ours = lora_linear(x, base, a, b, 1.5, dropout, CallContext())
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    torch.manual_seed(7)  # the same draw: a keep-mask over (N, in), P(keep) = threshold / 2^16
    flat = x.reshape(-1, 8)
    keep = draw_keep_mask(flat.shape, dropout, flat.device, new_mask_seed()).float() if dropout else 1.0
    p_keep = keep_threshold(dropout) / KEEP_LEVELS
    reference = base + ((flat * keep / p_keep) @ a.T @ b.T * 1.5).view(4, 6, 10)
    reference.square().sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)  # float32 sums in another order
    for got, want in zip(grads, (x.grad, a.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_keep_mask_is_an_unbiased_independent_bernoulli():
    torch.manual_seed(0)
    assert abs(keep_threshold(0.05) / KEEP_LEVELS - 0.95) < 1e-5
    keep = draw_keep_mask(torch.Size([3000, 999]), 0.05, torch.device("cpu"), seed=0).float()
    assert keep.shape == (3000, 999)
    sd = (0.95 * 0.05 / keep.numel()) ** 0.5
    assert abs(keep.mean().item() - 0.95) < 5 * sd
    # each of the four 16-bit chunks of a 64-bit draw is used alike (the top one holds the sign bit)
    by_chunk = keep.reshape(-1)[: keep.numel() // 4 * 4].view(-1, 4).mean(0)
    assert (by_chunk - 0.95).abs().max() < 5 * sd * 4 ** 0.5
    # neighbouring entries are independent: P(both kept) = P(keep)^2
    pairs = keep.reshape(-1)[:-1] * keep.reshape(-1)[1:]
    assert abs(pairs.mean().item() - 0.95 ** 2) < 5 * sd * 2


def test_layers_reading_one_input_share_its_mask_and_others_do_not():
    """q/k/v read the same tensor in one call: one mask; another input, or the same input in another call
    (the next forward), gets a fresh one. The masks live in the call's memo, nowhere else."""
    torch.manual_seed(0)
    x = torch.randn(5, 64)
    base = torch.zeros(5, 64)
    eye = torch.eye(64)
    call = CallContext()
    first = lora_linear(x, base, eye, eye, 1.0, 0.5, call)  # identity LoRA: the dropped input itself
    second = lora_linear(x, base, eye, eye, 1.0, 0.5, call)
    torch.testing.assert_close(first, second)
    other = lora_linear(x.clone(), base, eye, eye, 1.0, 0.5, call)
    assert not torch.equal(first != 0, other != 0)
    assert not torch.equal(lora_linear(x, base, eye, eye, 1.0, 0.5, CallContext()) != 0, first != 0)
    unshared = CallContext(share_dropout=False)
    assert not torch.equal(lora_linear(x, base, eye, eye, 1.0, 0.5, unshared) != 0,
                           lora_linear(x, base, eye, eye, 1.0, 0.5, unshared) != 0)


def test_a_call_keeps_at_most_one_masked_input():
    """Drawing for a new input frees the previous masked input; backward's redraw frees forward's."""
    call, masks = CallContext(), None
    for width in (8, 9, 10):
        x = torch.randn(4, width, requires_grad=True)
        lora_linear(x, torch.zeros(4, 3), torch.randn(2, width), torch.randn(3, 2), 1.0, 0.3, call)
        masks = call.memo["lora_dropout"]
        assert masks.forward[3].shape == (4, width) and masks.backward is None
    out = lora_linear(x, torch.zeros(4, 3), torch.randn(2, 10, requires_grad=True), torch.randn(3, 2), 1.0, 0.3, call)
    out.sum().backward()
    assert masks.forward is None and masks.backward[2].shape == (4, 10)


def test_backward_draws_each_inputs_mask_again_for_all_its_readers():
    """Two layers read x, one reads y: backward regenerates x's mask once for both readers and y's for its
    own, equal to a reference built from the same two draws."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    factors = [(torch.randn(3, 8, requires_grad=True), torch.randn(5, 3, requires_grad=True)) for _ in range(3)]
    base = torch.zeros(6, 5)

    def loss(branch):
        q, k = branch(x, *factors[0]), branch(x, *factors[1])
        return (q * k).sum() + branch(y, *factors[2]).square().sum()

    torch.manual_seed(7)
    call = CallContext()
    loss(lambda inp, a, b: lora_linear(inp, base, a, b, 2.0, 0.4, call)).backward()
    leaves = [x, y, *[t for pair in factors for t in pair]]
    ours = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.manual_seed(7)
    p_keep = keep_threshold(0.4) / KEEP_LEVELS
    masks = {id(inp): draw_keep_mask(inp.shape, 0.4, inp.device, new_mask_seed()).float() for inp in (x, y)}
    loss(lambda inp, a, b: base + 2.0 * (inp * masks[id(inp)] / p_keep) @ a.T @ b.T).backward()
    for got, t in zip(ours, leaves):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-4)  # float32 sums in another order


def test_gradient_checkpointing_replays_the_dropout_masks():
    """A checkpointed recompute draws the same masks (torch replays the RNG), so gradients match."""
    import deltatune as dt
    from tiny_models import tiny_llama, token_batch

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear",
                                                              init_lora_weights=False)).train()
        if checkpointed:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
            model.get_base_model().enable_input_require_grads()
        ids = token_batch(2, 6)
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tokens", [1, 9])  # decode-sized (dense masked path) and prefill-sized (gather path)
def test_mixed_batch_kernel_equals_each_sample_alone_and_caches_per_call(tokens):
    from deltatune.methods import lora_ops

    torch.manual_seed(0)
    factors = [(torch.randn(r, 8), torch.randn(6, r), s) for r, s in ((2, 0.5), (4, 2.0))]
    factors.insert(1, None)  # an empty slot
    index = torch.tensor([0, -1, 2, 2, 0])  # -1: the base model
    x, base = torch.randn(5, tokens, 8), torch.randn(5, tokens, 6)

    def reference():
        rows = []
        for sample, slot in enumerate(index.tolist()):
            a, b, s = factors[slot] if slot >= 0 else (torch.zeros(1, 8), torch.zeros(6, 1), 0.0)
            rows.append(base[sample] + s * x[sample] @ a.T @ b.T)
        return torch.stack(rows)

    with torch.no_grad():
        memo = {}
        torch.testing.assert_close(lora_ops.mixed_lora_linear(factors, x, base, index, memo, "q"), reference())
        stacks = memo["q"][1]
        torch.testing.assert_close(lora_ops.mixed_lora_linear(factors, x, base, index, memo, "q"), reference())
        assert memo["q"][1] is stacks  # the same call (decode steps of one generate): stacked once
        factors[0][1].mul_(3.0)  # an optimizer step or hotswap between calls: the next call stacks anew
        torch.testing.assert_close(lora_ops.mixed_lora_linear(factors, x, base, index, {}, "q"), reference())
        factors[2] = (torch.randn(4, 8), torch.randn(6, 4), 2.0)  # other tensors under the same key: rebuilt
        torch.testing.assert_close(lora_ops.mixed_lora_linear(factors, x, base, index, memo, "q"), reference())


def test_dora_function_gradcheck_without_dropout():
    from deltatune.methods.dora import DoraLinearFunction

    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 5, **d, requires_grad=True)
    weight, bias = torch.randn(4, 5, **d), torch.randn(4, **d)
    base = (x.detach() @ weight.T + bias).requires_grad_()
    a, b = torch.randn(2, 5, **d, requires_grad=True), torch.randn(4, 2, **d, requires_grad=True)
    m = torch.rand(4, **d).add(0.5).requires_grad_()

    def fn(x, base, a, b, m):  # the norm is a constant in backprop (DoRA section 4.3): freeze it for gradcheck
        return DoraLinearFunction.apply(x, base, weight, bias, a, b, m, 0.7, 0.0, DropoutMasks(True))

    # gradcheck perturbs A and B, which moves the (constant-in-backprop) norm: check x, base and m here,
    # A and B against the reference formula below
    assert torch.autograd.gradcheck(lambda x, base, m: fn(x, base, a.detach(), b.detach(), m), (x, base, m))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_function_matches_the_reference_formula(dropout):
    """DoraLinearFunction against the module path's formula (dora.py), with the same dropout mask."""
    from deltatune.methods import dora

    torch.manual_seed(0)
    x = torch.randn(4, 6, 8, requires_grad=True)
    weight, bias = torch.randn(10, 8), torch.randn(10)
    base = x.detach() @ weight.T + bias
    a, b = torch.randn(3, 8, requires_grad=True), torch.randn(10, 3, requires_grad=True)
    m = (dora.channel_norm(weight) * (1 + 0.1 * torch.randn(10))).requires_grad_()
    torch.manual_seed(7)
    ours = dora.dora_linear(x, base, weight, bias, a, b, m, 1.5, dropout, CallContext())
    ours.square().sum().backward()
    grads = [t.grad.clone() for t in (x, a, b, m)]
    for t in (x, a, b, m):
        t.grad = None
    torch.manual_seed(7)
    flat = x.reshape(-1, 8)
    keep = draw_keep_mask(flat.shape, dropout, flat.device, new_mask_seed()).float() if dropout else 1.0
    dropped = (flat * keep / (keep_threshold(dropout) / KEEP_LEVELS)).view(x.shape)
    scale = dora.magnitude_scale(m, weight, 1.5 * b @ a)
    layer = torch.nn.Linear(8, 10)
    layer.weight.data, layer.bias.data = weight, bias
    base_result = dora.base_without_bias(layer, weight, base, dropped if dropout else None, -1)
    reference = dora.dora_output(base, base_result, dropped @ a.T @ b.T, scale, -1, 1.5)
    reference.square().sum().backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, (x.grad, a.grad, b.grad, m.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_inference_adds_into_the_base_output_and_fusion_inputs_stay_intact():
    """Without autograd a LoRA layer updates its base layer's fresh output in place (no copy); adapters
    that share one base output (fusion, X-LoRA experts) still get an untouched one."""
    import deltatune as dt
    from tiny_models import tiny_llama

    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    seen = {}
    layer.base_layer.register_forward_hook(lambda m, i, out: seen.update(ptr=out.data_ptr(), value=out.clone()))
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        out = layer(x)
    adapter = layer.adapters["default"]
    expected = seen["value"] + adapter.scaling * x @ adapter.lora_A.weight.T @ adapter.lora_B.weight.T
    assert out.data_ptr() == seen["ptr"]
    torch.testing.assert_close(out, expected)
    base_out = torch.randn(2, 3, 16)
    kept = base_out.clone()
    with torch.no_grad():
        adapter(x, base_out, layer.base, CallContext())  # a caller that does not hand over base_out
    assert torch.equal(base_out, kept)
