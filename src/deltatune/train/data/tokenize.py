"""Samples to token ids and labels, with the loss on completion tokens only.

A sample is rendered as text pieces, each marked "learn" or not, and every piece is tokenized on its
own. The prompt therefore tokenizes exactly as it will at generation time (one piece, rendered with
`add_generation_prompt=True`), so training and inference see the same ids.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import DataError
from .formats import Sample

IGNORE = -100
# Used when a tokenizer has no chat template of its own (base models): ChatML as plain text.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None  # set on packed rows: numbering restarts at every example


@dataclass
class EncodeStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0  # no completion token left after truncation
    tokens: int = 0
    target_tokens: int = 0
    examples: list[str] = field(default_factory=list)  # where the first truncated rows came from
    packed_rows: int = 0  # rows after packing (0: not packed)

    def summary(self) -> str:
        text = f"{self.rows} rows, {self.tokens} tokens ({self.target_tokens} trained)"
        if self.truncated:
            text += f"; {self.truncated} truncated to max_length (e.g. {', '.join(self.examples[:3])})"
        if self.dropped:
            text += f"; {self.dropped} dropped (nothing left to learn after truncation)"
        if self.packed_rows:
            text += f"; packed into {self.packed_rows} rows"
        return text


NAMED_TEMPLATES = {"chatml": CHATML}
TEMPLATE_FILE = "chat_template.jinja"  # the name Transformers saves a tokenizer's template under


def resolve_chat_template(value: str) -> str:
    """The Jinja text `data.chat_template` names.

    Args:
        value: a name (`chatml`); Jinja text itself (holds `{{` or `{%`); a template file (`.jinja`,
            `.j2`, any text file); or a model/tokenizer folder, whose `chat_template.jinja` or
            `tokenizer_config.json` "chat_template" is used (to borrow another model's template).

    Raises:
        DataError: the value is none of these, naming `data.chat_template` and what was looked for.
    """
    if value.lower() in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value.lower()]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.is_dir():
        if (path / TEMPLATE_FILE).is_file():
            return (path / TEMPLATE_FILE).read_text(encoding="utf-8")
        config = path / "tokenizer_config.json"
        saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
        template = saved.get("chat_template")
        if isinstance(template, str) and template:
            return template
        raise DataError(f"data.chat_template={value!r}: the folder has no {TEMPLATE_FILE} and its "
                        "tokenizer_config.json no chat_template")
    raise DataError(
        f"data.chat_template={value!r}: not a template name ({sorted(NAMED_TEMPLATES)}), not Jinja text "
        f"and not an existing file or folder (looked for {path.absolute()})"
    )


def apply_chat_template_choice(tokenizer, chat_template: str | None) -> None:
    """Give the tokenizer the chosen template (data.chat_template), or its own, or ChatML."""
    if chat_template:
        tokenizer.chat_template = resolve_chat_template(chat_template)
    ensure_chat_template(tokenizer)


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn("the tokenizer has no chat template; using ChatML as plain text", stacklevel=2)
        tokenizer.chat_template = CHATML


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def pieces(sample: Sample, tokenizer, chat: bool) -> list[tuple[str, bool]]:
    """The sample as (text, learn) pieces; assistant turns (and the text format) are learned."""
    messages = sample.messages
    if messages[0]["role"] == "text":
        return [(messages[0]["content"] + (tokenizer.eos_token or ""), True)]
    if not chat:
        prompt = "".join(m["content"] for m in messages if m["role"] != "assistant")
        return [(prompt, False), (sample.reference + (tokenizer.eos_token or ""), True)]
    out, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError(
                f"{sample.where}: the chat template renders earlier turns differently once later "
                "turns are added, so assistant tokens cannot be located; use data.template=plain"
            )
        out += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    full = _render(tokenizer, messages, generation_prompt=False)
    if len(full) > len(done):
        out.append((full[len(done) :], False))
    return [(text, learn) for text, learn in out if text]


def prompt_text(sample: Sample, tokenizer, chat: bool) -> str:
    """What the model sees before its answer at generation time (everything up to the last turn)."""
    if not chat:
        return "".join(m["content"] for m in sample.messages if m["role"] != "assistant")
    return _render(tokenizer, sample.messages[:-1], generation_prompt=True)


def _bos(tokenizer) -> list[int]:
    """The BOS id when the tokenizer adds one on its own (plain text mode needs it added by hand)."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and probe and probe[0] == bos else []


def encode(
    samples: list[Sample], tokenizer, max_length: int, chat: bool = True, train_on_prompt: bool = False
) -> tuple[list[Encoded], EncodeStats]:
    """Tokenize samples; labels are IGNORE outside learned pieces (unless `train_on_prompt`).

    Rows longer than `max_length` keep their first `max_length` tokens and are counted; a row with
    no learned token left is dropped and counted.
    """
    stats, out = EncodeStats(), []
    bos = [] if chat else _bos(tokenizer)
    for sample in samples:
        ids, labels = list(bos), [IGNORE] * len(bos)
        for text, learn in pieces(sample, tokenizer, chat):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            labels += piece if (learn or train_on_prompt) else [IGNORE] * len(piece)
        stats.rows += 1
        if len(ids) > max_length:
            stats.truncated += 1
            if len(stats.examples) < 3:
                stats.examples.append(sample.where)
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):
            stats.dropped += 1
            continue
        stats.tokens += len(ids)
        stats.target_tokens += sum(label != IGNORE for label in labels[1:])
        out.append(Encoded(ids, labels))
    if not out:
        source = samples[0].where.rsplit(":", 1)[0] if samples else "data"
        raise DataError(
            f"{source}: no usable rows: every row has no answer token within data.max_length={max_length} "
            "(empty, or cut off); expected rows whose answer starts within max_length tokens"
        )
    return out, stats


def collate(examples: list[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-pad a batch to (B, T), on `device`: input_ids, labels (IGNORE on padding) and either
    attention_mask or, when a row is packed, position_ids.

    Packed batches carry no attention mask: Transformers then reads sequence boundaries from the
    position ids (a new sequence wherever the numbering does not go up by one) and lets each token
    attend only within its own example. The padding tail is numbered 0, 1, ... as a sequence of its own,
    so no real token attends to it.
    """
    width = max(len(e.input_ids) for e in examples)
    packed = any(e.position_ids is not None for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    positions = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
        positions[row, :n] = torch.tensor(example.position_ids or range(n))
        positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels}
    batch.update({"position_ids": positions} if packed else {"attention_mask": mask})
    return {key: value.to(device) for key, value in batch.items()}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """What the model takes from a collated batch: everything but the labels; for a packed batch also
    use_cache=False (Transformers only reads sequence boundaries from position ids without a cache)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if "position_ids" in inputs and "attention_mask" not in inputs:
        inputs["use_cache"] = False
    return inputs


def target_count(example: Encoded) -> int:
    """Tokens this example contributes to the loss (labels are shifted by one)."""
    return sum(label != IGNORE for label in example.labels[1:])


def encode_classes(
    samples: list[Sample], tokenizer, max_length: int, label_ids: dict[str, int]
) -> tuple[list[Encoded], EncodeStats]:
    """Tokenize {text, label} samples for a sequence classifier (model.task=sequence_classification).

    The text is tokenized with the tokenizer's own special tokens ([CLS] ... [SEP] for BERT). The class id
    sits at the last position of an otherwise IGNORE label row, so collate, the sample order and the
    loop's target count (one per example) work unchanged; `evaluate.token_loss_sum` reads it back.

    Raises:
        DataError: a row that is not {text, label}, or a label the training file does not have.
    """
    stats, out = EncodeStats(), []
    for sample in samples:
        if sample.kind != "classification":
            raise DataError(
                f"{sample.where}: model.task=sequence_classification needs {{text, label}} rows "
                f"(data.format: classification), not {sample.kind}"
            )
        label = sample.reference
        if label not in label_ids:
            raise DataError(f"{sample.where}: label {label!r} is not among the training labels {list(label_ids)}")
        ids = tokenizer(sample.messages[0]["content"], add_special_tokens=True)["input_ids"]
        stats.rows += 1
        if len(ids) > max_length:
            stats.truncated += 1
            if len(stats.examples) < 3:
                stats.examples.append(sample.where)
            ids = ids[:max_length]
        ids = ids if len(ids) >= 2 else ids + [tokenizer.pad_token_id]  # target_count skips position 0
        stats.tokens += len(ids)
        stats.target_tokens += 1
        out.append(Encoded(ids, [IGNORE] * (len(ids) - 1) + [label_ids[label]]))
    return out, stats
