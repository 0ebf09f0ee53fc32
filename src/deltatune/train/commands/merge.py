"""`deltatune merge`: fold an adapter into its base model and save a full Transformers model directory."""

from __future__ import annotations

import os
from pathlib import Path

from ...core.config import DeltaConfigError
from ...io.export import write_merged_model
from ..build import DTYPE, load_adapted
from ..config import DTYPES


def merge_adapter(
    adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None, dtype: str = "float32"
) -> Path:
    """Merge `adapter` into its base and write weights + tokenizer to `out`.

    The merge is computed in float32 (W + delta added without bf16/fp16 rounding on the way) and the
    merged weights are then cast once to `dtype`. The merged model is checked for NaN/inf before
    anything is written (`safe_merge`), then written by io/export.py (a temporary folder next to `out`,
    renamed into place, so `out` never holds a partial model).

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
        WriteError: the disk or folder refused a write (nothing is left at `out`).
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
    return write_merged_model(merged, tokenizer, out)
