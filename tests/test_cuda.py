"""The GPU checks, on whichever device is here: CUDA when present (benchmarks/gpu.py runs this file first on
a GPU), else the CPU, with the same assertions either way: bf16 adapters train and merge, 4-bit and 8-bit
bitsandbytes bases take LoRA, a mixed batch equals each adapter alone, and a compiled model (Inductor)
equals eager in loss and gradients, and the Triton dropout + down-projection (methods/lora_triton.py) equals
the reference (on a CPU through Triton's interpreter in a child pytest, tests/interpreted.py)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core.call import CallContext
from deltatune.methods import lora_ops, lora_triton
from deltatune.methods import lora_reference as ref
from interpreted import assert_passed_in_child, interpreted_report, needs_child

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def llama64(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """2-layer Llama, hidden 64 (whole bitsandbytes blocks), on DEVICE."""
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(DEVICE, dtype).eval()


def token_ids(batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1)).to(DEVICE)


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move every trainable tensor away from its init (lora_B = 0 would make merge checks vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_((torch.randn(param.shape, generator=generator) * scale).to(param))


def lora(model, **settings) -> dt.DeltaModel:
    return dt.get_peft_model(model, dt.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **settings))


@pytest.mark.parametrize("dora", [False, True])
def test_bf16_adapters_train_and_merge(dora):
    """bf16 weights and adapters: a step gives bf16 gradients to every adapter tensor; merged == unmerged to
    bf16 rounding; unmerge restores the unmerged output (to bf16 rounding); disable gives the base exactly."""
    model = lora(llama64(torch.bfloat16), use_dora=dora)
    randomize(model, seed=3, scale=0.01)  # DoRA magnitudes (about 0.16 here) stay positive
    ids = token_ids()
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in trained)
    assert all(torch.isfinite(p.grad).all() for p in trained)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        assert not torch.allclose(unmerged, base, atol=1e-2)  # the adapter changes the output
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        restored = model(input_ids=ids).logits  # W + d - d in bf16: equal to rounding, not bit-exact
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=0.1, rtol=0.05)
    torch.testing.assert_close(restored.float(), unmerged.float(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_bitsandbytes_base_trains_lora(kind):
    """A 4-bit / 8-bit bitsandbytes base: only the adapters train, their gradients are finite, disable gives
    the quantized base exactly, and the loss falls over a few steps on one batch."""
    model = lora(dt.quantize(llama64(), kind))
    assert dt.quant.is_quantized(model.model.model.layers[0].self_attn.q_proj.base_layer)
    ids = token_ids()
    with torch.no_grad():
        base = model.model(input_ids=ids).logits.clone()  # before training, B = 0: adapter output == base
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_mixed_batch_equals_each_adapter_alone():
    """adapter_names per row: row i computes what adapter names[i] gives alone (or the base for __base__)."""
    model = lora(llama64())
    model.add_adapter("b", dt.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))
    randomize(model, seed=4)
    for param in model.parameters():
        param.requires_grad_(False)
    model.eval()
    ids = token_ids(3)
    names = ["default", "b", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[row:row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, atol=1e-5, rtol=1e-4)


def test_inductor_compiled_training_matches_eager():
    """torch.compile with Inductor (Triton on CUDA, C++ on CPU): loss and every adapter gradient equal eager."""
    model = lora(llama64())
    randomize(model, seed=5, scale=0.1)
    eager = copy.deepcopy(model).train()
    compiled = torch.compile(model.train())
    ids = token_ids()
    loss_eager = eager(input_ids=ids, labels=ids).loss
    loss_compiled = compiled(input_ids=ids, labels=ids).loss
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, atol=1e-5, rtol=1e-4)
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-3)


@pytest.fixture(scope="module")
def child_report() -> str:
    return interpreted_report(__file__, "triton")


# bf16 where the kernels compile (CUDA); Triton 3.9's interpreter fails on bf16 tl.dot tiles (a numpy reshape
# error), so a CPU checks float32 only
TRITON_DTYPES = [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_dropout_down_projection_matches_the_reference(dtype, request):
    """lora_ops dispatches a training LoRA layer with dropout to the fused kernel; output and the gradients of
    x, A and B equal lora_reference.lora given the kernel's own mask (keep_mask, from the same seed); two
    layers reading one input in one call draw one mask (call.share_dropout)."""
    if needs_child():
        assert_passed_in_child(request.getfixturevalue("child_report"), __file__, request.node.name)
        return
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, 96, generator=generator).to(DEVICE, dtype).requires_grad_()
    lora_a = (torch.randn(16, 96, generator=generator) * 0.2).to(DEVICE, dtype).requires_grad_()
    lora_b = (torch.randn(40, 16, generator=generator) * 0.2).to(DEVICE, dtype).requires_grad_()
    base_out = torch.randn(3, 50, 40, generator=generator).to(DEVICE, dtype)
    call, dropout = CallContext(), 0.1
    assert lora_ops.linear_path(x, base_out, lora_a, lora_b, False, dropout) == "lora_triton"
    torch.manual_seed(0)
    out = lora_ops.lora_linear(x, base_out, lora_a, lora_b, 2.0, dropout, call)
    sibling = lora_ops.lora_linear(x, base_out, lora_a, lora_b, 2.0, dropout, call)
    torch.testing.assert_close(sibling, out, atol=0, rtol=0)  # the same mask for the same input
    torch.manual_seed(0)
    keep = lora_triton.keep_mask((150, 96), dropout, lora_ops.new_mask_seed(), x.device).view(x.shape)
    assert 0.8 < keep.float().mean() < 0.98
    want = ref.lora(x, base_out, torch.nn.functional.linear, 2.0 * lora_b @ lora_a, keep,
                    lora_ops.keep_probability(dropout))
    weights = torch.linspace(-1, 1, out.numel(), device=DEVICE).view(out.shape)
    got_grads = torch.autograd.grad((out.float() * weights).sum(), (x, lora_a, lora_b))
    want_grads = torch.autograd.grad((want.float() * weights).sum(), (x, lora_a, lora_b))
    limit = 1e-3 if dtype == torch.float32 else 3e-2  # tf32 / bf16 products on a GPU
    for got, expected in zip((out, *got_grads), (want, *want_grads)):
        assert (got.float() - expected.float()).norm() <= limit * expected.float().norm()
