"""`deltatune eval`: score a saved adapter (generation for `deltatune generate` is in run_generate.py)."""

from __future__ import annotations

from pathlib import Path

from ..core.config import DeltaConfigError
from .build import check_data_files, load_adapted, read_eval_samples, tokenize_samples
from .config import DataSection
from .config_file import load_config
from .evaluate import eval_loss, score_generation


def _evaluate(
    model,
    tokenizer,
    data: DataSection,
    max_samples: int | None,
    max_new_tokens: int,
    batch_size: int = 16,
    exact: bool = True,
) -> dict:
    samples, fmt = read_eval_samples(data)  # data.eval, or the rows data.val_split holds out
    samples = samples[:max_samples]
    dataset = tokenize_samples(samples, fmt, tokenizer, data)
    metrics = eval_loss(model, dataset.examples, tokenizer.pad_token_id, batch_size)
    if exact:
        scores, _ = score_generation(
            model, tokenizer, samples, data.template == "chat", max_new_tokens, batch_size
        )
        metrics.update(scores)
    print(
        f"{data.eval or f'{data.train} (rows held out by data.val_split={data.val_split})'}: "
        + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
    )
    return metrics


def evaluate_adapter(
    adapter: str,
    data_file: str,
    model: str | None = None,
    data_format: str = "auto",
    max_samples: int | None = None,
    max_new_tokens: int = 64,
    max_length: int = 512,
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
    """
    data = DataSection(eval=data_file, format=data_format, max_length=max_length)
    check_data_files(data, need_train=False)
    read_eval_samples(data)  # bad rows stop us before the model loads
    wrapped, tokenizer = load_adapted(adapter, model)
    return _evaluate(wrapped, tokenizer, data, max_samples or None, max_new_tokens, exact=max_samples != 0)


def evaluate_config(config_path: str, overrides: list[str] = ()) -> dict:
    """Evaluate the adapter a config trained (in its `output_dir`) on the config's `data.eval`."""
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
    wrapped, tokenizer = load_adapted(adapter, config.model.name_or_path, config.model.dtype,
                                      config.model.trust_remote_code)
    return _evaluate(
        wrapped,
        tokenizer,
        config.data,
        config.eval.max_samples,
        config.eval.max_new_tokens,
        config.eval.batch_size,
        config.eval.exact_match,
    )

