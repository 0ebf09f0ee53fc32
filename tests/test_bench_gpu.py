"""benchmarks/gpu.py end to end on the CPU with --tiny: the JSON has every field and every set-up ran, the
table has a row per model and variant, and one set-up also runs as its own worker process (the GPU path).
Timings are never asserted: a tiny CPU run's numbers mean nothing."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
MODELS = ("smollm2-135m", "llama-1b")
VARIANTS = ("lora p=0.05", "lora p=0", "dora p=0.05", "qlora p=0.05")


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SCRIPT.parents[1] / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_tiny_gpu_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    printed = run("--tiny", "--no-tests", "--steps", "1", "--batch", "1", "--out", str(out)).stdout
    report = json.loads(out.read_text())
    assert {"device", "dtype", "date", "tiny", "shape", "tests", "runs", "ratios"} <= set(report)
    assert report["tiny"] and report["tests"] is None and report["shape"]["seq"] == 64
    errors = [r for r in report["runs"] if "error" in r]
    assert not errors, errors
    ran = {(r["model"], r["setup"], r["variant"]) for r in report["runs"]}
    expected = {(m, "floor", "") for m in MODELS}
    expected |= {(m, lib, v) for m in MODELS for lib in ("peft", "deltatune") for v in VARIANTS}
    assert ran == expected
    for res in report["runs"]:
        assert res["seconds"] > 0 and res["tokens_per_s"] > 0 and res["memory_gb"] > 0
    rows = {(row["model"], row["variant"]): row for row in report["ratios"]}
    assert set(rows) == {(m, v) for m in MODELS for v in VARIANTS}
    for (model, variant), row in rows.items():
        keys = {"ours/peft tokens/s", "ours/peft memory", "ours time/floor", "peft time/floor",
                "ours memory/floor", "peft memory/floor"}
        if variant.startswith(("dora", "qlora")):
            kind = variant.split()[0]
            keys |= {f"ours {kind}/lora time", f"peft {kind}/lora time"}
        assert keys <= set(row), (model, variant, keys - set(row))
        assert f"{model:<14}{variant:<14}" in printed  # the table prints every row


def test_one_setup_runs_as_its_own_worker_process():
    """The non-tiny path: `--worker setup model variant` in a fresh process prints one JSON line."""
    line = run("--worker", "deltatune", "llama-1b", "lora p=0.05", "--tiny", "--steps", "1", "--batch", "1",
               "--seq", "32").stdout.strip().splitlines()[-1]
    res = json.loads(line)
    assert res["setup"] == "deltatune" and res["variant"] == "lora p=0.05" and res["tokens_per_s"] > 0
