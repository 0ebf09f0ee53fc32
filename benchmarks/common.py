"""Shared pieces of the benchmark scripts: each set-up runs in its own process (clean peak RSS), the
parent prints ratios measured in the same run. Absolute times on shared machines drift by 20% or more
between runs; only the ratios are meant to be compared."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def shape_args(description: str, rounds: bool = False, extra=None) -> tuple[argparse.Namespace, list[str]]:
    """The flags every benchmark takes (--worker, --steps, --batch, --seq; with `rounds` also --rounds and
    --only) and the shape flags to pass on to its workers; `extra(parser)` adds a script's own flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", nargs="*", help="internal: one set-up in this process (the script starts these)")
    if rounds:
        parser.add_argument("--rounds", type=int, default=1, help="run every set-up this many times")
        parser.add_argument("--only", nargs="*", help="variant prefixes to run (lora, dora, 'lora p=0', ...)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    if extra:  # after the shared flags, so its parser.set_defaults can change theirs
        extra(parser)
    args = parser.parse_args()
    return args, ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux reports KiB


def timed(step, steps: int, warmup: int = 1) -> float:
    """Median seconds per call of `step` over `steps` calls after `warmup` calls (the median, not the
    mean: a shared machine's occasional stall should not decide a ratio)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_worker(script: str, args: list[str]) -> dict:
    """Run `script --worker ...` in a fresh process and parse the JSON line it prints last."""
    done = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"worker {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_smollm2_and_tokenizer():
    from deltatune.models import load_default

    torch.set_num_threads(2)
    return load_default()


def load_smollm2():
    return load_smollm2_and_tokenizer()[0]


def token_batch(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
