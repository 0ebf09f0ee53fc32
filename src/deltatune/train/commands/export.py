"""`deltatune export --to gguf`: an adapter as a llama.cpp / Ollama GGUF LoRA adapter, and optionally the
merged model as a GGUF model (io/gguf_export.py writes both).

An adapter llama.cpp cannot load as LoRA pairs (another method, DoRA) is first turned into a plain LoRA by
compose/extract.py's truncated SVD, and the approximation error is reported; adapters it refuses for other
reasons (full tensors such as modules_to_save) stop with its reasons before any model loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ...compose.extract import ExtractionReport, extract_lora
from ...core.config import DeltaConfigError
from ...io import models
from ...io.adapter_files import AdapterFileError
from ...io.gguf_export import OUTTYPES, architecture, write_lora_gguf, write_merged_gguf
from ...io.inspect import check_adapter
from ...io.serving import as_converted, llama_cpp_verdict, needs_lora_conversion
from ..build import load_adapted

DEFAULT_RANK = 16  # the rank a non-LoRA adapter is extracted to unless told (vLLM's default max too)


@dataclass
class ExportResult:
    """What `export_gguf` wrote: the adapter file, the merged model file (or None), the SVD report of a
    converted adapter (None: it was a plain LoRA, written exactly), and the base GGUF llama.cpp pairs it with."""

    adapter: Path
    merged: Path | None = None
    conversion: ExtractionReport | None = None
    base_gguf: Path | None = None

    def __str__(self) -> str:
        lines = []
        if self.conversion is not None:
            lines.append(f"converted to LoRA by SVD first: {self.conversion}")
        lines.append(f"GGUF LoRA adapter written to {self.adapter}")
        if self.merged:
            lines.append(f"merged GGUF model written to {self.merged}")
        if self.base_gguf:
            lines.append(f"llama.cpp: llama-cli -m {self.base_gguf} --lora {self.adapter}")
            lines.append(f"Ollama Modelfile: FROM {self.base_gguf} / ADAPTER {self.adapter}")
        return "\n".join(lines)


def _free(path: Path, flag: str) -> Path:
    if path.exists():
        raise FileExistsError(f"{flag} {path}: exists; remove it or choose another file")
    return path


def export_gguf(adapter: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                rank: int | None = None, outtype: str = "f32", merged: str | os.PathLike | None = None,
                base_gguf: str | os.PathLike | None = None) -> ExportResult:
    """Write `adapter` as a GGUF LoRA adapter at `out` (and the merged model at `merged`).

    Args:
        adapter: an adapter directory (ours or peft's) on a Llama-family base.
        out: the adapter .gguf file to create.
        model: the base model (default: the adapter's base_model_name_or_path).
        rank: the LoRA rank a non-LoRA adapter (or DoRA) is extracted to (default 16); a plain LoRA is
            written as it is and `rank` must not be given.
        outtype: "f32" or "f16" tensors.
        merged: also write the merged model here as a GGUF model.
        base_gguf: the base's own GGUF file, whose tokenizer and hyper-parameters the merged file copies
            (default: the embedded SmolLM2's, when the base is the embedded default).

    Raises:
        AdapterFileError: the adapter's files are unreadable or llama.cpp refuses it for a reason a LoRA
            conversion does not remove.
        DeltaConfigError: a base outside the Llama family, a bad rank or outtype, `merged` without a base
            GGUF.
        FileExistsError: `out` or `merged` exists.
    """
    out, merged = _free(Path(out), "--out"), merged and _free(Path(merged), "--merged")
    if outtype not in OUTTYPES:
        raise DeltaConfigError(f"--outtype {outtype}: must be one of {', '.join(OUTTYPES)}")
    info, problems, _ = check_adapter(adapter)
    if problems:
        raise AdapterFileError("\n".join(problems))
    convert = needs_lora_conversion(info)
    refused = llama_cpp_verdict(as_converted(info, rank or DEFAULT_RANK) if convert else info).reasons
    if refused:
        raise AdapterFileError(f"{adapter}: llama.cpp cannot load it: {'; '.join(refused)}")
    if rank is not None and not convert:
        raise DeltaConfigError(f"--rank {rank}: {adapter} is a plain LoRA, written as it is (rank "
                               f"{sorted(info.ranks)}); --rank applies to adapters converted to LoRA")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise DeltaConfigError(f"--rank {rank}: must be a positive integer")
    base_name = model or info.config.get("base_model_name_or_path") or ""
    if merged and base_gguf is None:
        if not models.is_default_model(base_name):
            raise DeltaConfigError(f"--merged needs --base-gguf FILE (the base {base_name!r} as GGUF, whose "
                                   "tokenizer and settings the merged file copies)")
        base_gguf = models.default_gguf_file()
    wrapped, _ = load_adapted(adapter, model, "float32")
    architecture(wrapped.model.config)  # a base outside the Llama family stops here, before any work
    name, report = "default", None
    if convert:
        report = extract_lora(wrapped, "default", rank or DEFAULT_RANK, new_adapter_name="gguf_lora")
        name = "gguf_lora"
    write_lora_gguf(wrapped, name, out, outtype)
    if merged:
        if report is not None:
            wrapped.delete_adapter(name)  # merge the adapter itself, not its approximation
        write_merged_gguf(wrapped.merge_and_unload(safe_merge=True), base_gguf, merged, outtype)
    shown = base_gguf or (models.default_gguf_file() if models.is_default_model(base_name) else None)
    return ExportResult(out, merged, report, shown)
