"""Every registered method on the tiny decoder (Llama, GPT-2) and encoder-decoder (T5) models, with its
adapter weights randomized (at init many methods are the identity, which would hide a wrong formula).

`build(method, family, tmp_path)` -> a DeltaModel in eval mode; `SUPPORTED[method]` lists the families it
runs on (GPT-2's Transformers Conv1D is refused by LoHa/LoKr/OFT/BOFT, as by `peft`; prefix tuning,
LLaMA-Adapter and X-LoRA serve causal LMs). MODEL_LEVEL are the methods that take over forward/generate.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import deltatune as dt
from tiny_models import tiny_gpt2, tiny_llama, tiny_t5

FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "t5": tiny_t5}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "t5": ["q", "v", "wi"]}
FEED_FORWARD = {"llama": ["down_proj"], "gpt2": ["c_fc"], "t5": ["wi"]}
BITFIT = {"llama": dict(add_missing_bias=True), "gpt2": dict(target_modules=["c_attn", "c_fc", "ln_1"]),
          "t5": dict(target_modules=["q", "v", "wi"], add_missing_bias=True)}
DECODERS, ALL = ("llama", "gpt2"), ("llama", "gpt2", "t5")


def task(family: str) -> str:
    return "SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM"


def layer_config(peft_type: str, **settings):
    return lambda family, _: dt.registered_methods()[peft_type](target_modules=TARGETS[family], **settings)


def bottleneck(model_type: str = "houlsby", **settings):
    return dt.BottleneckConfig(bottleneck_type=model_type, bottleneck_size=4, init_weights=False, **settings)


CONFIGS = {  # method -> (family, tmp_path) -> config (fusion and X-LoRA are built in `build`)
    "LORA": layer_config("LORA", r=4, lora_alpha=8),
    "ADALORA": layer_config("ADALORA", init_r=4, target_r=2, total_step=10, lora_alpha=8),
    "RELORA": layer_config("RELORA", r=4, lora_alpha=8, relora_steps=3, relora_warmup_steps=1),
    "ULORA": layer_config("ULORA", r=4, num_tasks=3, default_task=1),
    "VERA": layer_config("VERA", r=4),
    "LOHA": layer_config("LOHA", r=4, alpha=8),
    "LOKR": layer_config("LOKR", r=4, alpha=8),
    "OFT": layer_config("OFT", r=0, oft_block_size=4),
    "BOFT": layer_config("BOFT", boft_block_size=4),
    "CHILD_TUNING": layer_config("CHILD_TUNING"),
    "IA3": lambda f, _: dt.IA3Config(target_modules=TARGETS[f], feedforward_modules=FEED_FORWARD[f]),
    "BITFIT": lambda f, _: dt.BitFitConfig(**BITFIT[f]),
    "LN_TUNING": lambda f, _: dt.LNTuningConfig(),
    "BOTTLENECK": lambda f, _: bottleneck(),
    "PROMPT_TUNING": lambda f, _: dt.PromptTuningConfig(task_type=task(f), num_virtual_tokens=3),
    "P_TUNING": lambda f, _: dt.PromptEncoderConfig(task_type=task(f), num_virtual_tokens=3,
                                                   encoder_hidden_size=8),
    "PREFIX_TUNING": lambda f, _: dt.PrefixTuningConfig(task_type=task(f), num_virtual_tokens=3),
    "ADAPTION_PROMPT": lambda f, _: dt.AdaptionPromptConfig(adapter_len=3, adapter_layers=2),
    "XLORA": lambda f, tmp: dt.XLoraConfig(task_type="CAUSAL_LM", hidden_size=16, adapters=experts(f, tmp)),
    "BOTTLENECK_FUSION": None,
}
SUPPORTED = {method: ALL for method in CONFIGS}
SUPPORTED.update({m: DECODERS for m in ("PREFIX_TUNING", "ADAPTION_PROMPT", "XLORA")})
SUPPORTED.update({m: ("llama", "t5") for m in ("LOHA", "LOKR", "OFT", "BOFT")})
MODEL_LEVEL = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "XLORA", "BOTTLENECK_FUSION")
CASES = [(method, family) for method in CONFIGS for family in SUPPORTED[method]]


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 5, scale: float = 0.3) -> None:
    """Move every trainable tensor away from its init."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        if param.requires_grad:
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def experts(family: str, tmp_path: Path) -> dict[str, str]:
    """Two random LoRA experts for X-LoRA, saved as adapter directories."""
    directories = {}
    for index, targets in enumerate((TARGETS[family][:1], TARGETS[family][1:])):
        config = dt.LoraConfig(r=2, lora_alpha=4, target_modules=targets)
        expert = dt.get_peft_model(FAMILIES[family](), config)
        randomize(expert, seed=index)
        directories[str(index)] = str(tmp_path / f"expert_{family}_{index}")
        expert.save_pretrained(directories[str(index)])
    return directories


def build(method: str, family: str, tmp_path: Path) -> dt.DeltaModel:
    """`method` on the tiny `family` model, trainable weights randomized, in eval mode."""
    torch.manual_seed(0)
    base = FAMILIES[family]()
    if method == "BOTTLENECK_FUSION":
        model = dt.get_peft_model(base, bottleneck(), adapter_name="a")
        model.add_adapter("b", bottleneck("pfeiffer", non_linearity="gelu"))
        model.set_adapter("b")
        randomize(model, seed=1)
        dt.add_fusion(model, ["a", "b"], "ab")
    else:
        model = dt.get_peft_model(base, CONFIGS[method](family, tmp_path))
    randomize(model)
    return model.eval()
