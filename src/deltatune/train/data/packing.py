"""Padding-free packing: whole examples share a row, each with its own position ids and attention.

`pack` fills rows of up to `max_length` tokens best-fit-decreasing (the longest example first, each into
the row it fills most tightly), so rows are nearly full and a batch carries little padding. Every
example keeps position ids 0..n-1 and attends only to itself: `collate` passes position ids and no
attention mask, and Transformers' mask builder starts a new block-diagonal sequence wherever the
numbering restarts. The first token of each later example is not a target (it would be predicted from
the previous example). The numbers are therefore those of training on the examples one by one.

`check_packing_isolates` runs one tiny forward before training to prove the model does keep packed
examples apart (models, attention implementations or soft-prompt methods that ignore position ids
would silently let examples attend to each other).
"""

from __future__ import annotations

import bisect

import torch

from ...core.config import DeltaConfigError
from .tokenize import IGNORE, Encoded, collate, model_inputs

PROBE_TOKENS = 4  # length of each of the two probe examples in check_packing_isolates


def pack(examples: list[Encoded], max_length: int) -> list[Encoded]:
    """Join whole examples into rows of at most `max_length` tokens (none is split), best-fit decreasing."""
    rows: list[list[Encoded]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted
    for example in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(example.input_ids)
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([])
            space, index = max_length, len(rows) - 1
        else:
            space, index = free.pop(at)
        rows[index].append(example)
        bisect.insort(free, (space - n, index))
    return [join(row) for row in rows]


def join(examples: list[Encoded]) -> Encoded:
    """One packed row: ids and labels concatenated, positions restarting at each example."""
    ids, labels, positions = [], [], []
    for example in examples:
        first_label = example.labels[0] if not ids else IGNORE  # not predicted across the boundary
        ids += example.input_ids
        labels += [first_label] + example.labels[1:]
        positions += range(len(example.input_ids))
    return Encoded(ids, labels, positions)


@torch.no_grad()
def check_packing_isolates(model, example: Encoded, pad_id: int, device: torch.device | str = "cpu") -> None:
    """Raise DeltaConfigError unless an example packed after another gives the same outputs as alone."""
    ids = (example.input_ids * (2 * PROBE_TOKENS))[: 2 * PROBE_TOKENS]
    first, second = (Encoded(part, part) for part in (ids[:PROBE_TOKENS], ids[PROBE_TOKENS:]))
    was_training = model.training
    model.eval()
    try:
        alone, packed = (model(**model_inputs(collate([join(row)], pad_id, device))).logits[0, -PROBE_TOKENS:]
                         for row in ([second], [first, second]))
    finally:
        model.train(was_training)
    if not torch.allclose(packed.float(), alone.float(), rtol=1e-3, atol=1e-3 * float(alone.abs().max())):
        raise DeltaConfigError(
            f"data.packing=true: {type(getattr(model, 'model', model)).__name__} lets packed examples attend "
            "to each other (it does not read sequence boundaries from position_ids: an older Transformers, "
            "an attention implementation without packed-sequence support, or a soft-prompt method); "
            "set data.packing=false"
        )
