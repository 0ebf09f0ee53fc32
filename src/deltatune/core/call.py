"""Per-call state: what one forward or generate call of a DeltaModel tells every adapted layer.

`DeltaModel.forward` / `generate` build one immutable `CallContext` per call and enter it into the model's
`CallSlot`, which every wrapper of that model holds; a wrapper reads the slot once per forward and passes
the context to each adapter as an argument (`adapter(x, base_out, base, call)`). Nothing travels through
thread-locals, module globals or private tensor attributes. A checkpointed block's recompute in backward
runs after the call returned: it enters the context it saved (core/checkpointing.py), so it sees the same
routing and the same per-call memo.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class CallContext:
    """One call's routing and per-call memo.

    Attributes:
        adapter_names: the distinct adapters of a mixed batch, in slot order (empty: no mixed batch).
        adapter_index: (batch,) int64 slot into `adapter_names` per input row, -1 = the base model; None when
            the call routes every row through the active adapters.
        task_ids: (batch,) task id per input row, for task-conditioned methods (ULoRA); None if not given.
        expand: how many times generate() repeats each input row (beams, num_return_sequences).
        disabled: adapters are switched off (the call runs inside `DeltaModel.disable_adapter()`).
        repeated: the call runs the model several times on the same adapters (generate's decode steps), so a
            kernel may keep per-layer work in `memo` for the next step; a single forward keeps nothing.
        share_dropout: sibling layers that read the same input tensor (q/k/v, gate/up) share one dropout
            mask, as one dropout before a fused projection would (faster on a CPU); False draws an
            independent mask per layer, as `peft` does.
        memo: kernels' work shared between the layers of this one call (the sibling dropout mask, stacked
            mixed-batch factors); it lives as long as the call and the autograd graph that saved it.
    """

    adapter_names: tuple[str, ...] = ()
    adapter_index: torch.Tensor | None = None
    task_ids: torch.Tensor | None = None
    expand: int = 1
    disabled: bool = False
    repeated: bool = False
    share_dropout: bool = True
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def mixed(self) -> bool:
        """Whether rows go to different adapters (`adapter_names=` was given)."""
        return self.adapter_index is not None

    def per_sample(self, values: torch.Tensor, batch: int, what: str) -> torch.Tensor:
        """`values` (one per input row) for a layer that sees `batch` rows: the input rows themselves, or,
        inside generate(), each row repeated `expand` times in place (transformers' repeat_interleave; an
        encoder-decoder's encoder still sees the input rows). Any other count is an error: a shorter list is
        never stretched over the batch.

        Raises:
            ValueError: naming both lengths.
        """
        if batch == values.shape[0]:
            return values
        if batch == values.shape[0] * self.expand:
            return values.repeat_interleave(self.expand)
        repeated = f" (generate repeats each input row {self.expand} times)" if self.expand > 1 else ""
        raise ValueError(f"{what} has {values.shape[0]} entries but the batch has {batch} rows{repeated}; "
                         "give exactly one per input row")

    def index_for(self, batch: int) -> torch.Tensor:
        """The per-row adapter slots (batch,) for a layer that sees `batch` rows."""
        return self.per_sample(self.adapter_index, batch, "adapter_names")

    def rows(self, rows: torch.Tensor, batch: int) -> CallContext:
        """The context for some rows of a `batch`-row input, run through one adapter on their own: their task
        ids, no mixed routing, the same dropout choice and memo."""
        task_ids = None if self.task_ids is None else self.per_sample(self.task_ids, batch, "task_ids")[rows]
        return replace(self, adapter_names=(), adapter_index=None, task_ids=task_ids, expand=1)


class CallSlot:
    """Where a model's wrappers find the current call's context. One per DeltaModel; it also keeps the model's
    settings each new call copies: whether adapters are switched off (inside `DeltaModel.disable_adapter()`)
    and the dropout-mask choice. A wrapper called outside any model call sees a fresh, un-routed context each
    time (so sibling layers share no dropout mask there)."""

    def __init__(self) -> None:
        self._current: CallContext | None = None
        self.disabled = False
        self.share_dropout = True  # the model's choice, copied into each call's context

    @property
    def current(self) -> CallContext:
        return self._current if self._current is not None else self.new_call()

    def new_call(self, **routing) -> CallContext:
        """A fresh context for one call, with this model's dropout choice and whether adapters are off."""
        return CallContext(disabled=self.disabled, share_dropout=self.share_dropout, **routing)

    @contextlib.contextmanager
    def entered(self, call: CallContext):
        """Make `call` current inside the block (nested: the outer one comes back after)."""
        outer, self._current = self._current, call
        try:
            yield call
        finally:
            self._current = outer
