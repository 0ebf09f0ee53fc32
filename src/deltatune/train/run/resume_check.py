"""`--resume` with the config a checkpoint was trained with: which fields may change, and applying them.

A resumed run must be the run the files say it is. A field that shapes the adapter, the data or the
optimization so far (method.*, model.*, data.train's content, batch size, seed, schedule shape ...)
cannot change mid-run: the checkpoint's tensors, optimizer moments and sample order were made under the
old value, so it is refused by name, with the old and the new value, before any model loads. The
fields in SAFE_ON_RESUME may change and then really apply from the resumed step on; each change is
written to metrics.jsonl and to the header of run_config.yaml.

The training data file is compared by content (SHA-256 of the whole file, read once per start; the
loop parses the whole file anyway), so a moved or renamed file with the same rows resumes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ...core.config import DeltaConfigError
from ..config import RunConfig, build_method_config
from ..data.files import data_paths
from .checkpoint import CHECKPOINTS, checkpoint_folders, list_checkpoints, saved_settings

SAFE_ON_RESUME = {
    "training.max_steps": "the run's length; the schedule stretches to it",
    "training.epochs": "the run's length; the schedule stretches to it",
    "training.lr": "the peak learning rate, from the resumed step on",
    "training.max_grad_norm": "gradient clipping, from the resumed step on",
    "training.log_every": "bookkeeping",
    "training.eval_every": "bookkeeping",
    "training.save_every": "bookkeeping",
    "training.keep_checkpoints": "bookkeeping",
    "training.report_to": "bookkeeping (trackers)",
    "training.early_stopping_patience": "when to stop, from the resumed step on",
    "training.gradient_checkpointing": "memory only: the same gradients",
    "training.offload_checkpoints": "memory only: the same gradients",
    "training.compile": "speed only: the same loss and gradients to float rounding (other dropout draws)",
    "training.kernels": "speed only: the same loss and gradients (to float rounding)",
    "data.eval": "evaluation only",
    "eval.*": "evaluation only",
    "output_dir": "the run folder may move",
}
# fields that, changed, need the restored optimizer and scheduler pointed at the new values
SCHEDULE_FIELDS = ("training.max_steps", "training.epochs", "training.lr")


def may_change(field: str) -> bool:
    return field in SAFE_ON_RESUME or f"{field.split('.')[0]}.*" in SAFE_ON_RESUME


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_fingerprint(path) -> dict:
    """SHA-256 and size of the training data's whole content (bundled `deltatune:` names resolved).

    One plain file hashes as its bytes (as before lists and folders were read); several files, a
    folder or a `save_to_disk` folder hash as the list of (name, SHA-256) of every file, in order.
    """
    paths = data_paths(path)
    if len(paths) == 1 and paths[0].is_file():
        return {"sha256": _file_digest(paths[0]), "bytes": paths[0].stat().st_size}
    # names relative to each entry's folder: moving the data elsewhere does not count as a change
    files = [(str(f.relative_to(p.parent)), f) for p in paths
             for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    listing = json.dumps([[name, _file_digest(f)] for name, f in files])
    return {"sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
            "bytes": sum(f.stat().st_size for _, f in files)}


def flat_settings(config: dict) -> dict[str, Any]:
    """A RunConfig.to_dict() as {dotted field: value}; the method section as its built config (so
    `lora` and `LORA`, or a default written out, compare equal)."""
    out = {"output_dir": config.get("output_dir")}
    for section in ("model", "data", "training", "eval", "image"):
        out.update({f"{section}.{key}": value for key, value in (config.get(section) or {}).items()})
    try:
        method = build_method_config(config.get("method") or {}).to_dict()
        method.pop("base_model_name_or_path", None)
        method["name"] = method.pop("peft_type")
    except DeltaConfigError:  # a stored section this version no longer reads: compare it as written
        method = dict(config.get("method") or {})
    out.update({f"method.{key}": value for key, value in method.items()})
    return out


def resume_changes(saved: dict, config: RunConfig, train_data: dict, checkpoint: Path) -> dict[str, tuple]:
    """The fields that differ between the checkpoint's run and `config`, as {field: (old, new)}.

    Args:
        saved: what the checkpoint stored besides tensors (`config`, `data_train` fingerprint).
        config: the config of the run about to resume.
        train_data: file_fingerprint of config.data.train.
        checkpoint: the checkpoint folder (for the message).

    Raises:
        DeltaConfigError: naming every changed field outside SAFE_ON_RESUME, with old and new values.
    """
    if "config" not in saved:  # written before checkpoints kept their config: nothing to compare
        return {}
    old, new = flat_settings(saved["config"]), flat_settings(config.to_dict())
    # a field the checkpoint's version did not have yet: that run used the field's default
    defaults = flat_settings(RunConfig().to_dict())
    old = {**{k: v for k, v in defaults.items() if not k.startswith("method.")}, **old}
    changed = {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if key != "data.train" and old.get(key) != new.get(key)
    }
    before = saved.get("data_train")
    if before and before != train_data:
        changed["data.train"] = (
            f"sha256 {before['sha256'][:12]} ({before['bytes']} bytes)",
            f"sha256 {train_data['sha256'][:12]} ({train_data['bytes']} bytes)",
        )
    refused = [f"{key} {a!r} -> {b!r}" for key, (a, b) in changed.items() if not may_change(key)]
    if refused:
        raise DeltaConfigError(
            f"--resume: {checkpoint} was trained with other values of {', '.join(refused)}; these cannot "
            f"change within a run (fields that may: {', '.join(SAFE_ON_RESUME)}); expected the old values, "
            "or a fresh run in another output_dir"
        )
    return changed


def point_schedule(optimizer, scheduler, lr: float) -> None:
    """After a checkpoint restored `optimizer` and `scheduler`: make the next step use this config's
    peak rate `lr` and schedule (its length included) at the restored step, as a run started with
    them would. The restored values are the old config's; LambdaLR keeps no copy of its lambdas."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)


def resume_note(checkpoint: Path, step: int, changed: dict[str, tuple]) -> str:
    """One line for the log and run_config.yaml's header: what changed on this resume."""
    shown = "; ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in changed.items())
    return (
        f"resumed at step {step} from {checkpoint.name} with {shown} "
        f"(steps 1-{step} ran with the earlier values)"
    )


def resume_point(out: Path, config: RunConfig, train_data: dict) -> tuple[Path, dict, dict[str, tuple]]:
    """`--resume`: the newest complete checkpoint in `out`, its saved settings, and the fields that changed.

    Raises:
        DeltaConfigError: no complete checkpoint (naming the incomplete ones), or a field that may not
            change did (resume_changes); both before any model loads.
    """
    found = list_checkpoints(out)
    if not found:
        broken = [p.name for p in checkpoint_folders(out)]
        raise DeltaConfigError(f"--resume: no checkpoint in {out / CHECKPOINTS}"
                               + (f" (incomplete, not used: {', '.join(broken)})" if broken else ""))
    saved = saved_settings(found[-1])
    return found[-1], saved, resume_changes(saved, config, train_data, found[-1])


def check_resume_length(checkpoint: Path, saved: dict, steps: int, config: RunConfig) -> None:
    """Refuse a resumed run that would end at or before its checkpoint's step."""
    if saved["step"] >= steps:
        tc = config.training
        length = f"max_steps={tc.max_steps}" if tc.max_steps else f"epochs={tc.epochs} ({steps} steps)"
        raise DeltaConfigError(
            f"--resume: training.{length} ends at or before {checkpoint.name}; "
            f"expected a run longer than {saved['step']} steps"
        )
