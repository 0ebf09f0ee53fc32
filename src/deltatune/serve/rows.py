"""Per-row control inside one batched `generate` call: each row's max_tokens, stop strings and sampling.

Transformers' `generate` takes one set of decoding settings for the whole batch. The server's rows each
bring their own, so one `RowControl` per batch plugs into the same `generate` call twice:

- as a logits processor: a row with temperature > 0 draws its next token from its own `torch.Generator`
  (seeded by the request) and leaves only that token in its scores, so `generate`'s greedy argmax picks it.
  A greedy row's scores are left alone, so its tokens are exactly those of `deltatune generate`. A row's
  draws never depend on its batch mates: one draw per step from its own generator while it runs.
- as a stopping criterion: called once per step with the grown `input_ids`, it reads each row's new token
  (the last column), decides whether the row is done (EOS, a stop string, its max_tokens, its client gone)
  and hands the row's text to the row's `emit` as it grows; `generate` then pads the finished row.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, StoppingCriteria


@dataclass
class RowSpec:
    """What one row asks for. `emit(kind, value)` gets ("delta", text) as the answer grows and ("done",
    RowResult) once; it is called on the engine's worker thread."""

    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    emit: Callable[[str, object], None] = lambda kind, value: None
    cancelled: Callable[[], bool] = lambda: False


@dataclass
class RowResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens), "cancelled" (client gone)
    completion_tokens: int


@dataclass
class _Row:
    spec: RowSpec
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text already emitted
    result: RowResult | None = None
    generator: torch.Generator | None = None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back while streaming: a partial UTF-8 character (decoded as
    U+FFFD), or the longest tail that could still grow into a stop string (which is never sent)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return hold


class RowControl:
    """The per-row state of one batch; `processor` and `criteria` go to `model.generate`."""

    def __init__(self, specs: list[RowSpec], tokenizer, eos_token_id: int | None) -> None:
        self.rows = [_Row(spec) for spec in specs]
        self.tokenizer, self.eos = tokenizer, eos_token_id
        self.processor, self.criteria = _Sampler(self), _Stopper(self)

    def text(self, row: _Row) -> str:
        return self.tokenizer.decode(row.tokens, skip_special_tokens=True)

    def sample(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (batch, vocab): a sampling row keeps only its drawn token."""
        for i, row in enumerate(self.rows):
            spec = row.spec
            if row.result is not None or spec.temperature <= 0:
                continue
            if row.generator is None:  # no seed: a fresh random one, so unseeded rows still differ
                seed = spec.seed if spec.seed is not None else secrets.randbits(63)
                row.generator = torch.Generator(scores.device).manual_seed(seed)
            logits = scores[i].float() / spec.temperature  # (vocab,)
            ordered, order = torch.sort(logits, descending=True)
            probs = ordered.softmax(-1)
            # nucleus: keep the most likely tokens until their mass reaches top_p (the first always stays)
            ordered[(probs.cumsum(-1) - probs) > spec.top_p] = float("-inf")
            token = order[torch.multinomial(ordered.softmax(-1), 1, generator=row.generator)]
            scores[i] = float("-inf")
            scores[i, token] = 0.0
        return scores

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (batch, length), the last column new: (batch,) bool, True where a row is done."""
        new = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, new):
            if row.result is not None:
                continue
            if row.spec.cancelled():
                self._finish(row, self.text(row), "cancelled")
                continue
            if token == self.eos:
                self._finish(row, self.text(row), "stop")
                continue
            row.tokens.append(token)
            text = self.text(row)
            cut = min((i for i in (text.find(s) for s in row.spec.stop) if i >= 0), default=-1)
            if cut >= 0:
                self._finish(row, text[:cut], "stop")
            elif len(row.tokens) >= row.spec.max_tokens:
                self._finish(row, text, "length")
            else:
                visible = text[: len(text) - _held_back(text, row.spec.stop)]
                if len(visible) > row.sent:
                    row.spec.emit("delta", visible[row.sent :])
                    row.sent = len(visible)
        return torch.tensor([row.result is not None for row in self.rows], device=input_ids.device)

    def finish_all(self, reason: str = "length") -> None:
        """Close the rows `generate` left open (its own limits ended the call first)."""
        for row in self.rows:
            if row.result is None:
                self._finish(row, self.text(row), reason)

    def fail_open(self, error: BaseException) -> list[RowSpec]:
        """The specs of rows not finished yet, each marked done (the call raised `error`)."""
        open_rows = [row for row in self.rows if row.result is None]
        for row in open_rows:
            row.result = RowResult("", "error", len(row.tokens))
        return [row.spec for row in open_rows]

    def _finish(self, row: _Row, text: str, reason: str) -> None:
        row.result = RowResult(text, reason, len(row.tokens))
        if reason == "cancelled":
            return
        if len(text) > row.sent:  # whatever was held back, up to a stop string
            row.spec.emit("delta", text[row.sent :])
            row.sent = len(text)
        row.spec.emit("done", row.result)


class _Sampler(LogitsProcessor):
    def __init__(self, control: RowControl) -> None:
        self.control = control

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.control.sample(scores)


class _Stopper(StoppingCriteria):
    def __init__(self, control: RowControl) -> None:
        self.control = control

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return self.control.step(input_ids)
