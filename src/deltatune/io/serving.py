"""Which serving stacks load a LoRA adapter, each verdict by that server's own loader rule.

Every rule was read from the server's source at the version in `SOURCES`, which the report prints with
the verdict. Where a launch flag decides (vLLM's and SGLang's `--max-lora-rank`), the verdict says yes and
names the value to pass. The rules see an `AdapterInfo`: the adapter's config and its safetensors header
(tensor names and shapes), never the tensor data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

# Where each rule was read (server version, file, function); printed with every verdict.
SOURCES = {
    "vLLM": "vLLM 0.11, vllm/lora/peft_helper.py PEFTHelper.validate_legal + vllm/config/lora.py",
    "SGLang": "SGLang 0.5, srt/lora/lora_manager.py validate_new_adapter + srt/utils/common.py",
    "llama.cpp": "llama.cpp convert_lora_to_gguf.py (b4000 and later) + src/llama-adapter.cpp",
    "Ollama": "Ollama docs/modelfile.md at commit de44997, ADAPTER (GGUF; safetensors for Llama, Mistral, Gemma)",
}
# vLLM's LoRAConfig.max_lora_rank is Literal[1, 8, 16, 32, 64, 128, 256, 320, 512], default 16; an adapter
# loads when its rank <= --max-lora-rank (validate_legal: "LoRA rank r is greater than max_lora_rank").
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
# Ollama's ADAPTER reads a safetensors (PEFT) LoRA only for these base architectures (docs/modelfile.md:
# "Currently supported Safetensor adapters: Llama, Mistral, Gemma"); any base llama.cpp runs takes a GGUF one.
OLLAMA_SAFETENSORS_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM",
                                    "GemmaForCausalLM", "Gemma2ForCausalLM")
# `deltatune export --to gguf` writes the bases whose GGUF layout is llama.cpp's LLAMA (io/gguf_export.py)
GGUF_EXPORT_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
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


CONVERSION_ROUTE = ("`deltatune convert --to lora` makes a LoRA of it by SVD, as `serve --engine vllm` and "
                    "`export --to gguf` do themselves; check the error they print")


def _common(info: AdapterInfo, server: str) -> Verdict:
    """The rules every server here shares: LoRA only (PEFT's LORA layout), no DoRA."""
    verdict = Verdict(server)
    if info.config.get("peft_type") != "LORA":
        verdict.reasons.append(f"{info.config.get('peft_type')} adapters are not supported (LoRA only; "
                               f"{CONVERSION_ROUTE})")
    dora = info.config.get("use_dora") or any(k.endswith("lora_magnitude_vector") for k in info.extra_keys)
    if dora:
        verdict.reasons.append(f"DoRA (use_dora, lora_magnitude_vector) is not supported ({CONVERSION_ROUTE})")
    return verdict


def needs_lora_conversion(info: AdapterInfo) -> bool:
    """True when only a conversion to plain LoRA (compose/extract.py's SVD) makes the adapter loadable by
    the LoRA-only servers: another method, or DoRA."""
    dora = info.config.get("use_dora") or any(k.endswith("lora_magnitude_vector") for k in info.extra_keys)
    return info.config.get("peft_type") != "LORA" or bool(dora)


def as_converted(info: AdapterInfo, rank: int) -> AdapterInfo:
    """What the rules see once compose/extract.py has turned the adapter into a rank-`rank` plain LoRA: its
    config keeps modules_to_save, bias and the base model (extract_lora carries them over), its tensors
    become LoRA pairs. For checking an adapter against a server before the (long) conversion runs."""
    kept = {key: info.config[key] for key in ("modules_to_save", "bias", "base_model_name_or_path")
            if key in info.config}
    return AdapterInfo(info.path, {"peft_type": "LORA", "r": rank, "lora_alpha": rank, **kept}, {}, 0)


def smallest_vllm_rank(rank: int) -> int | None:
    """The smallest value vLLM allows for --max-lora-rank that fits `rank` (None: none does)."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def base_architecture(config: dict) -> str | None:
    """The Transformers class of the adapter's base model (config.json `architectures`), when the adapter
    names the embedded default or a local model folder; None when it cannot be told without a download."""
    from .models import ALIASES  # models.py imports torch; serving's rules are read without it

    name = str(config.get("base_model_name_or_path") or "")
    if name.lower() in ALIASES:
        return "LlamaForCausalLM"
    file = Path(name).expanduser() / "config.json"
    try:
        found = json.loads(file.read_text(encoding="utf-8")).get("architectures") or [None]
    except (OSError, ValueError, AttributeError):
        return None
    return found[0]


def max_rank(info: AdapterInfo) -> int:
    """The largest rank the adapter holds: its LoRA pairs, rank_pattern and r."""
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
    rank = max_rank(info)
    fitting = smallest_vllm_rank(rank)
    if fitting is None:
        verdict.reasons.append(f"rank {rank} > {VLLM_MAX_LORA_RANKS[-1]}, the largest --max-lora-rank")
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        verdict.flags.append(f"--max-lora-rank {fitting}")
        verdict.detail = f"rank {rank} > the default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}"
    else:
        verdict.detail = (f"rank {rank} <= the default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}; "
                          f"the smallest that fits is --max-lora-rank {fitting}")
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
                      f"--max-lora-rank {max_rank(info)} or more and --lora-target-modules "
                      + " ".join(targets))
    return verdict


def _gguf_route(info: AdapterInfo) -> str:
    """How to get a GGUF adapter for this base: our exporter for the Llama family, else llama.cpp's script."""
    if base_architecture(info.config) in GGUF_EXPORT_ARCHITECTURES:
        return "write it with `deltatune export --to gguf`"
    return "convert it with llama.cpp's convert_lora_to_gguf.py (`deltatune export --to gguf` for Llama bases)"


def llama_cpp_verdict(info: AdapterInfo) -> Verdict:
    """llama.cpp: loads GGUF LoRA adapters (general.type=adapter, adapter.type=lora); convert_lora_to_gguf.py
    converts lora_A/lora_B (and lora_embedding_A/B) pairs and norm weights; any other tensor ("Not a lora_A
    or lora_B tensor") stops it. Any rank."""
    verdict = _common(info, "llama.cpp")
    verdict.detail = f"as a GGUF adapter (--lora FILE): {_gguf_route(info)}, any rank"
    kept = re.compile(r"(_layernorm|\.norm)\.weight$|\.base_layer\.weight$")  # converted or skipped by it
    other = [k for k in info.extra_keys if not kept.search(k) and not k.endswith("lora_magnitude_vector")]
    if other:
        verdict.reasons.append(f"tensors that are not lora_A/lora_B, e.g. {other[:2]}")
    return verdict


def ollama_verdict(info: AdapterInfo) -> Verdict:
    """Ollama: `ADAPTER <file>` in a Modelfile takes a GGUF LoRA adapter (llama.cpp's rules above) or, for
    Llama, Mistral and Gemma bases only, the safetensors (PEFT) LoRA folder itself."""
    verdict = Verdict("Ollama", reasons=llama_cpp_verdict(info).reasons)  # a GGUF adapter is llama.cpp's
    arch = base_architecture(info.config)
    if arch in OLLAMA_SAFETENSORS_ARCHITECTURES:
        verdict.detail = f"ADAPTER {info.path} in a Modelfile ({arch} base), or a GGUF adapter"
    else:
        known = f"a {arch} base" if arch else "a base whose architecture is not known here"
        verdict.detail = (f"ADAPTER FILE.gguf in a Modelfile: {_gguf_route(info)} (safetensors adapters only "
                          f"for Llama, Mistral and Gemma bases; this is {known})")
    return verdict


SERVERS = (vllm_verdict, sglang_verdict, llama_cpp_verdict, ollama_verdict)


def serving_compatibility(info: AdapterInfo) -> dict[str, Verdict]:
    """Each server's verdict on this adapter, by the rules in SOURCES."""
    return {verdict.server: verdict for verdict in (rule(info) for rule in SERVERS)}
