"""`deltatune demo`: LoRA on the embedded SmolLM2-135M-Instruct, scored before and after.

The task (see demo_task.py) turns a sentence about a person into one line of JSON. The demo prints the
base model's held-out exact match, trains with a progress bar, prints the tuned exact match and a few
before/after answers, and leaves the adapter, metrics.jsonl and loss.png in the output directory.
`examples/demo.yaml` is the same run as a config for `deltatune train`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ... import models  # models.load_default looked up at call time (tests replace it)
from ..build import read_samples
from ..config import RunConfig
from ..config_file import apply_override, from_dict, parse_override
from ..evaluate import score_generation
from ..loop import train
from ..run.output_dir import claim_output_dir
from ..run.runtime import autocast, resolve_precision

DEMO_SETTINGS = {
    "model": {"name_or_path": "smollm2-135m"},
    "method": {
        "name": "lora",
        "r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "target_modules": "all-linear",
    },
    "data": {"train": "deltatune:demo_train.jsonl", "eval": "deltatune:demo_eval.jsonl", "max_length": 128},
    "training": {
        "max_steps": 20,
        "batch_size": 8,
        "lr": 2e-3,
        "schedule": "cosine",
        "warmup_steps": 2,
        "seed": 0,
        "log_every": 1,
        "precision": "auto",  # bf16 autocast where the CPU/GPU runs it natively (about 2x faster)
    },
    "eval": {"max_new_tokens": 40, "max_samples": 100, "batch_size": 50},
    "output_dir": "runs/demo",
}


def demo_config(output_dir: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """The demo's RunConfig, with `key=value` overrides (e.g. training.max_steps=10)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in DEMO_SETTINGS.items()}
    if output_dir:
        raw["output_dir"] = output_dir
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return from_dict(raw, source="demo")


def run_demo(output_dir: str | None = None, overrides: list[str] = (), show: int = 3,
             overwrite: bool = False) -> dict:
    """Run the demo end to end and print its report.

    Args:
        output_dir: where the adapter, metrics.jsonl and loss.png go (default runs/demo, which each demo
            replaces, so `make demo` runs again; another folder that holds a run needs `overwrite`).
        overrides: `key=value` config overrides.
        show: how many before/after answers to print.
        overwrite: replace an earlier run in `output_dir`.

    Returns:
        {"base_exact_match", "tuned_exact_match", "train_eval_seconds", ...}.
    """
    config = demo_config(output_dir, overrides)
    overwrite = overwrite or output_dir is None
    with claim_output_dir(config.output_dir, resume=False, overwrite=overwrite):
        pass  # the folder's errors now, before the model loads; train() claims it again for the run
    eval_samples, _ = read_samples(config.data.eval, config.data)
    eval_samples = eval_samples[: config.eval.max_samples]  # the same rows train() scores
    print("deltatune demo: teach SmolLM2-135M-Instruct to turn a sentence into one line of JSON (LoRA)")
    start = time.perf_counter()
    model, tokenizer = models.load_default()
    precision = resolve_precision(config.training.precision)
    print(
        f"loaded the embedded model in {time.perf_counter() - start:.1f} s; precision {precision}, "
        f"{torch.get_num_threads()} threads"
    )

    clock = time.perf_counter()
    print(f"scoring the base model on {len(eval_samples)} held-out examples ...", flush=True)
    with autocast(precision):
        base_scores, base_answers = score_generation(
            model, tokenizer, eval_samples, True, config.eval.max_new_tokens, config.eval.batch_size
        )
    base_em = base_scores["exact_match"]
    print(f"base model held-out exact match: {base_em:.1f}% ({time.perf_counter() - clock:.0f} s)")
    result = train(config, base=(model, tokenizer), overwrite=overwrite)
    seconds = time.perf_counter() - clock
    tuned_em = result.metrics.get("exact_match", 0.0)

    print("\nbefore / after on held-out examples:")
    for sample, before, after in list(zip(eval_samples, base_answers, result.predictions))[:show]:
        print(f"  input:    {sample.messages[-2]['content'].splitlines()[-1]}")
        print(f"  expected: {sample.reference}")
        print(f"  base:     {_one_line(before)}")
        print(f"  tuned:    {_one_line(after)}\n")
    print(
        f"held-out exact match: base {base_em:.1f}% -> tuned {tuned_em:.1f}% "
        f"({tuned_em - base_em:+.1f} points) on {len(eval_samples)} examples"
    )
    print(f"training + evaluation took {seconds:.0f} s ({result.steps} steps)")
    out = Path(config.output_dir)
    print(
        f"adapter: {out}  (try: deltatune inspect {out}; "
        f'deltatune generate --adapter {out} "Extract name, age, city and job as JSON:\\n...")'
    )
    return {
        "base_exact_match": base_em,
        "tuned_exact_match": tuned_em,
        "train_eval_seconds": seconds,
        "steps": result.steps,
        "output_dir": str(out),
        **{f"final_{k}": v for k, v in result.metrics.items()},
    }


def _one_line(text: str, width: int = 110) -> str:
    """The answer on one line, newlines shown as \\n (they are part of why an answer does not match)."""
    flat = text.replace("\n", "\\n")
    return flat if len(flat) <= width else flat[: width - 3] + "..."
