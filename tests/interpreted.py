"""Run a test file's Triton cases on CPU through Triton's interpreter, in a pytest subprocess.

TRITON_INTERPRET=1 must be set before triton is first imported (torch imports it early, and triton.language's
own jitted helpers are built then), so a test process that started without it cannot switch it on: the
cases run again in a child pytest with it set, and each case in the parent asserts that the child's -rA
report names it PASSED."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"


def needs_child(cpu_tensors: bool = False) -> bool:
    """True when Triton cases cannot run in this process: no interpreter, and no GPU (or, with `cpu_tensors`,
    cases whose tensors stay on the CPU, which only the interpreter runs)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return not interpreting and (cpu_tensors or not torch.cuda.is_available())


def interpreted_report(test_file: str, keyword: str) -> str:
    """The -rA report of `pytest test_file -k keyword` run with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", test_file, "-k",
                           keyword], capture_output=True, text=True, env=env, cwd=Path(test_file).parent,
                          timeout=600)
    return done.stdout


def assert_passed_in_child(report: str, test_file: str, name: str) -> None:
    assert f"PASSED {Path(test_file).name}::{name}" in report, report[-3000:]
