"""Experiment tracking (`training.report_to`) through accelerate's trackers; no tracker code of our own.

    report_to: none | tensorboard | mlflow | wandb | trackio, or a list of them

The run's metrics.jsonl records go to every tracker as they are written, under Transformers' tags:
`train/loss`, `train/lr`, ... and `eval/loss`, `eval/exact_match`, ...; the run config goes in as
flat hyperparameters. Each tracker stays on this machine unless the user says otherwise:
- tensorboard writes event files under OUTPUT_DIR/tensorboard/ (`tensorboard --logdir OUTPUT_DIR`);
- mlflow logs to a file store in OUTPUT_DIR/mlruns unless MLFLOW_TRACKING_URI is set;
- wandb runs in offline mode (files under OUTPUT_DIR/wandb; `wandb sync` uploads) unless WANDB_MODE is set;
- trackio keeps its local database (it never uploads unless asked to).
A tracker whose package is missing is refused by name before the model loads (accelerate alone would
drop it with a warning and train without it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ...core.config import DeltaConfigError

# report_to name -> the modules that serve it (any one), and what to install
TRACKERS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
}
LOGGING_DIR = "tensorboard"


def tracker_names(report_to: str | list[str]) -> list[str]:
    """`training.report_to` as a list of tracker names (`none` and an empty list mean no tracker).

    Raises:
        DeltaConfigError: an unknown name (the message lists the known ones).
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    names = [n.strip().lower() for n in names if n.strip().lower() != "none"]
    for name in names:
        if name not in TRACKERS:
            raise DeltaConfigError(
                f"training.report_to={report_to!r}: unknown tracker {name!r}; expected none or some of "
                f"{', '.join(TRACKERS)}"
            )
    return list(dict.fromkeys(names))


def check_trackers_installed(names: list[str]) -> None:
    """Raise before any long work when a tracker's package is not installed, naming what to install."""
    for name in names:
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) is not None for m in modules):
            raise DeltaConfigError(
                f"training.report_to={name!r}: the {package} package is not installed "
                f"(pip install {package}, or remove {name} from training.report_to)"
            )


def accelerator_options(names: list[str], out: Path) -> dict[str, Any]:
    """The Accelerator keywords that make it log to `names` (nothing when there are none)."""
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / LOGGING_DIR))
    return {"log_with": names, "project_config": project}


def start_trackers(accelerator, names: list[str], out: Path, config: dict) -> None:
    """Open the run in every tracker (main process only), named after the output folder."""
    if not names:
        return
    init_kwargs: dict[str, dict] = {}
    if "mlflow" in names and "MLFLOW_TRACKING_URI" not in os.environ and accelerator.is_main_process:
        import mlflow

        mlflow.set_tracking_uri((out / "mlruns").resolve().as_uri())
    if "wandb" in names:
        init_kwargs["wandb"] = {"mode": os.environ.get("WANDB_MODE", "offline"), "dir": str(out)}
    accelerator.init_trackers(out.resolve().name, config=flat_config(config), init_kwargs=init_kwargs)


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested run config as {dotted key: bool | int | float | str}, as tracker hyperparameters take it."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:  # None, lists: their text
            flat[name] = "null" if value is None else str(value)
    return flat


def log_record(accelerator, record: dict, kind: str) -> None:
    """Send a metrics record's numbers to the trackers at its step; `kind` is "train" or "eval"."""
    if not getattr(accelerator, "log_with", None):
        return
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        values[f"{kind}/{key.removeprefix('eval_')}"] = value
    if values:
        accelerator.log(values, step=record["step"])


def end_trackers(accelerator) -> None:
    """Close each tracker's run (flush TensorBoard's events, end the mlflow/wandb run). Not through
    `accelerator.end_training()`, which also tears down the process group that the run still uses."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
