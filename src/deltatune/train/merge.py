"""`deltatune merge`: fold an adapter into its base model and save a full Transformers model directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..core.config import DeltaConfigError
from ..io.atomic import give_default_mode
from .build import DTYPE, load_adapted
from .config import DTYPES


def merge_adapter(
    adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None, dtype: str = "float32"
) -> Path:
    """Merge `adapter` into its base and write weights + tokenizer to `out`.

    The merge is computed in float32 (W + delta added without bf16/fp16 rounding on the way) and the
    merged weights are then cast once to `dtype`. The merged model is checked for NaN/inf before
    anything is written (`safe_merge`), written to a temporary folder next to `out`, and renamed into
    place, so `out` never holds a partial model.

    Args:
        adapter: an adapter directory (ours or one written by `peft`).
        out: the directory to create; it must not exist or be empty.
        model: the base model; default the adapter's `base_model_name_or_path`.
        dtype: the dtype the merged model is saved in: float32 | bfloat16 | float16 (or fp32, bf16, fp16).

    Returns:
        The output directory, loadable with `AutoModelForCausalLM.from_pretrained`.

    Raises:
        DeltaConfigError: an unknown `dtype` (before anything loads).
        FileExistsError: `out` exists and is not an empty directory.
    """
    if dtype not in DTYPES:
        raise DeltaConfigError(f"--dtype {dtype}: must be one of {', '.join(DTYPES)}")
    saved_dtype = DTYPE[DTYPES[dtype]]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out}: exists and is not an empty directory")
    wrapped, tokenizer = load_adapted(adapter, model, "float32")
    merged = wrapped.merge_and_unload(safe_merge=True)
    merged.to(saved_dtype)  # after the float32 merge: one rounding per weight
    merged.config.dtype = saved_dtype  # what config.json records
    merged.eval()
    for param in merged.parameters():
        param.requires_grad_(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with torch.no_grad():
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        give_default_mode(tmp)  # mkdtemp's 0700 and Transformers' 0600 weights would hide it from other users
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
