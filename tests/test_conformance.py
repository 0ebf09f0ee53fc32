"""One conformance table: every registered method x tiny model family x base kind through the same checks,
each computed independently of the code under test (../shared/DESIGN.md section 8).

Rows live in tests/conformance_rows.py. Per case: identity at init where promised; with randomized
adapter weights merged == unmerged, double merge a no-op, unmerge restores the base weights, merge_and_unload
keeps the output (or a clear MergeError that changes nothing); disable == base exactly; unload leaves the
base; save/load exact; greedy generate == greedy decoding by repeated forward (decoders); a row's output
independent of its batch's padding; every trainable parameter (adapter-owned only) gets a gradient, with
and without gradient checkpointing; parameter counts by hand, equal on float and quantized bases; the
`peft` package loads our file and we load its file with the same output. Pairs of active mergeable
adapters (any methods, any order) are merged == unmerged too."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import deltatune as dt
from conformance_counts import expected_trainable
from conformance_rows import FAMILIES, FLOAT, PAIRS, ROWS, base_model, build, cases, forward_kwargs, llama64
from deltatune import quant
from deltatune.core.layer import DeltaLayer, ModulesToSave, read_weight
from tiny_models import token_batch
from tiny_vision import image_batch

TOL = 1e-5
QUANT_ERROR = {"nf4": 0.10, "hqq4": 0.10, "int8": 0.01}  # ||dequant(quant(W)) - W|| / ||W|| (test_quant.py)
# quantized forward vs its dequantized weight in float: 4-bit kinds dequantize and matmul in float32 (exact up
# to summation order); LLM.int8 also rounds the activations to int8, about 4e-3 on these logits
FORWARD_ATOL = {"nf4": 1e-4, "hqq4": 1e-4, "int8": 2e-2}
OWNED = (".adapters.", ".copies.", "model_adapters.")
CASES = cases()


def ids_of(case_list) -> list[str]:
    return ["-".join(c) for c in case_list]


def where(predicate) -> list:
    selected = [c for c in CASES if predicate(ROWS[c[0]], FAMILIES[c[1]], c[2])]
    return [pytest.param(*c, id="-".join(c)) for c in selected]


# ---------------------------------------------------------------------- shared helpers
def make_inputs(family: str, batch: int = 3) -> dict:
    name = FAMILIES[family].input_name
    if FAMILIES[family].batch is not None:
        return FAMILIES[family].batch(batch)
    if name != "input_ids":
        return {name: image_batch(batch=batch)}
    ids = token_batch(batch=batch, length=6)
    return {"input_ids": ids, "decoder_input_ids": ids[:, :4]} if family == "t5" else {"input_ids": ids}


def output(model, inputs: dict, row_id: str | None = None) -> torch.Tensor:
    batch = next(iter(inputs.values())).shape[0]
    out = model(**inputs, **(forward_kwargs(row_id, batch) if row_id else {}))
    if isinstance(out, torch.Tensor):
        return out
    for field in ("logits", "sample", "last_hidden_state"):  # LMs, diffusers denoisers, text encoders
        if getattr(out, field, None) is not None:
            return getattr(out, field)
    raise TypeError(f"no output tensor in a {type(out).__name__}")


@torch.no_grad()
def randomize(model, seed: int = 5) -> None:
    """Move every trainable tensor away from its init (B = 0, gates = 0 ...), so a wrong formula shows."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def base_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not any(o in n for o in OWNED)}


def no_wrappers(model) -> bool:
    return not any(isinstance(m, (DeltaLayer, ModulesToSave)) for m in model.modules())


def randomized(row_id: str, family: str, base: str):
    model = build(row_id, family, base).eval()
    randomize(model)
    return model


def assert_changes(adapted: torch.Tensor, base_out: torch.Tensor) -> None:
    if adapted.shape != base_out.shape:  # a causal LM's soft prompt adds logits for the virtual tokens
        adapted = adapted[:, -base_out.shape[1]:]
    assert (adapted - base_out).abs().max() > 1e-4, "the randomized adapter must change the output"


# ---------------------------------------------------------------------- the table itself
def test_every_registered_method_has_a_row():
    covered = {row.peft_type for row in ROWS.values()}
    missing = sorted(set(dt.registered_methods()) - covered)
    assert not missing, f"add a row to tests/conformance_rows.py for {missing}"


@pytest.mark.parametrize("row_id,kind", [(r, k) for r, row in ROWS.items() for k in row.refuses])
def test_refused_base_kind_is_a_clear_error(row_id, kind):
    base = base_model("llama", kind)
    before = str(base)
    with pytest.raises(dt.DeltaConfigError, match="quantized"):
        build(row_id, "llama", kind)
    assert str(base) == before


# ---------------------------------------------------------------------- identity, merge, disable, unload
@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: row.keeps_output))
@torch.no_grad()
def test_identity_at_init(row_id, family, base):
    inputs = make_inputs(family)
    model = build(row_id, family, base).eval()
    expected = output(base_model(family, base), inputs)
    torch.testing.assert_close(output(model, inputs, row_id), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: base == FLOAT))
@torch.no_grad()
def test_merged_equals_unmerged_and_unmerge_restores(row_id, family, base):
    model, inputs = randomized(row_id, family, base), make_inputs(family)
    adapted, weights = output(model, inputs, row_id), base_params(model)
    assert_changes(adapted, output(base_model(family, base), inputs))
    if not ROWS[row_id].mergeable:
        with pytest.raises(dt.MergeError, match="cannot be merged"):
            model.merge_adapter()
        assert all(torch.equal(p, weights[n]) for n, p in base_params(model).items())
        torch.testing.assert_close(output(model, inputs, row_id), adapted, atol=0, rtol=0)
        return
    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs, row_id), adapted, atol=TOL, rtol=TOL)
    model.merge_adapter()  # merging twice is a no-op
    torch.testing.assert_close(output(model, inputs, row_id), adapted, atol=TOL, rtol=TOL)
    model.unmerge_adapter()
    after = base_params(model)
    assert sorted(after) == sorted(weights)
    for name, weight in after.items():
        torch.testing.assert_close(weight, weights[name], atol=1e-6, rtol=1e-6, msg=name)
    torch.testing.assert_close(output(model, inputs, row_id), adapted, atol=TOL, rtol=TOL)
    merged = copy.deepcopy(model).merge_and_unload()
    assert no_wrappers(merged)
    torch.testing.assert_close(output(merged, inputs), adapted, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: base != FLOAT))
@torch.no_grad()
def test_quantized_base_matches_its_float_twin(row_id, family, base):
    """Quantized base + adapter == dequantized float base + the same adapter; a merge requantizes each
    layer to within one quantization step of the float merge, and unmerge comes back near the adapter."""
    model, inputs = randomized(row_id, family, base), make_inputs(family)
    twin = quant.dequantize(copy.deepcopy(model))
    adapted, base_out = output(model, inputs, row_id), output(base_model(family, base), inputs)
    torch.testing.assert_close(adapted, output(twin, inputs, row_id), atol=FORWARD_ATOL[base], rtol=0)
    assert_changes(adapted, base_out)
    if not ROWS[row_id].mergeable:
        with pytest.raises(dt.MergeError, match="cannot be merged"):
            model.merge_adapter()
        return
    quant.merge_errors(clear=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # QuantizedMergeWarning, once per quantization type
        model.merge_adapter()
    writes_quantized = any(isinstance(layer, DeltaLayer) and quant.is_quantized(layer.base_layer)
                           for _, layer in model.delta_layers())  # LN tuning and BitFit on norms do not
    assert bool(quant.merge_errors(clear=True)) == writes_quantized, "a requantizing merge records its error"
    twin.merge_adapter()
    twins = dict(twin.delta_layers())
    for name, layer in model.delta_layers():
        if isinstance(layer, DeltaLayer) and quant.is_quantized(layer.base_layer):
            expected = twins[name].base_layer.weight
            error = (read_weight(layer.base_layer) - expected).norm() / expected.norm()
            assert error < QUANT_ERROR[base], name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.unmerge_adapter()
    assert (output(model, inputs, row_id) - adapted).norm() < (adapted - base_out).norm()


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: True))
@torch.no_grad()
def test_disable_is_base_exactly(row_id, family, base):
    row, model, inputs = ROWS[row_id], randomized(row_id, family, base), make_inputs(family)
    # PiSSA/OLoRA move W's top factors into the adapter: disabled, the model is the residual base
    reference = copy.deepcopy(model).unload() if row.rewrites_base else base_model(family, base)
    expected = output(reference, inputs)
    adapted = output(model, inputs, row_id)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs, row_id), expected, atol=0, rtol=0)
    torch.testing.assert_close(output(model, inputs, row_id), adapted, atol=0, rtol=0)
    if row.mergeable and base == FLOAT:  # merged, then disabled: unmerged inside, merged again after
        model.merge_adapter()
        with model.disable_adapter():
            torch.testing.assert_close(output(model, inputs, row_id), expected, atol=TOL, rtol=TOL)
        torch.testing.assert_close(output(model, inputs, row_id), adapted, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: not row.rewrites_base))
@torch.no_grad()
def test_unload_leaves_the_base(row_id, family, base):
    model, inputs = randomized(row_id, family, base), make_inputs(family)
    reference = base_model(family, base)
    expected = reference.state_dict()
    for merge_first in (False, True) if ROWS[row_id].mergeable and base == FLOAT else (False,):
        wrapped = copy.deepcopy(model)
        if merge_first:
            wrapped.merge_adapter()
        unloaded = wrapped.unload()
        assert no_wrappers(unloaded) and sorted(unloaded.state_dict()) == sorted(expected)
        tolerance = 1e-6 if merge_first else 0
        for name, tensor in unloaded.state_dict().items():
            torch.testing.assert_close(tensor, expected[name], atol=tolerance, rtol=0, msg=name)
        torch.testing.assert_close(output(unloaded, inputs), output(reference, inputs),
                                   atol=TOL * merge_first, rtol=0)


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: True))
@torch.no_grad()
def test_save_load_exact(row_id, family, base, tmp_path):
    row, model, inputs = ROWS[row_id], randomized(row_id, family, base), make_inputs(family)
    adapted = output(model, inputs, row_id)
    model.save_pretrained(str(tmp_path))
    load = row.load or (lambda fresh, directory: dt.DeltaModel.from_pretrained(fresh, directory))
    loaded = load(base_model(family, base), str(tmp_path)).eval()
    torch.testing.assert_close(output(loaded, inputs, row_id), adapted, atol=0, rtol=0)


# ---------------------------------------------------------------------- decoding and padding
def end_token(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: fam.decoder is not None))
@torch.no_grad()
def test_generate_matches_stepwise_greedy_forward(row_id, family, base):
    """Each token greedy `generate` picks is the argmax (up to near-ties) of a full forward over the
    tokens so far, without a cache; a row that produced the end token stops there."""
    model = randomized(row_id, family, base)
    ids = token_batch(batch=2, length=5)
    mask, steps = torch.ones_like(ids), 4
    sequences = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                               pad_token_id=0, **forward_kwargs(row_id, 2))
    seq2seq = FAMILIES[family].decoder == "seq2seq"
    start = 1 if seq2seq else ids.shape[1]  # where the new tokens begin in `sequences`
    assert sequences.shape[1] > start, "generate produced no token"
    stopped = torch.zeros(2, dtype=torch.bool)
    for position in range(start, sequences.shape[1]):
        prefix = sequences[:, :position]
        if seq2seq:
            step = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": prefix}
        else:
            step = {"input_ids": prefix, "attention_mask": torch.ones_like(prefix)}
        logits = output(model, step, row_id)
        chosen = sequences[:, position]
        for row in range(2):
            if stopped[row]:
                continue
            best, picked = logits[row, -1].max(), logits[row, -1, chosen[row]]
            assert picked >= best - 1e-4, (f"row {row}, token {position}: generate picked "
                                           f"{chosen[row].item()} ({picked:.5f}), a forward pass says "
                                           f"{logits[row, -1].argmax().item()}")
            stopped[row] = chosen[row].item() in end_token(model)


PAD = 0  # token_batch draws ids from 1..VOCAB-1


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: fam.text))
@torch.no_grad()
def test_padding_invariance(row_id, family, base):
    """A short row padded to its batch's length (right; left too where positions are relative) gives the
    same outputs at its real tokens as the row alone."""
    model, decoder = randomized(row_id, family, base), FAMILIES[family].decoder
    ids, length = token_batch(batch=2, length=6), 4
    alone_inputs = {"input_ids": ids[1:, :length], "attention_mask": torch.ones(1, length, dtype=torch.long)}
    sides = ["right", "left"] if FAMILIES[family].rope else ["right"]
    for side in sides:
        padded, mask = ids.clone(), torch.ones_like(ids)
        real = slice(0, length) if side == "right" else slice(6 - length, 6)
        padded[1], mask[1] = PAD, 0
        padded[1, real], mask[1, real] = ids[1, :length], 1
        inputs = {"input_ids": padded, "attention_mask": mask}
        extra = {"decoder_input_ids": ids[:, :3]} if decoder == "seq2seq" else {}
        if side == "left":  # positions from the mask, as generate() gives them: prefixes and adaption
            # prompts are keys without a position, so a query's absolute position counts there
            extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        batch_out = output(model, {**inputs, **extra}, row_id)[1:]
        alone = output(model, {**alone_inputs, **{k: v[1:, -length:] if k == "position_ids" else v[1:]
                                                   for k, v in extra.items()}}, row_id)
        if decoder == "causal" or batch_out.dim() == 3:  # per token (a causal LM's logits after any virtual
            # tokens, a text encoder's hidden states): compare the real positions
            batch_out = batch_out[:, -ids.shape[1]:][:, real]
            alone = alone[:, -length:]
        torch.testing.assert_close(batch_out, alone, atol=TOL, rtol=TOL, msg=f"{side} padding")


# ---------------------------------------------------------------------- training
def checkpointing_cases():
    out = []
    for param in where(lambda row, fam, base: True):
        row_id, family, base = param.values
        modes = ["off", "reentrant", "non_reentrant"] if FAMILIES[family].checkpointing else ["off"]
        out += [pytest.param(row_id, family, base, m, id=f"{param.id}-{m}") for m in modes]
    return out


@pytest.mark.parametrize("row_id,family,base,checkpointing", checkpointing_cases())
def test_every_trainable_parameter_gets_a_gradient(row_id, family, base, checkpointing):
    """Only adapter-owned tensors (and the biases a config asks for) train, and each gets a non-zero
    gradient from one backward pass, with gradient checkpointing too (or a clear refusal)."""
    row, model, inputs = ROWS[row_id], randomized(row_id, family, base), make_inputs(family)
    model.train()
    if checkpointing != "off":
        reentrant = checkpointing == "reentrant"
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    biases = {id(p) for a in model.active_adapters for p in model.bias_parameters(a).values()}
    foreign = [n for n, p in trainable.items() if not any(o in n for o in OWNED) and id(p) not in biases]
    assert trainable and not foreign, f"base tensors train: {foreign}"
    if checkpointing != "off" and not row.checkpointing:
        with pytest.raises(dt.DeltaConfigError, match="checkpointing"):
            output(model, inputs, row_id)
        return
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    out = output(model, inputs, row_id)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out.float() * weights).sum().backward()
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reached {missing}"
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers()), "a training pass moved a buffer"


@pytest.mark.parametrize("row_id,family,base", where(lambda row, fam, base: True))
def test_parameter_counts_by_hand(row_id, family, base):
    """Trainable numbers by each method's formula on the base shapes; all numbers = the float base's
    + the adapter's own; a quantized base reports what the same adapter reports on the float base."""
    row, model = ROWS[row_id], build(row_id, family, base)
    float_base = llama64() if base != FLOAT else base_model(family)
    float_model = model if base == FLOAT else build_on(row_id, family, llama64())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected_trainable(row, family, float_base, float_model, model.active_adapter)
    owned = sum(p.numel() for n, p in float_model.named_parameters() if any(o in n for o in OWNED))
    assert total == sum(p.numel() for p in float_base.parameters()) + owned
    if base != FLOAT:
        assert (trainable, total) == float_model.get_nb_trainable_parameters()


def build_on(row_id: str, family: str, float_base) -> dt.DeltaModel:
    row = ROWS[row_id]
    torch.manual_seed(0)
    if row.setup is not None:
        return row.setup(float_base, row.config_kwargs(family))
    return dt.get_peft_model(float_base, row.config(family))


# ---------------------------------------------------------------------- the peft package, both ways
def peft_cases():
    return where(lambda row, fam, base: base == FLOAT and row.peft is not None
                 and any(f is fam for f in (FAMILIES[n] for n in (row.peft_families or row.families))))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("row_id,family,base", peft_cases())
@torch.no_grad()
def test_peft_loads_our_file_and_we_load_its_file(row_id, family, base, tmp_path):
    row, inputs = ROWS[row_id], make_inputs(family)
    ours = randomized(row_id, family, base)
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = peft.PeftModel.from_pretrained(base_model(family), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(output(theirs, inputs), output(ours, inputs), atol=TOL, rtol=TOL)

    torch.manual_seed(0)
    their_config = getattr(peft, row.peft)(**row.config_kwargs(family))
    theirs = peft.get_peft_model(base_model(family), their_config).eval()
    randomize(theirs)
    theirs.save_pretrained(str(tmp_path / "theirs"))
    loaded = dt.DeltaModel.from_pretrained(base_model(family), str(tmp_path / "theirs"))
    expected = output(theirs, inputs)
    assert_changes(expected, output(base_model(family), inputs))
    torch.testing.assert_close(output(loaded, inputs), expected, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------- several active adapters
@pytest.mark.parametrize("first,second", PAIRS, ids=[f"{a}+{b}" for a, b in PAIRS])
@torch.no_grad()
def test_active_pair_merged_equals_unmerged(first, second):
    """Two active mergeable adapters of any methods, in this order: merged == unmerged, unmerge restores
    the base weights, disable gives the base."""
    inputs = make_inputs("llama")
    torch.manual_seed(0)
    model = dt.get_peft_model(base_model("llama"), ROWS[first].config("llama"), adapter_name="first")
    model.add_adapter("second", ROWS[second].config("llama"))
    model.set_adapter(["first", "second"])
    randomize(model)
    model.eval()
    adapted, weights = output(model, inputs), base_params(model)
    base_out = output(base_model("llama"), inputs)
    model.set_adapter("first")
    assert (output(model, inputs) - adapted).abs().max() > 1e-4, "the second adapter must count"
    model.set_adapter(["first", "second"])
    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), adapted, atol=TOL, rtol=TOL)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), base_out, atol=TOL, rtol=TOL)
    model.unmerge_adapter()
    # DoRA divides by m / ||W||, OFT multiplies by the inverse rotation: with random magnitudes the float32
    # rounding of those inverses reaches a few 1e-6 on weights of size 0.06 (a wrong unmerge is off by 1e-2)
    for name, weight in base_params(model).items():
        torch.testing.assert_close(weight, weights[name], atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(output(model, inputs), adapted, atol=TOL, rtol=TOL)
