"""`deltatune inspect`: what an adapter directory holds, whether deltatune's loader accepts it, and which
serving stacks load it.

Reads adapter_config.json and the safetensors header only (no tensor data), so it is instant even for
large adapters. `check_adapter` applies the loader's own checks (io/adapter_files.py: the config through
`config_from_dict`, the safetensors header through the same reader) plus what the loader finds only
against a model (a lora_A without its lora_B, a rank the config does not say) and returns one line per
problem.

Each serving verdict follows that server's loader, read from the file and version named in `SOURCES`
(printed beside the verdict). Where a server takes a launch flag that decides (vLLM's and SGLang's
`--max-lora-rank`), the verdict names the value to pass instead of saying no.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from .core.config import DeltaConfig, DeltaConfigError, config_from_dict
from .io.adapter_files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError

# Where each rule was read (server version, file, function); printed with every verdict.
SOURCES = {
    "vLLM": "vLLM 0.11, vllm/lora/peft_helper.py PEFTHelper.validate_legal + vllm/config/lora.py",
    "SGLang": "SGLang 0.5, srt/lora/lora_manager.py validate_new_adapter + srt/utils/common.py",
    "llama.cpp": "llama.cpp convert_lora_to_gguf.py (b4000 and later)",
}
# vLLM's LoRAConfig.max_lora_rank is Literal[1, 8, 16, 32, 64, 128, 256, 320, 512], default 16; an adapter
# loads when its rank <= --max-lora-rank (validate_legal: "LoRA rank r is greater than max_lora_rank").
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# SGLang's SUPPORTED_LORA_TARGET_MODULES, plus the fused names its models map them onto.
SGLANG_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                  "gate_up_proj"}
LORA_PAIR = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                       r"(?:\.weight)?$")


@dataclass
class AdapterInfo:
    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]
    size_bytes: int
    modules: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)  # module -> {"A"|"B": shape}
    extra_keys: list[str] = field(default_factory=list)  # tensors that are not lora_A/lora_B halves

    @property
    def method(self) -> str:
        kind = str(self.config.get("peft_type", "?"))
        return f"{kind} (DoRA)" if kind == "LORA" and self.config.get("use_dora") else kind

    @property
    def ranks(self) -> set[int]:
        """Ranks of the LoRA pairs in the file (rows of lora_A / lora_embedding_A)."""
        return {halves["A"][0] for halves in self.modules.values() if "A" in halves}

    @property
    def parameters(self) -> int:
        total = 0
        for shape in self.shapes.values():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total


# ---------------------------------------------------------------- reading and checking
def _inside(file: Path, root: Path) -> bool:
    """Whether `file`, links followed, stays inside `root` (or is a Hugging Face cache blob of the
    snapshot `root` lies in: snapshots/<rev>/x -> ../../blobs/<sha>)."""
    target, root = file.resolve(), root.resolve()
    if target.is_relative_to(root):
        return True
    return target.parent.name == "blobs" and root.is_relative_to(target.parent.parent)


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
            problems.append(why if key in said else f"{source}: {key}={data[key]!r}: {said}")
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
    problems = []
    for module, halves in info.modules.items():
        if set(halves) != {"A", "B"}:
            missing = "lora_B" if "A" in halves else "lora_A"
            problems.append(f"{info.path / WEIGHTS_NAME}: {module} has no {missing} (a LoRA needs both halves)")
            continue
        rank, rank_b = halves["A"][0], halves["B"][1]  # A: (r, in, ...), B: (out, r, ...)
        expected = _expected_rank(config, module)
        if rank != rank_b:
            problems.append(f"{info.path / WEIGHTS_NAME}: {module}: lora_A has rank {rank}, lora_B {rank_b}")
        elif info.config.get("peft_type") == "LORA" and rank != expected:
            problems.append(f"{info.path / WEIGHTS_NAME}: {module} has rank {rank}, but {CONFIG_NAME} gives it "
                            f"r={expected}")
    return problems


def check_adapter(directory: str | os.PathLike) -> tuple[AdapterInfo | None, list[str], list[str]]:
    """Read and check the adapter in `directory` as deltatune's loader would.

    Returns:
        (info, problems, notes): `info` is None when the files cannot be read at all; `problems` has one
        line per thing the loader refuses (empty: it loads); `notes` are the loader's warnings (keys it
        ignores).
    """
    info, problems, notes = _check(Path(directory))
    return info, [" ".join(p.split()) for p in problems], notes  # one line each, whatever the source said


def _check(path: Path) -> tuple[AdapterInfo | None, list[str], list[str]]:
    if not path.is_dir():
        return None, [f"{path}: no {CONFIG_NAME} found (not an adapter directory)"], []
    config_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    problems = []
    for file in (config_file, weights):
        if not file.is_file():
            problems.append(f"{path}: no {file.name} found")
        elif not _inside(file, path):
            problems.append(f"{file}: a link to {file.resolve()}, outside the adapter directory; refused "
                            "(copy the file in instead)")
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


# ---------------------------------------------------------------- serving rules, one function per server
@dataclass
class Verdict:
    """One server's answer: loads or not, why not, the launch flags it needs, and what else to know."""

    server: str
    reasons: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def loads(self) -> bool:
        return not self.reasons

    def lines(self) -> list[str]:
        """The verdict, then the rule's source on its own line."""
        if self.reasons:
            answer = "no - " + "; ".join(self.reasons)
        else:
            answer = "yes" + (" with " + " ".join(self.flags) if self.flags else "")
            answer += f" ({self.detail})" if self.detail else ""
        return [f"{self.server + ':':10s} {answer}", f"{'':10s} rule: {SOURCES[self.server]}"]


def _common(info: AdapterInfo, server: str) -> Verdict:
    """The rules every server here shares: LoRA only (PEFT's LORA layout), no DoRA."""
    verdict = Verdict(server)
    if info.config.get("peft_type") != "LORA":
        verdict.reasons.append(f"{info.config.get('peft_type')} adapters are not supported (LoRA only)")
    dora = info.config.get("use_dora") or any(k.endswith("lora_magnitude_vector") for k in info.extra_keys)
    if dora:
        verdict.reasons.append("DoRA (use_dora, lora_magnitude_vector) is not supported")
    return verdict


def _max_rank(info: AdapterInfo) -> int:
    pattern = [r for r in (info.config.get("rank_pattern") or {}).values() if isinstance(r, int)]
    return max([*info.ranks, *pattern, info.config.get("r") or 0])


def vllm_verdict(info: AdapterInfo) -> Verdict:
    """vLLM: validate_legal refuses modules_to_save, DoRA, bias != "none" and r > --max-lora-rank;
    tensors other than lora_A/lora_B (lora_embedding_A/B) fail its weight-name parser."""
    verdict = _common(info, "vLLM")
    if info.config.get("modules_to_save"):
        verdict.reasons.append(f"modules_to_save={info.config['modules_to_save']} (vLLM needs it empty)")
    full = [k for k in info.extra_keys if not k.endswith("lora_magnitude_vector")]
    if full and not info.config.get("modules_to_save"):
        verdict.reasons.append(f"tensors that are not LoRA pairs, e.g. {full[0]}")
    if info.config.get("bias", "none") != "none":
        verdict.reasons.append(f"bias={info.config['bias']!r}: adapter bias is not supported")
    rank = _max_rank(info)
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not fitting:
        verdict.reasons.append(f"rank {rank} > {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank")
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        verdict.flags.append(f"--max-lora-rank {fitting[0]}")
        verdict.detail = f"rank {rank} > the default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}"
    else:
        verdict.detail = (f"rank {rank} <= the default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}; "
                          f"the smallest that fits is --max-lora-rank {fitting[0]}")
    return verdict


def sglang_verdict(info: AdapterInfo) -> Verdict:
    """SGLang: validate_new_adapter refuses DoRA; LoRA runs on SUPPORTED_LORA_TARGET_MODULES only; the
    rank and targets of adapters loaded after startup must fit --max-lora-rank / --lora-target-modules
    (inferred from --lora-paths when unset)."""
    verdict = _common(info, "SGLang")
    full = [k for k in info.extra_keys if not k.endswith("lora_magnitude_vector")]
    saved = info.config.get("modules_to_save")
    if saved or full:
        what = f"modules_to_save={saved}" if saved else f"full tensors such as {full[0]}"
        verdict.reasons.append(f"{what}: SGLang loads only lora_A/lora_B")
    targets = sorted({m.rsplit(".", 1)[-1] for m in info.modules})
    other = sorted(set(targets) - SGLANG_MODULES)
    if other:
        verdict.reasons.append(f"targets {other}; SGLang serves LoRA on q/k/v/o and gate/up/down projections")
    if info.config.get("bias", "none") != "none":
        verdict.reasons.append(f"bias={info.config['bias']!r}: trained biases are not loaded")
    verdict.detail = (f"at startup through --lora-paths; to load it later, start the server with "
                      f"--max-lora-rank {_max_rank(info)} or more and --lora-target-modules {' '.join(targets)}")
    return verdict


def llama_cpp_verdict(info: AdapterInfo) -> Verdict:
    """llama.cpp: convert_lora_to_gguf.py converts lora_A/lora_B (and lora_embedding_A/B) pairs and norm
    weights; any other tensor ("Not a lora_A or lora_B tensor") stops it. Any rank."""
    verdict = _common(info, "llama.cpp")
    verdict.detail = "convert it with llama.cpp's convert_lora_to_gguf.py, any rank"
    other = [k for k in info.extra_keys if not re.search(r"(_layernorm|\.norm)\.weight$|\.base_layer\.weight$", k)
             and not k.endswith("lora_magnitude_vector")]
    if other:
        verdict.reasons.append(f"tensors that are not lora_A/lora_B, e.g. {other[:2]}")
    return verdict


SERVERS = (vllm_verdict, sglang_verdict, llama_cpp_verdict)


def serving_compatibility(info: AdapterInfo) -> dict[str, Verdict]:
    """Each server's verdict on this adapter, by the rules in SOURCES."""
    return {verdict.server: verdict for verdict in (rule(info) for rule in SERVERS)}


# ---------------------------------------------------------------- the report
def format_report(info: AdapterInfo, notes: list[str] = ()) -> str:
    targets = sorted({m.rsplit(".", 1)[-1] for m in info.modules})
    ranks = ", ".join(str(r) for r in sorted(info.ranks)) or "-"
    lines = [
        f"adapter:      {info.path}",
        f"method:       {info.method}",
        f"base model:   {info.config.get('base_model_name_or_path') or '?'}",
        f"rank:         {ranks} (lora_alpha {info.config.get('lora_alpha', '-')})",
        f"targets:      {', '.join(targets) or '-'} ({len(info.modules)} modules)",
        f"trainable:    {info.parameters:,d} parameters in {len(info.shapes)} tensors",
        f"file size:    {info.size_bytes / 2**20:.2f} MiB ({WEIGHTS_NAME})",
    ]
    if info.extra_keys:
        lines.append(f"other tensors: {len(info.extra_keys)} (e.g. {info.extra_keys[0]})")
    lines += [f"note:         {note}" for note in notes]
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
