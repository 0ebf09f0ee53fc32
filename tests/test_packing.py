"""Padding-free packing: rows filled best-fit decreasing, each example keeping its own positions and
attention, so loss and gradients equal those of the examples run one by one (the independent reference),
and a model that would let packed examples see each other is refused before training."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.train.data.packing import check_packing_isolates, pack
from deltatune.train.data.tokenize import IGNORE, Encoded, collate
from deltatune.train.evaluate import token_loss_sum
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

PAD = 0


def examples(lengths, seed: int = 0) -> list[Encoded]:
    """Examples of the given lengths; the first third of each is prompt (not learned)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(1, VOCAB, (n,), generator=generator).tolist()
        out.append(Encoded(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def test_pack_fills_rows_best_fit_and_restarts_positions():
    items = examples([7, 3, 9, 4, 5, 2, 8])
    rows = pack(items, 12)
    assert all(len(r.input_ids) <= 12 for r in rows) and len(rows) == 4  # 38 tokens: 4 rows of 12 at best
    assert sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in items)
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert starts[0] == 0
        for start, end in zip(starts, starts[1:] + [len(row.input_ids)]):
            assert row.position_ids[start:end] == list(range(end - start))
        assert all(row.labels[s] == IGNORE for s in starts[1:])  # nothing predicted across a boundary


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_loss_and_gradients_equal_the_examples_one_by_one(build):
    torch.manual_seed(0)
    model = dt.get_peft_model(build(), dt.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    items = examples([9, 5, 12, 6, 4, 11])
    rows = pack(items, 16)
    assert len(rows) < len(items)

    def loss_and_grads(batches):
        model.zero_grad()
        total = sum(token_loss_sum(model, collate(batch, PAD))[0] for batch in batches)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    packed_loss, packed_grads = loss_and_grads([rows])  # one padded batch of packed rows
    # reference: each example alone, but with the label of its first token dropped as in a packed row
    alone = [Encoded(row.input_ids[s:e], [IGNORE] + row.labels[s + 1:e]) for row in rows
             for s, e in spans(row.position_ids)]
    single_loss, single_grads = loss_and_grads([[example] for example in alone])
    torch.testing.assert_close(packed_loss, single_loss, rtol=1e-5, atol=1e-5)
    for name, grad in single_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-5)


def spans(positions: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(positions) if p == 0]
    return list(zip(starts, starts[1:] + [len(positions)]))


def test_check_passes_for_a_plain_model_and_refuses_soft_prompts():
    model = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    check_packing_isolates(model, examples([10])[0], PAD)
    assert model.training is False  # the model comes back in the mode it was in
    prompted = dt.get_peft_model(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    with pytest.raises(dt.DeltaConfigError, match="data.packing"), pytest.warns(UserWarning, match="position_ids"):
        check_packing_isolates(prompted, examples([10])[0], PAD)
