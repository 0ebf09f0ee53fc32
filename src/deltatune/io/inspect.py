"""`deltatune inspect`: what an adapter directory holds, whether deltatune's loader accepts it, and which
serving stacks load it (the rules are in io/serving.py).

Reads adapter_config.json and the safetensors header only (no tensor data), so it is instant even for
large adapters. `check_adapter` applies the loader's own checks (io/adapter_files.py: the config through
`config_from_dict`, the safetensors header through the same reader) plus what the loader finds only
against a model (a lora_A without its lora_B, a rank the config does not say), and gives one line per
problem.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..core.config import DeltaConfig, DeltaConfigError, config_from_dict
from .adapter_files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, check_save_finished, inside_directory
from .pipelines import diffusers_class_name, is_pipeline_folder
from .serving import LORA_PAIR, SOURCES, AdapterInfo, Verdict, serving_compatibility

__all__ = ["SOURCES", "AdapterInfo", "Verdict", "adapter_report", "check_adapter", "format_report",
           "serving_compatibility"]


# Where a saved key's module path ends and the adapter's own tensor begins: PEFT's local tensor names of
# every layer-level method (the LoRA family with DoRA, AdaLoRA and ULoRA, LoHa, LoKr, OFT, BOFT, VeRA, IA3,
# LN tuning, BitFit, bottleneck adapters and their fusion, Child-Tuning, LLaMA-Adapter). A new method's
# names go here: tests/test_inspect_methods.py inspects a saved adapter of every registered method.
ADAPTER_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(.+?)\.(?:lora_\w+|hada_\w+|lokr_\w+|oft_\w+|boft_\w+|vera_lambda_\w+"
    r"|ia3_l|ln_tuning_layers|bitfit_bias|adapter_down|adapter_up|fusion_\w+|child_\w+|ulora_\w+"
    r"|adaption_\w+)"
    r"(?:\..+)?$")
# The config fields that say how large each method's update is, in the order `rank:` shows them: r and
# alpha (LoRA family, LoHa, LoKr, VeRA), AdaLoRA's budget, ULoRA's tasks, OFT/BOFT blocks, bottleneck
# sizes, Child-Tuning's share, soft-prompt lengths, LLaMA-Adapter's prompt, X-LoRA's experts, fusion's inputs.
SIZE_FIELDS = ("r", "lora_alpha", "alpha", "init_r", "target_r", "num_tasks", "oft_block_size",
               "boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "bottleneck_type",
               "bottleneck_size", "reduction_factor", "child_tuning_mode", "reserve_p", "num_virtual_tokens",
               "encoder_hidden_size", "adapter_len", "adapter_layers", "adapters", "adapter_names")
UNSET_WHEN_ZERO = {"r", "oft_block_size", "boft_block_num"}  # OFT/BOFT: 0 = derived from the other setting


# ---------------------------------------------------------------- reading and checking
def _field_problems(data: dict, source: str) -> list[str]:
    """The loader's config validation, one line per bad field: each field is checked on its own beside
    the fields that pass alone, so one bad field does not hide another."""
    def error(subset: dict) -> str | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                config_from_dict(subset, source)
            except DeltaConfigError as err:
                return str(err)
            except (TypeError, ValueError, AttributeError, KeyError) as err:  # a check that met an odd type
                return f"{source}: {type(err).__name__}: {err}"
        return None

    whole = error(data)
    if whole is None:
        return []
    base = {"peft_type": data["peft_type"]}
    if error(base):  # an unknown peft_type: nothing else can be checked
        return [error(base)]
    alone = {key: error({**base, key: value}) for key, value in data.items() if key != "peft_type"}
    good = {key: data[key] for key, why in alone.items() if why is None}
    problems = []
    for key, why in alone.items():
        why = why and error({**base, **good, key: data[key]})
        if why:  # name the field when the loader's message does not
            said = why.removeprefix(f"{source}: ")
            named = re.search(rf"\b{re.escape(key)}\b", said)
            problems.append(why if named else f"{source}: {key}={data[key]!r}: {said}")
    return problems or [whole]


def _read_config(file: Path) -> tuple[dict | None, DeltaConfig | None, list[str], list[str]]:
    """(JSON, config the loader builds from it, problems, notes) for adapter_config.json."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return None, None, [f"{file}: not valid JSON ({err})"], []
    except OSError as err:
        return None, None, [f"{file}: cannot be read ({err.strerror or err})"], []
    if not isinstance(data, dict):
        return None, None, [f"{file}: expected a JSON object, got {type(data).__name__}"], []
    if "peft_type" not in data:
        return None, None, [f"{file}: missing required key 'peft_type'"], []
    problems = _field_problems(data, str(file))
    if problems:
        return None, None, problems, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parsed = config_from_dict(data, str(file))
    return data, parsed, [], [str(w.message) for w in caught]


def _read_shapes(file: Path) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, []
    except (SafetensorError, OSError, ValueError) as err:
        return {}, [f"{file}: unreadable or corrupted safetensors file ({err})"]


def _expected_rank(config: DeltaConfig, module: str) -> int | None:
    """The rank the config gives `module`: a matching rank_pattern entry (peft's rule: the key matches
    the module path or a dotted suffix of it), else r."""
    for key, rank in (getattr(config, "rank_pattern", None) or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?({key})", module):
                return rank
        except re.error:
            if module == key or module.endswith("." + key):
                return rank
    return getattr(config, "r", None)


def _pair_problems(info: AdapterInfo, config: DeltaConfig) -> list[str]:
    """What the loader would refuse once it met the model: half pairs, and ranks the config does not say."""
    problems, file = [], info.path / WEIGHTS_NAME
    for module, halves in info.modules.items():
        if set(halves) != {"A", "B"}:
            missing = "lora_B" if "A" in halves else "lora_A"
            problems.append(f"{file}: {module} has no {missing} (a LoRA needs both halves)")
            continue
        rank, rank_b = halves["A"][0], halves["B"][1]  # A: (r, in, ...), B: (out, r, ...)
        expected = _expected_rank(config, module)
        if rank != rank_b:
            problems.append(f"{file}: {module}: lora_A has rank {rank}, lora_B {rank_b}")
        elif info.config.get("peft_type") == "LORA" and rank != expected:
            problems.append(f"{file}: {module} has rank {rank}, but {CONFIG_NAME} gives it r={expected}")
    return problems


def check_adapter(directory: str | os.PathLike) -> tuple[AdapterInfo | None, list[str], list[str]]:
    """Read and check the adapter in `directory` as deltatune's loader would.

    Returns:
        (info, problems, notes): `info` is None when the files cannot be read at all; `problems` has one
        line per thing the loader refuses (empty: it loads); `notes` are the loader's warnings (keys it
        ignores).
    """
    info, problems, notes = _check(Path(directory))
    return info, [re.sub(r"\s*\n\s*", " ", p) for p in problems], notes  # one line each, always


def _check(path: Path) -> tuple[AdapterInfo | None, list[str], list[str]]:
    if not path.is_dir():
        return None, [f"{path}: no {CONFIG_NAME} found (not an adapter directory)"], []
    config_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    problems = []
    for file in (config_file, weights):
        if not file.is_file():
            problems.append(f"{path}: no {file.name} found")
        elif not inside_directory(file, path):
            problems.append(f"{file}: a link to {file.resolve()}, outside the adapter directory; refused "
                            "(copy the file in instead)")
    try:
        check_save_finished(path)
    except AdapterFileError as err:
        problems.append(str(err))
    if problems:
        return None, problems, []
    config, parsed, config_problems, notes = _read_config(config_file)
    shapes, weight_problems = _read_shapes(weights)
    problems = config_problems + weight_problems
    if problems:
        return None, problems, notes
    info = AdapterInfo(path, config, shapes, weights.stat().st_size)
    for key, shape in shapes.items():
        found = LORA_PAIR.match(key)
        if found:
            info.modules.setdefault(found.group(1), {})[found.group(2)[-1]] = shape
        else:
            info.extra_keys.append(key)
    info.modules = dict(sorted(info.modules.items()))
    return info, _pair_problems(info, parsed), notes


# ---------------------------------------------------------------- the report
def adapted_modules(info: AdapterInfo) -> list[str]:
    """The module paths the file adapts (read from its tensor names), sorted."""
    return sorted({found.group(1) for key in info.shapes if (found := ADAPTER_TENSOR.match(key))})


def size_settings(config: dict) -> list[str]:
    """The method's own size settings from its config, as "name value" (SIZE_FIELDS; unset ones left out)."""
    shown = []
    for name in SIZE_FIELDS:
        value = config.get(name)
        if value is None or value is False or value in ("", [], {}):
            continue
        if name in UNSET_WHEN_ZERO and value == 0:
            continue
        if name == "reduction_factor" and config.get("bottleneck_size"):
            continue  # the explicit size wins
        if name == "encoder_hidden_size" and config.get("prefix_projection") is False:
            continue  # prefix tuning uses it only with a projection
        if isinstance(value, dict):  # X-LoRA's experts: name -> directory
            value = f"{len(value)} ({', '.join(map(str, value))})"
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        shown.append(f"{name} {value}")
    return shown


def rank_text(info: AdapterInfo) -> str:
    """The ranks of the LoRA pairs in the file with the other size settings in brackets (LoRA family),
    else the method's size settings, or "-" for methods without one (IA3, LN tuning, BitFit)."""
    settings = size_settings(info.config)
    if info.ranks:
        others = [s for s in settings if not s.startswith("r ")]
        return ", ".join(str(r) for r in sorted(info.ranks)) + (f" ({', '.join(others)})" if others else "")
    return ", ".join(settings) or "-"


def suffix_name(module: str) -> str:
    """The name a target list uses for `module`: its last part, with the parent for an index (to_out.0)."""
    parts = module.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def image_tools_lines(info: AdapterInfo) -> list[str]:
    """For an adapter on a diffusers model (PEFT layout), which image tools take it after which export."""
    method = info.method
    dora = bool(info.config.get("use_dora"))
    if method == "LORA":
        diffusers = "yes, after `deltatune export --to diffusers` (pytorch_lora_weights.safetensors)"
        if dora:
            diffusers += "; DoRA on a text encoder does not load there"
        kohya = "yes, after `deltatune export --to kohya`" + (" (DoRA as dora_scale)" if dora else "")
        lycoris = kohya
    elif method in ("LOHA", "LOKR"):
        diffusers = "no - diffusers' load_lora_weights reads LoRA and DoRA only (`deltatune convert --to lora` first)"
        kohya = lycoris = "yes, after `deltatune export --to kohya` (written in the LyCORIS format)"
    else:
        diffusers = kohya = lycoris = (f"no - {method} has no file format there; `deltatune convert --to lora` "
                                       "makes a LoRA by SVD")
    return ["image tools (a diffusers model's adapter; `deltatune inspect FILE.safetensors` checks an exported "
            "file by each tool's own rule):",
            f"  diffusers:     {diffusers}", f"  kohya readers: {kohya}", f"  LyCORIS:       {lycoris}"]


def target_text(info: AdapterInfo) -> str:
    modules = adapted_modules(info)
    if not modules:  # soft prompts, X-LoRA's gate: the adapter sits at model level
        keys = sorted(info.shapes)
        more = f" and {len(keys) - 1} more tensors" if len(keys) > 1 else ""
        return f"- (model level: {keys[0]}{more})"
    names = sorted({suffix_name(m) for m in modules})
    return f"{', '.join(names)} ({len(modules)} modules)"


def format_report(info: AdapterInfo, notes: list[str] = ()) -> str:
    lines = [
        f"adapter:      {info.path}",
        f"method:       {info.method}",
        f"base model:   {info.config.get('base_model_name_or_path') or '?'}",
        f"rank:         {rank_text(info)}",
        f"targets:      {target_text(info)}",
        f"trainable:    {info.parameters:,d} parameters in {len(info.shapes)} tensors",
        f"file size:    {info.size_bytes / 2**20:.2f} MiB ({WEIGHTS_NAME})",
    ]
    if info.extra_keys:
        lines.append(f"other tensors: {len(info.extra_keys)} (e.g. {info.extra_keys[0]})")
    lines += [f"note:         {note}" for note in notes]
    base = info.config.get("base_model_name_or_path")
    if base and (is_pipeline_folder(base) or diffusers_class_name(base)):
        return "\n".join(lines + image_tools_lines(info))
    lines.append("serving (each verdict follows the server's own loader, read from the version named):")
    lines += ["  " + line for verdict in serving_compatibility(info).values() for line in verdict.lines()]
    return "\n".join(lines)


def adapter_report(directory: str | os.PathLike) -> str:
    """The report `deltatune inspect` prints on the adapter in `directory`.

    Raises:
        AdapterFileError: the loader would refuse the adapter; the message has one line per problem.
    """
    info, problems, notes = check_adapter(directory)
    if problems:
        raise AdapterFileError("\n".join(problems))
    return format_report(info, notes)
