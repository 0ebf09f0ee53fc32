"""Every fast LoRA/DoRA kernel against the plain-torch reference (methods/lora_reference.py).

Each name in lora_reference.FAST_PATHS has a case here (a new fast path fails
test_every_fast_path_has_a_case until it is listed); each case checks that the dispatch really takes that path,
then compares outputs and gradients (x, A, B, magnitude) with the reference, with dropout off and on (the
reference gets the very mask the kernel drew, rebuilt from the same seed), in float32 and under bfloat16
autocast. Dropout-mask sharing between sibling layers (call.share_dropout) and the checkpointing recompute
are checked at the end.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.core.base import BaseLayer
from deltatune.core.call import CallContext
from deltatune.methods import dora as dora_ops
from deltatune.methods import lora_ops, lora_triton
from deltatune.methods import lora_reference as ref
from deltatune.methods.lora import LoraAdapter
from interpreted import assert_passed_in_child, interpreted_report, needs_child
from tiny_models import tiny_llama, token_batch

SEED = 7


def base_module(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return {"linear": lambda: nn.Linear(8, 10), "conv1d": lambda: Conv1D(10, 8),
            "conv": lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1),
            "conv_reflect": lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),  # diffusers' VAEs
            "embedding": lambda: nn.Embedding(12, 6)}[kind]().requires_grad_(False)


def make_adapter(base: BaseLayer, dora: bool, p: float) -> LoraAdapter:
    torch.manual_seed(1)
    adapter = LoraAdapter(base, 3, 1.5, p, dora, False, False, "layer").train()
    if dora:  # m away from ||W||_c, so the rescale does something
        with torch.no_grad():
            adapter.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(adapter.lora_magnitude_vector))
    return adapter


def make_input(kind: str) -> torch.Tensor:
    torch.manual_seed(2)
    if kind == "embedding":
        return torch.randint(0, 12, (2, 5))
    image = kind in ("conv", "conv_reflect")
    return (torch.randn(2, 3, 9, 9) if image else torch.randn(2, 4, 8)).requires_grad_()


def op_and_weight(base: BaseLayer, kind: str):
    """The reference's op (the base op without bias on an out-first weight) and the out-first W."""
    module = base.module
    if kind == "conv":
        return (lambda x, w: F.conv2d(x, w, None, module.stride, module.padding, module.dilation)), module.weight
    if kind == "conv_reflect":  # the input padded by reflection first, then convolved without padding
        return (lambda x, w: F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), w)), module.weight
    if kind == "embedding":
        return (lambda ids, w: F.embedding(ids, w.T)), module.weight.T
    return (lambda x, w: F.linear(x, w)), base.to_out_first(module.weight)


def delta_of(adapter: LoraAdapter) -> torch.Tensor:
    """s B A out-first, from the factors (differentiable)."""
    a, b = adapter.A, adapter.B
    r = a.shape[0]
    return (adapter.scaling * b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:])


def seeded_keep(x: torch.Tensor, p: float, triton: bool = False) -> tuple[torch.Tensor | None, float]:
    """The mask a seed-drawing kernel (lora_ops, or lora_triton's in-kernel draw) drew for x right after
    torch.manual_seed(SEED)."""
    if p == 0:
        return None, 1.0
    torch.manual_seed(SEED)
    flat = (x.shape[:-1].numel(), x.shape[-1])
    if triton:
        keep = lora_triton.keep_mask(flat, p, lora_ops.new_mask_seed(), x.device)
        return keep.view(x.shape), lora_ops.keep_probability(p)
    keep = lora_ops.draw_keep_mask(torch.Size(flat), p, x.device, lora_ops.new_mask_seed())
    return keep.view(x.shape), lora_ops.keep_probability(p)


def module_keep(x: torch.Tensor, p: float) -> tuple[torch.Tensor | None, float]:
    """The mask nn.Dropout drew for x on the module path right after torch.manual_seed(SEED)."""
    if p == 0 or not x.is_floating_point():
        return None, 1.0
    torch.manual_seed(SEED)
    return (F.dropout(torch.ones_like(x), p) != 0), 1 - p


DTYPES = {"float32": torch.float32, "bf16": torch.float32, "bf16_model": torch.bfloat16}


def autocast(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()


def layer_case(path: str, kind: str, p: float, mode: str):
    """(fast output, fast grads, reference output, reference grads, the path the dispatch took)."""
    dora = path.startswith("dora")
    grad = "no_grad" not in path
    base = BaseLayer(base_module(kind).to(DTYPES[mode]))
    adapter = make_adapter(base, dora, p)
    x = make_input(kind)
    x = x.detach().to(DTYPES[mode]).requires_grad_() if x.is_floating_point() else x
    leaves = [t for t in (x, adapter.A, adapter.B) if t.requires_grad]
    if dora:
        leaves.append(adapter.lora_magnitude_vector)
    owns = path.endswith("in_place")

    def run(fast: bool):
        with torch.set_grad_enabled(grad), autocast(mode):
            base_out = base(x)
            if fast:
                torch.manual_seed(SEED)
                taken = adapter.path(base)
                if taken == "linear":
                    a, b = adapter.A.to(x.dtype), adapter.B.to(x.dtype)
                    taken = lora_ops.linear_path(x, base_out, a, b, owns, p)
                elif taken == "dora_linear":
                    taken = dora_ops.linear_path(x, base_out, adapter.A, adapter.B, adapter.lora_magnitude_vector, p)
                else:
                    taken = ("dora" if dora else "lora") + "_module"
                torch.manual_seed(SEED)
                return adapter(x, base_out, base, CallContext(), owns_base_out=owns), taken
        keep, p_keep = module_keep(x, p) if path.endswith("module") else seeded_keep(x, p, path == "lora_triton")
        op, weight = op_and_weight(base, kind)
        if dora:
            magnitude = adapter.lora_magnitude_vector
            return ref.dora(x, base_out, op, weight, delta_of(adapter), magnitude, keep, p_keep,
                            1 if kind in ("conv", "conv_reflect") else -1), path
        return ref.lora(x, base_out, op, delta_of(adapter), keep, p_keep), path

    results = []
    for fast in (True, False):
        out, taken = run(fast)
        grads = []
        if grad:
            weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
            grads = torch.autograd.grad((out.float() * weights).sum(), leaves)
        results += [out, grads]
    return (*results, taken)


def mixed_case(path: str, p: float, mode: str):
    bases = BaseLayer(base_module("linear"))
    adapters = [make_adapter(bases, False, 0.0) for _ in range(3)]
    for i, adapter in enumerate(adapters):
        with torch.no_grad():
            adapter.lora_B.weight.mul_(i + 1)
    adapters[1] = None  # an empty slot: a name this layer has no adapter for
    torch.manual_seed(3)
    tokens = 1 if path == "mixed_dense" else 12
    x = torch.randn(5, tokens, 8, requires_grad=True)
    index = torch.tensor([0, -1, 2, 2, 0])
    leaves = [x] + [t for a in adapters if a is not None for t in (a.A, a.B)]
    results = []
    for fast in (True, False):
        with autocast(mode):
            base_out = bases(x)
            if fast:
                taken = lora_ops.mixed_path(x, len(adapters))
                out = LoraAdapter.mixed_forward(adapters, x, base_out, bases, index, CallContext())
            else:
                deltas = [None if a is None else delta_of(a) for a in adapters]
                out = ref.mixed_lora(x, base_out.float(), index, lambda v, w: F.linear(v, w), deltas)
        weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
        results += [out, torch.autograd.grad((out.float() * weights).sum(), leaves)]
    return (*results, taken)


# path -> the base kinds it serves; dropout values it runs with
CASES = {
    "lora_autograd": (("linear", "conv1d"), (0.0, 0.3)),
    "lora_autograd_in_place": (("linear",), (0.0, 0.3)),  # not under autocast: a bfloat16 model instead
    "lora_no_grad": (("linear", "conv1d"), (0.0, 0.3)),
    "lora_triton": (("linear", "conv1d"), (0.3,)),  # dropout only; on CPU through TRITON_INTERPRET=1
    "lora_no_grad_in_place": (("linear",), (0.0, 0.3)),
    "lora_module": (("conv", "conv_reflect", "embedding"), (0.0, 0.3)),
    "mixed_gather": (("linear",), (0.0,)),  # mixed batches run only without training dropout
    "mixed_dense": (("linear",), (0.0,)),
    "dora_autograd": (("linear",), (0.0, 0.3)),
    "dora_no_grad": (("linear",), (0.0,)),  # with dropout the autograd function runs
    "dora_module": (("conv1d", "conv", "conv_reflect", "embedding"), (0.0, 0.3)),
}
PARAMS = [(path, kind, p, mode) for path, (kinds, ps) in CASES.items() for kind in kinds for p in ps
          for mode in ("float32", "bf16_model" if path.endswith("in_place") else "bf16")
          if not (kind == "embedding" and p > 0)]


def test_every_fast_path_has_a_case():
    assert set(CASES) == set(ref.FAST_PATHS)


def assert_near(got: torch.Tensor, want: torch.Tensor, mode: str) -> None:
    """Relative error of the whole tensor: float32 sums in another order, or bfloat16 rounding."""
    got, want = got.float(), want.float()
    limit = 1e-5 if mode == "float32" else 5e-2  # a wrong mask or formula: > 0.2
    assert got.shape == want.shape
    assert (got - want).norm() <= limit * want.norm() + 1e-6, (got - want).abs().max()


@pytest.fixture(scope="module")
def interpreted_triton_cases() -> str:
    """The lora_triton cases, run once on CPU through Triton's interpreter in a child pytest (interpreted.py)."""
    return interpreted_report(__file__, "test_fast_path_equals_the_reference and lora_triton")


@pytest.mark.parametrize("path, kind, p, mode", PARAMS)
def test_fast_path_equals_the_reference(path, kind, p, mode, request):
    if path == "lora_triton" and needs_child(cpu_tensors=True):  # on a GPU too: these tensors are on the CPU
        assert_passed_in_child(request.getfixturevalue("interpreted_triton_cases"), __file__, request.node.name)
        return
    case = mixed_case(path, p, mode) if path.startswith("mixed") else layer_case(path, kind, p, mode)
    out, grads, ref_out, ref_grads, taken = case
    assert taken == path
    assert_near(out, ref_out, mode)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
        assert_near(got, want, mode)


def test_in_place_paths_add_into_the_handed_base_output():
    base = BaseLayer(base_module("linear"))
    adapter = make_adapter(base, False, 0.0).eval()
    x = torch.randn(2, 4, 8)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            base_out = base(x.requires_grad_(grad))
            assert adapter(x, base_out, base, CallContext(), owns_base_out=True) is base_out
            kept = base(x)
            assert adapter(x, kept, base, CallContext()) is not kept


# ------------------------------------------------------------------ sibling masks: the switch
@pytest.mark.parametrize("share", [True, False])
def test_sibling_layers_share_one_mask_only_when_the_call_says_so(share):
    """q and k read one input: one mask with share_dropout, two independent draws without; both equal the
    reference with those masks, outputs and gradients."""
    bases = [BaseLayer(base_module("linear")) for _ in range(2)]
    adapters = [make_adapter(b, False, 0.4) for b in bases]
    with torch.no_grad():
        adapters[1].lora_A.weight.mul_(-2)
    x = torch.randn(3, 5, 8, requires_grad=True)
    leaves = [x] + [t for a in adapters for t in (a.A, a.B)]
    call = CallContext(share_dropout=share)
    torch.manual_seed(SEED)
    outs = [a(x, b(x), b, call) for a, b in zip(adapters, bases)]
    got = torch.autograd.grad(sum((o * o).sum() for o in outs), leaves)
    torch.manual_seed(SEED)
    seeds = [lora_ops.new_mask_seed()]
    seeds.append(seeds[0] if share else lora_ops.new_mask_seed())
    keeps = [lora_ops.draw_keep_mask(torch.Size([15, 8]), 0.4, x.device, s).view(x.shape) for s in seeds]
    assert torch.equal(keeps[0], keeps[1]) == share
    p_keep = lora_ops.keep_probability(0.4)
    wants = [ref.lora(x, b(x), lambda v, w: F.linear(v, w), delta_of(a), k, p_keep)
             for a, b, k in zip(adapters, bases, keeps)]
    want = torch.autograd.grad(sum((o * o).sum() for o in wants), leaves)
    for o, w in zip(outs, wants):
        assert_near(o, w, "float32")
    for g, w in zip(got, want):
        assert_near(g, w, "float32")


@pytest.mark.parametrize("share, draws", [(True, 4), (False, 7)])
def test_model_switch_reaches_every_layer(share, draws, monkeypatch):
    """DeltaModel.share_dropout_masks: per decoder block, q/k/v share one draw and gate/up another (4 draws:
    qkv, o, gate/up, down), or every one of the 7 layers draws its own."""
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, lora_dropout=0.1, target_modules="all-linear"))
    model.train()
    model.share_dropout_masks = share
    seeds = []
    real = lora_ops.new_mask_seed
    monkeypatch.setattr(lora_ops, "new_mask_seed", lambda: seeds.append(real()) or seeds[-1])
    ids = token_batch(2, 6)
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(seeds) == draws * 2  # 2 blocks


# ------------------------------------------------------------------ checkpointing recompute
@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_recompute_gives_the_same_gradients(dora, share, reentrant):
    """A checkpointed block's recompute draws the same masks (torch replays the RNG; the call's memo is the
    one the block ran with), so every adapter gradient equals the uncheckpointed one."""
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        config = dt.LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False,
                               use_dora=dora)
        model = dt.get_peft_model(tiny_llama(), config).train()
        model.share_dropout_masks = share
        if checkpointed:
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": reentrant})
        ids = token_batch(2, 6)
        torch.manual_seed(1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0] and all(g is not None for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the call's memo
@torch.no_grad()
def test_generate_stacks_each_layers_factors_once_for_all_decode_steps(monkeypatch):
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    model.add_adapter("other", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    builds, memos = [], set()
    real = lora_ops.stacked_factors

    def spy(factors, memo, key, dense):
        memos.add(None if memo is None else id(memo))
        if memo is not None and key not in memo:
            builds.append(key)
        return real(factors, memo, key, dense)

    monkeypatch.setattr(lora_ops, "stacked_factors", spy)
    ids = token_batch(2, 4)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                   adapter_names=["default", "other"])
    assert len(memos) == 1  # one call: prefill and every decode step
    assert len(builds) == len(set(builds)) == 4  # 2 blocks x (q_proj, v_proj), stacked once each
    memos.clear()
    first = model(ids, adapter_names=["default", "other"]).logits
    assert memos == {None}  # a single forward keeps no stacks: each layer uses its own once
    layer = dict(model.delta_layers())["model.layers.0.self_attn.q_proj"]
    layer.adapters["other"].lora_B.weight.mul_(3)  # in place between calls: the next call stacks again
    assert not torch.allclose(model(ids, adapter_names=["default", "other"]).logits, first)
