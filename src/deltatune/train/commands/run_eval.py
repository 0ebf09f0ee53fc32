"""`deltatune eval`: score a saved adapter (generation for `deltatune generate` is in run_generate.py)."""

from __future__ import annotations

import os
from pathlib import Path

from ...core.config import DeltaConfigError
from ...io.atomic import write_json
from ..build import (
    adapter_base_name,
    check_data_files,
    class_labels,
    load_adapted,
    read_eval_samples,
    read_samples,
    tokenize_samples,
)
from ..config import DataSection
from ..config_file import load_config
from ..evaluate import eval_loss, prediction_rows, score_answers
from ..run.metrics import EVAL_METRICS, EVAL_PREDICTIONS, shown, write_predictions


def _evaluate(
    model,
    tokenizer,
    data: DataSection,
    max_samples: int | None,
    max_new_tokens: int,
    batch_size: int = 16,
    exact: bool = True,
    out: Path | None = None,
    source: dict | None = None,
    labels: list[str] | None = None,
) -> dict:
    """Score on `data.eval` (or the rows data.val_split holds out of data.train); with `out`, write
    eval_metrics.json and eval_predictions.jsonl there. `labels`: a sequence classifier's class names."""
    samples, fmt = read_eval_samples(data)
    samples = samples[:max_samples]
    dataset = tokenize_samples(samples, fmt, tokenizer, data, labels=labels)
    metrics = eval_loss(model, dataset.examples, tokenizer.pad_token_id, batch_size)
    predictions: list[str] = []
    if exact:
        scores, predictions = score_answers(model, tokenizer, dataset, data.template == "chat", max_new_tokens,
                                            batch_size)
        metrics.update(scores)
    print(
        f"{data.eval or f'{data.train} (rows held out by data.val_split={data.val_split})'}: "
        + shown(metrics)
    )
    if out is not None:
        answers = out / EVAL_PREDICTIONS
        if predictions:
            rows = prediction_rows(samples, predictions, tokenizer, data.template == "chat", labels is not None)
            write_predictions(answers, rows)
        else:  # loss only: an earlier run's answers would no longer match these metrics
            answers.unlink(missing_ok=True)
        write_json(out / EVAL_METRICS, {**(source or {}), "data": str(data.eval or data.train), **metrics})
        print(f"metrics written to {out / EVAL_METRICS}" + (f", answers to {answers}" if predictions else ""))
    return metrics


def writable_folder(folder: str | os.PathLike, key: str) -> Path:
    """`folder`, created if missing, checked writable before any model loads.

    Raises:
        DeltaConfigError: naming `key` and the folder, when it cannot be created or written.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DeltaConfigError(f"{key}={str(path)!r}: cannot create the folder ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DeltaConfigError(
            f"{key}={str(path)!r}: not writable, so the metrics and answers could not be saved; "
            "pass --out DIR"
        )
    return path


def evaluate_adapter(
    adapter: str,
    data_file: str,
    model: str | None = None,
    data_format: str = "auto",
    max_samples: int | None = None,
    max_new_tokens: int = 64,
    max_length: int = 512,
    out: str | None = None,
) -> dict:
    """Loss, perplexity and exact match of the adapter in `adapter` on `data_file`.

    Args:
        adapter: an adapter directory (ours or one written by `peft`).
        data_file: a data file in any supported format.
        model: the base model; default the adapter's `base_model_name_or_path`.
        data_format: the data format, or "auto".
        max_samples: use the first N rows (default all); 0 skips generation (loss only).
        max_new_tokens: generation budget per answer.
        max_length: longer rows are truncated for the loss.
        out: folder for eval_metrics.json and eval_predictions.jsonl (default: the adapter's folder).
    """
    data = DataSection(eval=data_file, format=data_format, max_length=max_length)
    check_data_files(data, need_train=False)
    read_eval_samples(data)  # bad rows stop us before the model loads
    adapter_base_name(adapter)  # not an adapter folder: stop before anything is written
    folder = writable_folder(out or adapter, "--out" if out else "--adapter")
    wrapped, tokenizer = load_adapted(adapter, model)
    return _evaluate(wrapped, tokenizer, data, max_samples or None, max_new_tokens, exact=max_samples != 0,
                     out=folder, source={"adapter": str(adapter)})


def evaluate_config(config_path: str, overrides: list[str] = (), out: str | None = None) -> dict:
    """Evaluate the adapter a config trained (in its `output_dir`) on the config's `data.eval`; the
    metrics and answers go to `out` (default: `output_dir`)."""
    config = load_config(config_path, overrides)
    if not config.data.eval and not config.data.val_split:
        raise DeltaConfigError("data.eval (a held-out data file) or data.val_split is required to evaluate")
    check_data_files(config.data, need_train=False)
    adapter = Path(config.output_dir)
    if not (adapter / "adapter_config.json").is_file():
        raise DeltaConfigError(
            f"output_dir={str(adapter)!r}: no trained adapter there yet; run deltatune train"
        )
    read_eval_samples(config.data)
    labels = None  # a classifier's class names come from its training file, as in training
    if config.model.task == "sequence_classification":
        check_data_files(config.data)
        labels = class_labels(read_samples(config.data.train, config.data)[0])
    folder = writable_folder(out or adapter, "--out" if out else "output_dir")
    wrapped, tokenizer = load_adapted(adapter, config.model.name_or_path, config.model.dtype, labels,
                                      config.model.trust_remote_code)
    return _evaluate(
        wrapped,
        tokenizer,
        config.data,
        config.eval.max_samples,
        config.eval.max_new_tokens,
        config.eval.batch_size,
        config.eval.exact_match,
        out=folder,
        source={"adapter": str(adapter), "config": str(config_path)},
        labels=labels,
    )

