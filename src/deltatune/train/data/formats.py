"""Data formats: each row becomes a list of chat messages, whatever shape it came in.

    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                       (ShareGPT's {"conversations": [{"from": "human", "value": ...}]} too)
    prompt_completion  {"prompt": ..., "completion": ...}
    alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
    classification     {"text": ..., "label": ...}   the label is the completion; scored by accuracy
    text               {"text": ...}                  plain language modelling, loss on every token

Columns named otherwise are renamed first by `data.columns` (map_columns): `{prompt: question,
completion: answer}`, `{messages: conversation, role: from, content: text}` (keys inside each message).

With `template: plain` the prompt and completion are joined as text (no chat template), the way
`prompt_completion` data is usually meant; the alpaca format then uses the Alpaca prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .files import DataError, Row

FORMATS = ("messages", "prompt_completion", "alpaca", "text", "classification")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
}
# the names data.columns may map onto: every field a format reads, and the keys inside a message
COLUMN_KEYS = ("messages", "conversations", "prompt", "completion", "instruction", "input", "output", "text",
               "label", "role", "content")
MESSAGE_KEYS = ("role", "content")
ALPACA_HEADER = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


@dataclass
class Sample:
    """One training example as chat messages (role "text" for plain language modelling)."""

    messages: list[dict]
    where: str
    kind: str

    @property
    def reference(self) -> str | None:
        """The expected answer (the last assistant turn), or None for plain text."""
        last = self.messages[-1]
        return last["content"] if last["role"] == "assistant" else None


def detect_format(row: Row) -> str:
    """The format a row's keys imply; an error listing the formats when none fits."""
    keys = set(row.data)
    if "messages" in keys or "conversations" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"text", "label"} <= keys:
        return "classification"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{row.where}: cannot tell the data format from keys {sorted(keys)}; expected "
        "messages, prompt+completion, instruction+output (alpaca), text+label or text"
    )


def map_columns(rows: list[Row], columns: dict[str, str] | None) -> list[Row]:
    """Rows with their columns renamed to the names the formats read (`data.columns`).

    Args:
        rows: rows as read from the files.
        columns: {our name: the data's column}, e.g. {"prompt": "question", "completion": "answer"};
            `role`/`content` rename the keys inside each message of a messages column.

    Raises:
        DataError: a row lacks a mapped column (naming the row, the `data.columns` key and the row's
            columns); an optional column (`input`) may be absent.
    """
    if not columns:
        return rows
    fields = {ours: theirs for ours, theirs in columns.items() if ours not in MESSAGE_KEYS}
    inner = {ours: theirs for ours, theirs in columns.items() if ours in MESSAGE_KEYS}
    out = []
    for row in rows:
        data = {key: value for key, value in row.data.items() if key not in fields.values()}
        for ours, theirs in fields.items():
            if theirs in row.data:
                data[ours] = row.data[theirs]
            elif ours != "input":
                raise DataError(
                    f"{row.where}: data.columns.{ours}={theirs!r}, but the row has no column {theirs!r} "
                    f"(it has {sorted(row.data)})"
                )
        if inner:
            for name in ("messages", "conversations"):
                if isinstance(data.get(name), list):
                    data[name] = [_rename_message(m, inner) for m in data[name]]
        out.append(Row(data, row.file, row.line, row.unit))
    return out


def _rename_message(message, inner: dict[str, str]):
    if not isinstance(message, dict):
        return message  # _messages names the row and the item
    renamed = {key: value for key, value in message.items() if key not in inner.values()}
    renamed.update({ours: message[theirs] for ours, theirs in inner.items() if theirs in message})
    return renamed


def _field(row: Row, name: str, optional: bool = False, kinds: tuple = (str,)):
    if name not in row.data or row.data[name] is None:
        if optional:
            return None
        raise DataError(f"{row.where}: missing field {name!r} (row has {sorted(row.data)})")
    value = row.data[name]
    if not isinstance(value, kinds) or isinstance(value, bool):
        wanted = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{row.where}: field {name!r} must be {wanted}, got {type(value).__name__}")
    return value


def _messages(row: Row, items, name: str) -> list[dict]:
    if not isinstance(items, list) or not items:
        raise DataError(f"{row.where}: field {name!r} must be a non-empty list of messages")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{row.where}: {name}[{i}] must be an object with role and content")
        if "from" in item and "role" not in item:  # ShareGPT
            role, content = SHAREGPT_ROLES.get(str(item["from"])), item.get("value")
        else:
            role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise DataError(
                f"{row.where}: {name}[{i}] has role {item.get('role', item.get('from'))!r}; "
                f"expected one of {ROLES}"
            )
        if not isinstance(content, str):
            raise DataError(
                f"{row.where}: {name}[{i}].content must be a string, got {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    return out


def to_sample(row: Row, fmt: str, chat: bool = True) -> Sample:
    """Convert one row in format `fmt` to a Sample (the error names the row and the field at fault).

    Args:
        row: the record and where it came from.
        fmt: one of FORMATS.
        chat: True when the tokenizer's chat template renders the sample; False joins plain text.
    """
    if fmt == "messages":
        name = "messages" if "messages" in row.data else "conversations"
        if name not in row.data:
            raise DataError(
                f"{row.where}: missing field 'messages' (a list of {{role, content}} messages, or "
                f"ShareGPT's 'conversations'); row has {sorted(row.data)}"
            )
        messages = _messages(row, row.data.get(name), name)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{row.where}: {name} has no assistant message to learn from")
        if not chat:
            raise DataError(f"{row.where}: the messages format needs data.template=chat")
        return Sample(messages, row.where, fmt)
    if fmt == "prompt_completion":
        prompt = _field(row, "prompt", kinds=(str, list))
        completion = _field(row, "completion", kinds=(str, list))
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
            prompt = (
                _messages(row, prompt, "prompt")
                if isinstance(prompt, list)
                else [{"role": "user", "content": prompt}]
            )
            completion = (
                _messages(row, completion, "completion")
                if isinstance(completion, list)
                else [{"role": "assistant", "content": completion}]
            )
            return Sample(prompt + completion, row.where, fmt)
        return Sample(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            row.where,
            fmt,
        )
    if fmt == "alpaca":
        instruction, output = _field(row, "instruction"), _field(row, "output")
        extra = _field(row, "input", optional=True) or ""
        if chat:
            prompt = instruction + (f"\n\n{extra}" if extra else "")
        else:
            prompt = (
                ALPACA_HEADER
                + f"### Instruction:\n{instruction}\n\n"
                + (f"### Input:\n{extra}\n\n" if extra else "")
                + "### Response:\n"
            )
        return Sample(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], row.where, fmt
        )
    if fmt == "classification":
        text, label = _field(row, "text"), _field(row, "label", kinds=(str, int))
        prompt = text if chat else f"{text}\nLabel: "
        return Sample(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(label)}],
            row.where,
            fmt,
        )
    if fmt == "text":
        return Sample([{"role": "text", "content": _field(row, "text")}], row.where, fmt)
    raise DataError(f"{row.where}: unknown data format {fmt!r}; expected one of {FORMATS}")


def to_samples(rows: list[Row], fmt: str = "auto", chat: bool = True) -> tuple[list[Sample], str]:
    """Convert every row; with fmt="auto" the first row decides and every row must agree.

    Raises:
        DataError: `file:line: ...` for the first row that does not convert; a row that fits another
            format than the first row's says so, rather than naming a field of the first row's format.
    """
    if fmt != "auto":
        return [to_sample(row, fmt, chat) for row in rows], fmt
    fmt = detect_format(rows[0])
    samples = []
    for row in rows:
        try:
            samples.append(to_sample(row, fmt, chat))
        except DataError:
            try:
                own = detect_format(row)
            except DataError:
                own = fmt
            if own == fmt:
                raise
            raise DataError(
                f"{row.where}: a {own} row (keys {sorted(row.data)}) in a file whose first row "
                f"({rows[0].where}) is {fmt}; expected every row in the {fmt} format"
            ) from None
    return samples, fmt
