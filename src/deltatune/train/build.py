"""Building blocks shared by the subcommands: data, tokenizer, base model, adapted model."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import DeltaModel
from ..core.config import DeltaConfigError, TaskType
from ..io.adapter_files import read_config
from ..models import load_model
from ..quant import quantize
from .config import DataSection, ModelSection
from .data.files import DataError, data_paths, read_rows
from .data.formats import Sample, map_columns, to_samples
from .data.packing import pack
from .data.tokenize import (
    TEMPLATE_FILE,
    Encoded,
    EncodeStats,
    apply_chat_template_choice,
    encode,
    encode_classes,
    resolve_chat_template,
)

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Dataset:
    """A data file read, converted and tokenized."""

    samples: list[Sample]
    examples: list[Encoded]
    stats: EncodeStats
    format: str


EVAL_SPLITS = ("validation", "test")  # tried when data.eval names a DatasetDict folder


def read_samples(path, data: DataSection, eval_data: bool = False) -> tuple[list[Sample], str]:
    """Parse and check every row of the data `path` names, columns renamed by `data.columns` (no
    tokenizer needed, so it runs before any load). A DatasetDict folder gives data.split (training
    data; default its train split) or, for `eval_data`, its validation or test split."""
    if eval_data:
        rows = read_rows(path, None, EVAL_SPLITS)
    else:
        rows = read_rows(path, data.split, ("train",))
    rows = map_columns(rows, data.columns)
    return to_samples(rows, data.format, chat=data.template == "chat")


def hold_out(samples: list[Sample], val_split: int | float) -> tuple[list[Sample], list[Sample]]:
    """Split samples into (train, held out) for `data.val_split`, both in file order.

    The held-out rows are those with the smallest SHA-256 of their content (ties by position): the
    same data gives the same split on every run and machine, whatever `training.seed` or the file
    order, so runs with different seeds are scored on the same rows. A fraction holds out
    round(fraction * rows) rows, at least one.

    Raises:
        DataError: the split would leave no training row.
    """
    count = val_split if isinstance(val_split, int) else max(1, round(val_split * len(samples)))
    if count >= len(samples):
        raise DataError(f"data.val_split={val_split!r}: holds out {count} of {len(samples)} rows of "
                        "data.train, leaving none to train on; expected fewer")

    def key(item: tuple[int, Sample]) -> tuple[str, int]:
        text = json.dumps(["deltatune-val-split", item[1].messages], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest(), item[0]

    held = {index for index, _ in sorted(enumerate(samples), key=key)[:count]}
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def read_train_eval(data: DataSection) -> tuple[list[Sample], str, list[Sample] | None, str | None]:
    """(train samples, format, eval samples or None, format): data.eval, or the rows `data.val_split`
    holds out of data.train."""
    train, fmt = read_samples(data.train, data)
    if data.eval:
        return (train, fmt, *read_samples(data.eval, data, eval_data=True))
    if data.val_split:
        train, held = hold_out(train, data.val_split)
        return train, fmt, held, fmt
    return train, fmt, None, None


def read_eval_samples(data: DataSection) -> tuple[list[Sample], str]:
    """The evaluation samples: data.eval, or the rows `data.val_split` holds out of data.train."""
    if data.eval:
        return read_samples(data.eval, data, eval_data=True)
    train, fmt = read_samples(data.train, data)
    return hold_out(train, data.val_split)[1], fmt


def class_labels(samples: list[Sample]) -> list[str]:
    """The class names of {text, label} training rows, sorted (class id = position): the head of a
    sequence classifier gets one output per name."""
    return sorted({s.reference for s in samples if s.reference is not None})


def tokenize_samples(
    samples: list[Sample], fmt: str, tokenizer, data: DataSection, packing: bool = False,
    labels: list[str] | None = None,
) -> Dataset:
    """Tokenize for a causal LM, or with `labels` for a sequence classifier (tokenize.encode_classes)."""
    if labels is not None:
        examples, stats = encode_classes(samples, tokenizer, data.max_length, {n: i for i, n in enumerate(labels)})
        return Dataset(samples, examples, stats, fmt)
    chat = data.template == "chat"
    if chat:
        apply_chat_template_choice(tokenizer, data.chat_template)
    examples, stats = encode(samples, tokenizer, data.max_length, chat, data.train_on_prompt)
    if packing:
        examples = pack(examples, data.max_length)
        stats.packed_rows = len(examples)
    return Dataset(samples, examples, stats, fmt)


def check_data_files(data: DataSection, need_train: bool = True) -> None:
    """Fail fast on missing data files and a chat template that names nothing."""
    if need_train and not data.train:
        raise DeltaConfigError(
            "data.train is required: a .jsonl, .json, .csv, .parquet or .arrow file, a folder, a glob, "
            "a save_to_disk folder, or a list of these"
        )
    if data.train and (need_train or (data.val_split and not data.eval)):
        data_paths(data.train, data.split)
    if data.eval:
        data_paths(data.eval, None, EVAL_SPLITS)
    if data.chat_template:
        resolve_chat_template(data.chat_template)


def load_base(model: ModelSection, labels: list[str] | None = None, tokenizer=None):
    """The base model (eval mode) with the head `model.task` names, and its tokenizer (`tokenizer` when the run
    loaded it already), from an alias, a local directory or a hub id in the local cache; `labels` are a
    sequence classifier's class names."""
    base, tokenizer = load_model(model.name_or_path, DTYPE[model.dtype], model.task, labels, model.trust_remote_code,
                                 tokenizer)
    if model.quantize:
        base = quantize(base, model.quantize)
    return base, tokenizer


def stored_model_name(name_or_path: str) -> str:
    """What goes into adapter_config.json: an alias as is, a local directory as an absolute path."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def adapter_base_name(adapter_dir: str | os.PathLike) -> str | None:
    """`base_model_name_or_path` from an adapter's config (ours or one written by `peft`), read by io/.

    Raises:
        AdapterFileError: no adapter_config.json in `adapter_dir`, or one that is not valid.
    """
    return read_config(Path(adapter_dir)).base_model_name_or_path


def load_adapted(
    adapter_dir: str | os.PathLike, model_name: str | None = None, dtype: str = "float32",
    labels: list[str] | None = None, trust_remote_code: bool = False,
):
    """The base model named by the adapter (or `model_name`) with the adapter loaded, and the tokenizer.

    A `peft` adapter for `HuggingFaceTB/SmolLM2-135M-Instruct` resolves to the embedded default model. A
    sequence-classification adapter (task_type SEQ_CLS) needs the class names it was trained with, which
    only its run config knows (`labels`, from the training file).
    """
    saved = read_config(Path(adapter_dir))  # io/ reads the file, before the (long) model load
    name = model_name or saved.base_model_name_or_path
    if not name:
        raise DeltaConfigError(f"{adapter_dir}: adapter_config.json names no base model; pass --model")
    task = "sequence_classification" if saved.task_type == TaskType.SEQ_CLS else "causal_lm"
    if task == "sequence_classification" and not labels:
        raise DeltaConfigError(
            f"{adapter_dir}: a sequence-classification adapter (task_type SEQ_CLS), whose class names only its "
            "run config knows; evaluate it with `deltatune eval CONFIG.yaml`"
        )
    section = ModelSection(name_or_path=name, dtype=dtype, task=task, trust_remote_code=trust_remote_code)
    base, tokenizer = load_base(section, labels)
    template = Path(adapter_dir) / TEMPLATE_FILE  # the run's data.chat_template, when it chose one
    if template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    model = DeltaModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer
