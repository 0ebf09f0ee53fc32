"""The tree stays ruff clean (issue 16): `ruff check src tests benchmarks` under the rule set in
pyproject.toml ([tool.ruff], [tool.ruff.lint]). ruff is part of the test extra, pinned in constraints.txt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_passes():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"
