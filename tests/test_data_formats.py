"""Data files and formats: every format and file type, loss masking, truncation, packing, and bad rows
that stop with the file, the line and what is wrong."""

from __future__ import annotations

import json

import pytest

from deltatune.train.data.files import DataError, read_rows
from deltatune.train.data.formats import detect_format, to_samples
from deltatune.train.data.packing import pack
from deltatune.train.data.tokenize import IGNORE, collate, encode, prompt_text
from helpers_train import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def learned_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])


ROWS = {
    "messages": {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "HELLO"},
        ]
    },
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "alpaca": {"instruction": "Add", "input": "2 and 2", "output": "4"},
    "classification": {"text": "great movie", "label": "positive"},
    "text": {"text": "plain words"},
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_format_detection_and_completion_only_loss(tmp_path, tokenizer, fmt):
    rows = read_rows(jsonl(tmp_path, [ROWS[fmt]] * 2))
    assert detect_format(rows[0]) == fmt
    samples, found = to_samples(rows, "auto")
    assert found == fmt
    examples, stats = encode(samples, tokenizer, max_length=256)
    assert stats.rows == 2 and stats.truncated == 0
    learned = learned_text(tokenizer, examples[0])
    expected = {
        "messages": "HELLO<|im_end|>\n",
        "prompt_completion": "4<|im_end|>\n",
        "alpaca": "4<|im_end|>\n",
        "classification": "positive<|im_end|>\n",
        "text": "plain words<|im_end|>",
    }[fmt]
    assert learned == expected
    if fmt != "text":  # the prompt tokenizes exactly as it will at generation time
        prompt_ids = tokenizer(prompt_text(samples[0], tokenizer, True), add_special_tokens=False)[
            "input_ids"
        ]
        assert examples[0].input_ids[: len(prompt_ids)] == prompt_ids


def test_multi_turn_learns_every_assistant_turn(tmp_path, tokenizer):
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "B"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "D"},
        ]
    }
    samples, _ = to_samples(read_rows(jsonl(tmp_path, [row])))
    examples, _ = encode(samples, tokenizer, 256)
    assert learned_text(tokenizer, examples[0]) == "B<|im_end|>\nD<|im_end|>\n"
    examples, _ = encode(samples, tokenizer, 256, train_on_prompt=True)
    assert sum(label != IGNORE for label in examples[0].labels) == len(examples[0].input_ids)


def test_plain_template_and_sharegpt(tmp_path, tokenizer):
    samples, _ = to_samples(read_rows(jsonl(tmp_path, [ROWS["prompt_completion"]])), chat=False)
    examples, _ = encode(samples, tokenizer, 64, chat=False)
    assert tokenizer.decode(examples[0].input_ids) == "2+2=4<|im_end|>"
    assert learned_text(tokenizer, examples[0]) == "4<|im_end|>"
    alpaca, _ = to_samples(read_rows(jsonl(tmp_path, [ROWS["alpaca"]])), chat=False)
    assert "### Instruction:\nAdd" in prompt_text(alpaca[0], tokenizer, False)
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    samples, fmt = to_samples(read_rows(jsonl(tmp_path, [share])))
    assert fmt == "messages" and samples[0].reference == "yo"


def test_json_and_csv_files(tmp_path):
    (tmp_path / "d.json").write_text(
        '[\n  {"prompt": "a", "completion": "b"},\n\n  {"prompt": "c",\n   "completion": "d"}\n]\n'
    )
    rows = read_rows(tmp_path / "d.json")
    assert [r.line for r in rows] == [2, 4] and rows[1].data["completion"] == "d"
    (tmp_path / "d.csv").write_text('text,label\n"multi\nline",pos\nshort,neg\n')
    rows = read_rows(tmp_path / "d.csv")
    assert [r.line for r in rows] == [2, 4] and rows[0].data["text"] == "multi\nline"
    samples, fmt = to_samples(rows)
    assert fmt == "classification" and samples[1].reference == "neg"


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "a", "completion": "b"'],
            r"d.jsonl:2: not valid JSON",
        ),
        (
            ['{"prompt": "a", "completion": "b"}', "", '{"prompt": "a"}'],
            r"d.jsonl:3: missing field 'completion'",
        ),
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": 3, "completion": "b"}'],
            r"d.jsonl:2: field 'prompt' must",
        ),
        (
            ['{"messages": [{"role": "user", "content": "a"}]}'],
            r"d.jsonl:1: messages has no assistant message",
        ),
        (['{"messages": [{"role": "robot", "content": "a"}]}'], r"d.jsonl:1: messages\[0\] has role 'robot'"),
        (
            ['{"messages": [{"role": "user", "content": 5}]}'],
            r"d.jsonl:1: messages\[0\].content must be a string",
        ),
        (['{"question": "a"}'], r"d.jsonl:1: cannot tell the data format from keys \['question'\]"),
        (["[1, 2]"], r"d.jsonl:1: expected an object"),
        ([""], r"d.jsonl: the data file has no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, lines, message):
    path = jsonl(tmp_path, lines)
    with pytest.raises(DataError, match=message):
        to_samples(read_rows(path))


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown data file type"):
        read_rows(tmp_path / "d.xlsx")
    (tmp_path / "d.parquet").write_text("x")  # parquet is read (through datasets), but this is not one
    with pytest.raises(DataError, match="d.parquet: not a readable parquet file"):
        read_rows(tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("text,label\na,b,c\n")
    with pytest.raises(DataError, match=r"d.csv:2: more values than the 2 header columns"):
        read_rows(tmp_path / "d.csv")
    (tmp_path / "d.json").write_text('{"text": "a"}')
    with pytest.raises(DataError, match=r"d.json:1: expected a JSON array"):
        read_rows(tmp_path / "d.json")
    assert len(read_rows("deltatune:demo_eval.jsonl")) > 0  # bundled data


def test_truncation_is_counted_and_empty_rows_dropped(tmp_path, tokenizer):
    rows = [
        {"prompt": "x" * 100, "completion": "y"},
        {"prompt": "a", "completion": "b" * 100},
        {"prompt": "a", "completion": "b"},
    ]
    samples, _ = to_samples(read_rows(jsonl(tmp_path, rows)))
    examples, stats = encode(samples, tokenizer, max_length=40)
    assert stats.truncated == 2 and stats.dropped == 1 and len(examples) == 2
    assert all(len(e.input_ids) <= 40 for e in examples)
    assert "2 truncated" in stats.summary() and "d.jsonl:1" in stats.summary()
    with pytest.raises(DataError, match="no usable rows"):
        encode(samples[:1], tokenizer, max_length=40)


def test_packing_and_collate(tmp_path, tokenizer):
    samples, _ = to_samples(read_rows(jsonl(tmp_path, [ROWS["prompt_completion"]] * 10)))
    examples, _ = encode(samples, tokenizer, 128)
    packed = pack(examples, 128)
    assert len(packed) < len(examples) and all(len(p.input_ids) <= 128 for p in packed)
    assert sum(len(p.input_ids) for p in packed) == sum(len(e.input_ids) for e in examples)
    batch = collate(examples[:2], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert int(batch["attention_mask"][0].sum()) == len(examples[0].input_ids)
    assert (batch["labels"][0, len(examples[0].input_ids) :] == IGNORE).all()
    mixed = collate(examples[:1] + packed[:1], tokenizer.pad_token_id)  # packed rows: positions, no mask
    assert "attention_mask" not in mixed and mixed["position_ids"].shape == mixed["input_ids"].shape
    n = len(examples[0].input_ids)
    assert mixed["position_ids"][0, :n].tolist() == list(range(n))
    assert mixed["position_ids"][0, n:].tolist() == list(range(mixed["input_ids"].shape[1] - n))
