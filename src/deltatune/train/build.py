"""Building blocks shared by the subcommands: data, tokenizer, base model, adapted model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models import load_model, resolve_model
from .config import DataSection, ModelSection
from .files import read_rows, resolve_data_path
from .formats import Sample, to_samples
from .packing import pack
from .tokenize import Encoded, EncodeStats, encode, encode_classes, ensure_chat_template

DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Dataset:
    """A data file read, converted and tokenized."""

    samples: list[Sample]
    examples: list[Encoded]
    stats: EncodeStats
    format: str


def read_samples(path: str, data: DataSection) -> tuple[list[Sample], str]:
    """Parse and check every row of a data file (no tokenizer needed, so it runs before any load)."""
    return to_samples(read_rows(path), data.format, chat=data.template == "chat")


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
        ensure_chat_template(tokenizer)
    examples, stats = encode(samples, tokenizer, data.max_length, chat, data.train_on_prompt)
    if packing:
        examples = pack(examples, data.max_length)
        stats.packed_rows = len(examples)
    return Dataset(samples, examples, stats, fmt)


def check_data_files(data: DataSection, need_train: bool = True) -> None:
    """Fail fast on missing data files."""
    if need_train and not data.train:
        from ..core.config import DeltaConfigError

        raise DeltaConfigError("data.train is required: the path of a .jsonl, .json or .csv file")
    for path in (data.train if need_train else None, data.eval):
        if path:
            resolve_data_path(path)


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(name_or_path)))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(model: ModelSection, labels: list[str] | None = None):
    """The base model (eval mode) with the head `model.task` names, and its tokenizer, from an alias or a
    local directory; `labels` are a sequence classifier's class names."""
    base, tokenizer = load_model(model.name_or_path, DTYPE[model.dtype], model.task, labels)
    if model.quantize:
        from ..quant import quantize

        base = quantize(base, model.quantize)
    return base, tokenizer


def stored_model_name(name_or_path: str) -> str:
    """What goes into adapter_config.json: an alias as is, a local directory as an absolute path."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def adapter_base_name(adapter_dir: str | os.PathLike) -> str | None:
    """`base_model_name_or_path` from an adapter's config (ours or one written by `peft`)."""
    file = Path(adapter_dir) / "adapter_config.json"
    if not file.is_file():
        from ..io.adapter_files import AdapterFileError

        raise AdapterFileError(f"{adapter_dir}: no adapter_config.json (not an adapter directory)")
    return json.loads(file.read_text(encoding="utf-8")).get("base_model_name_or_path")


def load_adapted(
    adapter_dir: str | os.PathLike, model_name: str | None = None, dtype: str = "float32",
    labels: list[str] | None = None,
):
    """The base model named by the adapter (or `model_name`) with the adapter loaded, and the tokenizer.

    A `peft` adapter for `HuggingFaceTB/SmolLM2-135M-Instruct` resolves to the embedded default model. A
    sequence-classification adapter (task_type SEQ_CLS) needs the class names it was trained with, which
    only its run config knows (`labels`, from the training file).
    """
    from .. import DeltaModel
    from ..core.config import DeltaConfigError

    name = model_name or adapter_base_name(adapter_dir)
    if not name:
        raise DeltaConfigError(f"{adapter_dir}: adapter_config.json names no base model; pass --model")
    saved = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    task = "sequence_classification" if saved.get("task_type") == "SEQ_CLS" else "causal_lm"
    if task == "sequence_classification" and not labels:
        raise DeltaConfigError(
            f"{adapter_dir}: a sequence-classification adapter (task_type SEQ_CLS), whose class names only its "
            "run config knows; evaluate it with `deltatune eval CONFIG.yaml`"
        )
    base, tokenizer = load_base(ModelSection(name_or_path=name, dtype=dtype, task=task), labels)
    model = DeltaModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer
