"""`deltatune serve --engine vllm`: hand the adapters to vLLM's own OpenAI server; no engine of our own.

1. Every adapter is checked against vLLM's loader rule (io/serving.py `vllm_verdict`, as `inspect` prints it)
   before anything long runs. One vLLM cannot load only because of its method (any non-LoRA method, DoRA)
   is turned into a plain LoRA by compose/extract.py's truncated SVD (`deltatune convert --to lora`), and
   its relative Frobenius error is reported; any other refusal (modules_to_save, a trained bias, a rank
   over 512) stops the hand-off with vLLM's reason.
2. A set-up folder is written: the converted adapters (adapters/NAME), `vllm_setup.json` (the command, each
   adapter's source, method, rank and error) and `launch.sh`. The command serves the base under the name
   `base` and each adapter under its own name (`--lora-modules NAME=DIR ...`, `--enable-lora`,
   `--max-lora-rank` = the smallest value vLLM allows that fits every adapter, `--max-loras` = the adapter
   count, so one batch can mix all of them). vLLM reads a Transformers model folder: the embedded SmolLM2 is
   given as its de-quantized Transformers folder (io/models.py `ensure_default_model`), any other base as
   the local folder `--model` resolves to.
3. Where `vllm` imports, this process becomes vLLM's server (os.execv); the API key travels as the
   VLLM_API_KEY environment variable vLLM reads, never in the command line or the files. Where it does not,
   the set-up stays written, the command is printed, and the error names the `vllm` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..compose.extract import convert_to_lora, fit_warning
from ..core.config import DeltaConfigError
from ..io import models
from ..io.adapter_files import AdapterFileError
from ..io.atomic import discard_folder, write_json, write_text
from ..io.inspect import check_adapter
from ..io.serving import as_converted, max_rank, needs_lora_conversion, smallest_vllm_rank, vllm_verdict
from .adapters import BASE_MODEL
from .command import parse_adapters

VLLM_SERVER = "vllm.entrypoints.openai.api_server"  # `python -m` this: vLLM's OpenAI-compatible server
INSTALL_HINT = "pip install 'deltatune[vllm]'"
SETUP_FILE, LAUNCH_FILE = "vllm_setup.json", "launch.sh"
DEFAULT_RANK = 16  # the rank a converted adapter gets unless told: vLLM's default --max-lora-rank


@dataclass
class HandedAdapter:
    """One adapter as vLLM gets it: `path` is the source itself, or its conversion in the set-up folder."""

    name: str
    source: str
    path: str
    method: str
    rank: int
    converted: bool = False
    relative_error: float | None = None  # the SVD's ||delta - B A||_F / ||delta||_F over all layers


def _plan(adapters: dict[str, str], rank: int) -> dict[str, tuple[object, bool]]:
    """{name: (AdapterInfo, needs conversion)}, after vLLM's rule accepted each adapter (converted where
    needed). Raises AdapterFileError with vLLM's reasons, before any model loads."""
    plan, refused = {}, []
    for name, path in adapters.items():
        info, problems, _ = check_adapter(path)
        if problems:
            refused += [f"{name}: {p}" for p in problems]
            continue
        convert = needs_lora_conversion(info)
        reasons = vllm_verdict(as_converted(info, rank) if convert else info).reasons
        refused += [f"{name} ({path}): vLLM cannot load it: {why}" for why in reasons]
        plan[name] = (info, convert)
    if refused:
        raise AdapterFileError("\n".join(refused))
    return plan


def base_model_folder(model: str | None) -> Path:
    """The Transformers folder vLLM loads: the embedded SmolLM2 de-quantized (converted once, cached), or the
    local folder `model` names (io/models.py `resolve_model`)."""
    return models.ensure_default_model() if model is None else models.resolve_model(model)


def vllm_command(base: Path, adapters: list[HandedAdapter], host: str, port: int) -> list[str]:
    """vLLM's server command line for `adapters` on `base`."""
    rank = smallest_vllm_rank(max(a.rank for a in adapters))
    return [sys.executable, "-m", VLLM_SERVER, "--model", str(base), "--served-model-name", BASE_MODEL,
            "--enable-lora", "--lora-modules", *(f"{a.name}={a.path}" for a in adapters),
            "--max-lora-rank", str(rank), "--max-loras", str(len(adapters)), "--host", host, "--port", str(port)]


def _claim(folder: Path) -> None:
    """An empty folder at `folder`; an earlier set-up there (its vllm_setup.json) is replaced, anything else
    is refused."""
    if folder.exists():
        if not folder.is_dir() or (any(folder.iterdir()) and not (folder / SETUP_FILE).is_file()):
            raise FileExistsError(f"--setup-dir {folder}: exists and holds something other than a vLLM set-up")
        discard_folder(folder)
    folder.mkdir(parents=True)


def write_setup(adapters: dict[str, str], model: str | None, folder: str | os.PathLike, host: str = "127.0.0.1",
                port: int = 8000, rank: int | None = None) -> tuple[list[str], list[HandedAdapter]]:
    """Check and convert the adapters and write the vLLM set-up into `folder` (see the module docstring).

    Returns:
        (the command line, the adapters as handed over).

    Raises:
        AdapterFileError: an adapter vLLM refuses for a reason a conversion does not remove, or unreadable.
        DeltaConfigError: a bad rank. FileExistsError: `folder` holds something else.
    """
    rank = DEFAULT_RANK if rank is None else rank
    if isinstance(rank, bool) or not isinstance(rank, int) or smallest_vllm_rank(rank) is None or rank <= 0:
        raise DeltaConfigError(f"--lora-rank {rank}: must be a positive integer <= 512 (vLLM's largest rank)")
    plan = _plan(adapters, rank)
    base = base_model_folder(model)
    folder = Path(folder)
    _claim(folder)
    handed = []
    for name, (info, convert) in plan.items():
        source = str(Path(adapters[name]).resolve())
        if not convert:
            handed.append(HandedAdapter(name, source, source, info.method, max_rank(info)))
            continue
        target = (folder / "adapters" / name).resolve()
        report = convert_to_lora(out=target, rank=rank, adapter=source, base_model=str(base))
        handed.append(HandedAdapter(name, source, str(target), info.method, rank, True, report.overall_error))
    command = vllm_command(base, handed, host, port)
    write_json(folder / SETUP_FILE, {"command": command, "base_model": str(base),
                                     "adapters": [asdict(a) for a in handed]})
    write_text(folder / LAUNCH_FILE, "#!/bin/sh\n# vLLM's server with the adapters deltatune handed over; an API "
               "key goes in $VLLM_API_KEY (vLLM reads it)\nexec " + shlex.join(command) + "\n")
    (folder / LAUNCH_FILE).chmod(0o755)
    return command, handed


def describe(handed: list[HandedAdapter]) -> list[str]:
    lines = []
    for a in handed:
        how = (f"converted from {a.method} to LoRA rank {a.rank}, relative Frobenius error {a.relative_error:.4f}"
               if a.converted else f"{a.method} rank {a.rank}, as it is")
        lines.append(f"  {a.name}: {how} ({a.path})")
        warning = fit_warning(a.relative_error, a.rank) if a.converted else None
        lines += [f"    {warning} (--lora-rank)"] if warning else []
    return lines


def run(args: argparse.Namespace) -> int:
    """`deltatune serve --engine vllm`: write the set-up, then become vLLM's server (see the module docstring).

    Reads the `serve` options model, adapter (NAME=DIR strings), host, port, api_key, setup_only, setup_dir
    and lora_rank.

    Raises:
        ModuleNotFoundError: vLLM is not installed (the set-up is written; the message names the extra and
            the command).
    """
    adapters = parse_adapters(args.adapter or [])
    if not adapters:
        raise DeltaConfigError("--engine vllm needs at least one --adapter NAME=DIR (vLLM serves the base alone "
                               "without deltatune)")
    folder = Path(args.setup_dir)
    command, handed = write_setup(adapters, args.model, folder, args.host, args.port, args.lora_rank)
    print(f"vLLM set-up written to {folder} ({SETUP_FILE}, {LAUNCH_FILE}); adapters:")
    print("\n".join(describe(handed)))
    if args.setup_only:
        print(shlex.join(command))
        return 0
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError(f"vLLM is not installed here ({INSTALL_HINT}); the set-up is in {folder}, "
                                  f"start it where vLLM is installed with: {shlex.join(command)}")
    if args.api_key:
        os.environ["VLLM_API_KEY"] = args.api_key  # not on the command line, where `ps` shows it
    print(f"starting vLLM: {shlex.join(command)}", flush=True)
    sys.stderr.flush()
    os.execv(command[0], command)
    return 0  # not reached: execv replaces this process
