"""The end of a run: save the adapter, evaluate once more (with generation), write the metrics and the
loss plot. Only the main process writes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .build import Dataset
from .commands.run_generate import write_prompt_record
from .config import RunConfig
from .data.formats import Sample
from .evaluate import eval_loss, is_sequence_classifier, prediction_rows, score_answers
from .run.metrics import PREDICTIONS, MetricsLog, shown, write_predictions
from .run.plot import plot_loss
from .run.trackers import end_trackers, log_record


@dataclass
class TrainResult:
    model: torch.nn.Module  # the DeltaModel (unwrapped), in eval mode
    tokenizer: object
    metrics: dict = field(default_factory=dict)  # the final evaluation
    predictions: list[str] = field(default_factory=list)  # generated answers for the eval samples
    steps: int = 0


def evaluate_run(
    config: RunConfig, accelerator, model, tokenizer, eval_set: Dataset, generation: bool
) -> tuple[dict, list[str]]:
    """Eval loss and perplexity on `eval_set`, plus exact match (or accuracy) when `generation`; and the
    generated answers. Leaves `model` in the mode it found it in."""
    metrics = eval_loss(
        model, eval_set.examples, tokenizer.pad_token_id, config.eval.batch_size, accelerator.device,
        accelerator.autocast,
    )
    predictions: list[str] = []
    if generation:
        with accelerator.autocast():
            scores, predictions = score_answers(
                model, tokenizer, eval_set, config.data.template == "chat",
                config.eval.max_new_tokens, config.eval.batch_size, accelerator.device,
            )
        metrics.update(scores)
    return metrics, predictions


def finish_run(
    config: RunConfig,
    accelerator,
    model,
    tokenizer,
    eval_set: Dataset | None,
    metrics: MetricsLog,
    steps: int,
    log,
    train_samples: list[Sample] = (),
) -> TrainResult:
    """Save the adapter, evaluate once more (with generation), write the metrics and the loss plot.

    The training rows' template and shared system prompt are recorded next to the adapter, so that
    `deltatune generate` prompts the way the adapter was trained (run_generate.py)."""
    out = Path(config.output_dir)
    model.eval()
    final: dict = {}
    started = time.perf_counter()
    predictions: list[str] = []
    if accelerator.is_main_process:
        model.save_pretrained(str(out))
        if train_samples:  # text rows only: how generate should render prompts
            write_prompt_record(out, train_samples, config.data.template)
        if eval_set:
            final, predictions = evaluate_run(config, accelerator, model, tokenizer, eval_set,
                                              config.eval.exact_match)
            if predictions:
                rows = prediction_rows(eval_set.samples, predictions, tokenizer, config.data.template == "chat",
                                       classifier=is_sequence_classifier(model))
                write_predictions(out / PREDICTIONS, rows)
            metrics.write({"step": steps, **final})
            log_record(accelerator, {"step": steps, **final}, "eval")
            log(f"eval: {shown(final)} ({time.perf_counter() - started:.0f} s)")
        title = f"{out.resolve().name} ({config.method.get('name', 'lora')})"
        written = "metrics.jsonl, predictions.jsonl" if predictions else "metrics.jsonl"
        if plot_loss(metrics.records(), out / "loss.png", title):
            log(f"adapter, {written} and loss.png written to {out}")
        else:  # matplotlib can be uninstalled after the default install put it there
            log(f"adapter and {written} written to {out}; no loss.png: matplotlib is not installed "
                "(pip install matplotlib)")
    end_trackers(accelerator)
    accelerator.wait_for_everyone()
    return TrainResult(model, tokenizer, final, predictions, steps)
