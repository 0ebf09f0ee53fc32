"""The conformance table's data: tiny model families, base kinds, and one row per method setting.

tests/test_conformance.py runs every (row, family, base kind) case through the same checks. A row says
which families and base kinds its method supports and which promises it makes (identity at init, merge);
a registered method without a row fails `test_every_registered_method_has_a_row`. To give a new method or
model every check, add one `Row` here (or one `Family`).

Quantized base kinds run on `llama64` (hidden 64): bitsandbytes' CPU 4-bit kernel and HQQ's groups need
rows of whole 64-value blocks, and narrower layers stay float (tests/test_quant.py checks that)."""

from __future__ import annotations

import copy
import functools
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from tiny_diffusion import (
    flux_batch,
    latent_batch,
    sd3_batch,
    tiny_clip_text_encoder,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)
from tiny_diffusion import tiny_unet as tiny_sd_unet
from tiny_models import VOCAB, tiny_bert_cls, tiny_convnet, tiny_gpt2, tiny_llama, tiny_t5
from tiny_vision import tiny_unet, tiny_vit

FLOAT, QUANTIZED = "float", ("nf4", "hqq4")  # and "int8" for the LoRA family (LLM.int8 on CPU)


@dataclass(frozen=True)
class Family:
    """A tiny model kind: how to build it and feed it, and which model-level checks apply."""

    build: Callable[[], nn.Module]
    input_name: str  # "input_ids", "pixel_values" or "pixels"
    task_type: str | None
    linear: tuple[str, ...]  # target_modules for methods that adapt linear layers
    decoder: str | None = None  # "causal" or "seq2seq": greedy generate == stepwise greedy forward
    rope: bool = False  # relative positions: left padding keeps a row's logits too
    checkpointing: bool = True  # Transformers' gradient checkpointing applies
    batch: Callable[[int], dict] | None = None  # keyword inputs for n rows (diffusers denoisers)

    @property
    def text(self) -> bool:
        return self.input_name == "input_ids"


def llama64(seed: int = 0) -> LlamaForCausalLM:
    """2-layer Llama, hidden 64, intermediate 128: every linear layer is whole 64-value blocks."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float().eval()


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' Attention
CONTEXT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj")  # the DiTs' text-stream projections
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2")
FAMILIES = {
    "llama": Family(tiny_llama, "input_ids", "CAUSAL_LM", ("q_proj", "v_proj", "down_proj"), "causal", True),
    "gpt2": Family(tiny_gpt2, "input_ids", "CAUSAL_LM", ("c_attn", "c_fc"), "causal"),
    "bert": Family(tiny_bert_cls, "input_ids", "SEQ_CLS", ("query", "value")),
    "t5": Family(tiny_t5, "input_ids", "SEQ_2_SEQ_LM", ("q", "v", "wi"), "seq2seq"),
    "vit": Family(tiny_vit, "pixel_values", None, ("q_proj", "v_proj")),
    "convnet": Family(tiny_convnet, "pixels", None, ("conv2d", "conv1d", "fc"), checkpointing=False),
    "unet": Family(tiny_unet, "pixels", None, ("conv_in", "down", "mid", "proj_in", "up", "conv_out"),
                   checkpointing=False),
    # diffusers' own models (tests/tiny_diffusion.py): attention, feed-forward, and the UNet's ResNet convs
    "sd_unet": Family(tiny_sd_unet, "sample", None, (*ATTENTION, *FEED_FORWARD, "proj_in", "proj_out", "conv1",
                                                     "conv2", "conv_shortcut"),
                      checkpointing=False, batch=lambda n: latent_batch(n)),
    # the tiny SD3's one block is its last (context_pre_only): the text queries (add_q_proj) reach no output
    "sd3": Family(tiny_sd3_transformer, "hidden_states", None, (*ATTENTION, *CONTEXT_ATTENTION[1:], *FEED_FORWARD),
                  checkpointing=False, batch=lambda n: sd3_batch(n)),
    "flux": Family(tiny_flux_transformer, "hidden_states", None, (*ATTENTION, *CONTEXT_ATTENTION, "to_add_out",
                                                                  *FEED_FORWARD, "proj_mlp",
                                                                  "single_transformer_blocks.0.proj_out"),
                   checkpointing=False, batch=lambda n: flux_batch(n)),
    "clip_text": Family(tiny_clip_text_encoder, "input_ids", None, ("q_proj", "k_proj", "v_proj", "out_proj",
                                                                   "fc1", "fc2")),
}
DIFFUSION = ("sd_unet", "sd3", "flux", "clip_text")  # the image-model families
ALL = ("llama", "gpt2", "bert", "t5", "vit", "convnet")
TEXT = ("llama", "gpt2", "bert", "t5")


@functools.cache
def _pristine(family: str, base: str) -> nn.Module:
    if base == FLOAT:
        return FAMILIES[family].build().requires_grad_(False)
    from deltatune import quant

    return quant.quantize(llama64(), base).requires_grad_(False)


def base_model(family: str, base: str = FLOAT) -> nn.Module:
    """A fresh, frozen copy of the family's tiny model on `base` (float, or llama64 quantized)."""
    return copy.deepcopy(_pristine(family, base))


@dataclass(frozen=True)
class Row:
    """One method setting. `settings` are the config's own fields; targets and task type come from the
    family unless `targets` names them (per family, or None to keep the method's default)."""

    peft_type: str
    settings: dict
    families: tuple[str, ...]
    bases: tuple[str, ...] = (FLOAT,)
    refuses: tuple[str, ...] = ()  # base kinds the method refuses with a clear error
    targets: dict = field(default_factory=dict)  # family -> target settings (overrides `Family.linear`)
    layer_targets: bool = True  # False: model-level method (soft prompts), no target_modules
    keeps_output: bool = True  # default init leaves the output unchanged
    mergeable: bool = True  # False: merge_adapter raises MergeError and changes nothing
    rewrites_base: bool = False  # PiSSA/OLoRA: the base keeps the residual, disable gives that
    call: Callable[[int], dict] | None = None  # extra forward kwargs for a batch of n rows
    checkpointing: bool = True  # False: gradient checkpointing is refused with a clear error
    peft: str | None = None  # the `peft` config class that runs the same setting, if any
    peft_families: tuple[str, ...] | None = None  # where `peft` runs it (default: all the row's families)
    setup: Callable[[nn.Module, dict], dt.DeltaModel] | None = None  # builds the model (other adapters first)
    load: Callable[[nn.Module, str], dt.DeltaModel] | None = None  # loads what `save_pretrained` wrote

    def config_kwargs(self, family: str) -> dict:
        kwargs = {"task_type": FAMILIES[family].task_type} if FAMILIES[family].task_type else {}
        if family in self.targets:
            kwargs.update(self.targets[family] or {})
        elif self.layer_targets:
            kwargs["target_modules"] = list(FAMILIES[family].linear)
        return {**kwargs, **self.settings}

    def config(self, family: str) -> dt.DeltaConfig:
        return dt.registered_methods()[self.peft_type](**self.config_kwargs(family))


# ---------------------------------------------------------------------- rows that need other adapters
@functools.cache
def xlora_experts() -> dict[str, str]:
    """Two saved LoRA experts with random weights on tiny_llama: {"0": dir, "1": dir}."""
    root = tempfile.mkdtemp(prefix="xlora-experts-")
    for index, targets in enumerate([["q_proj", "v_proj"], ["v_proj", "down_proj"]]):
        expert = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        with torch.no_grad():
            generator = torch.Generator().manual_seed(index)
            for param in expert.parameters():
                if param.requires_grad:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        expert.save_pretrained(f"{root}/{index}")
    return {str(i): f"{root}/{i}" for i in range(2)}


def xlora_setup(base: nn.Module, kwargs: dict) -> dt.DeltaModel:
    return dt.get_peft_model(base, dt.XLoraConfig(adapters=xlora_experts(), hidden_size=16, xlora_depth=2,
                                                  xlora_size=8, **kwargs))


def fusion_setup(base: nn.Module, kwargs: dict) -> dt.DeltaModel:
    from deltatune.compose.fusion import add_fusion

    torch.manual_seed(0)
    bottleneck = dt.registered_methods()["BOTTLENECK"]
    task = {k: v for k, v in kwargs.items() if k == "task_type"}
    houlsby = bottleneck(bottleneck_type="houlsby", bottleneck_size=4, init_weights=False, **task)
    model = dt.get_peft_model(base, houlsby, adapter_name="a")
    model.add_adapter("b", bottleneck(bottleneck_type="pfeiffer", bottleneck_size=2, init_weights=False,
                                      non_linearity="gelu", **task))
    add_fusion(model, ["a", "b"], "ab", **{k: v for k, v in kwargs.items() if k == "temperature"})
    return model


def fusion_load(base: nn.Module, directory: str) -> dt.DeltaModel:
    model = dt.DeltaModel.from_pretrained(base, f"{directory}/a", adapter_name="a")
    model.load_adapter(f"{directory}/b", adapter_name="b")
    model.load_adapter(f"{directory}/ab", adapter_name="ab")
    model.set_adapter("ab")
    return model


def task(task_id: int) -> Callable[[int], dict]:
    return lambda n: {"task_ids": torch.full((n,), task_id)}


LORA = dict(r=4, lora_alpha=8)
IA3_T5 = {"target_modules": ["k", "v", "wi"], "feedforward_modules": ["wi"]}
BITFIT = {  # models with biases train theirs; Llama and T5 have none, so BitFit adds them
    "llama": dict(target_modules=["q_proj", "down_proj"], add_missing_bias=True),
    "gpt2": dict(target_modules=["c_attn", "c_proj", "c_fc", "ln_1", "ln_2", "ln_f"]),
    "bert": dict(target_modules=["query", "key", "value", "dense", "LayerNorm"]),
    "t5": dict(target_modules=["q", "v", "wi"], add_missing_bias=True),
}
DEFAULT_TARGETS = {f: None for f in ALL}  # the method's own default targets
VIT_CONV = {"vit": {"target_modules": ["projection", "q_proj", "v_proj", "fc1"]}}  # the patch conv too
CONV2D = {**VIT_CONV, "convnet": {"target_modules": ["conv2d", "fc"]}}  # methods without Conv1d support
UNET_BOFT = {"unet": {"target_modules": ["down", "mid", "up", "conv_out"]}}  # conv_in: 27 numbers, no blocks
CONV_FAMILIES = ("llama", "bert", "t5", "vit", "convnet", "unet")
CLIP_OFT = {"clip_text": {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]}}  # fc2's 37: b = 1
PROMPT = dict(num_virtual_tokens=3)
VIT_NORMS = {**DEFAULT_TARGETS, "vit": {"target_modules": ["layernorm_before", "layernorm_after"]}}

ROWS = {
    "lora": Row("LORA", LORA, (*ALL, "unet", *DIFFUSION), (FLOAT, *QUANTIZED, "int8"), targets=VIT_CONV,
                peft="LoraConfig"),
    "rslora": Row("LORA", {**LORA, "use_rslora": True}, ("llama", "gpt2", "convnet"),
                  (FLOAT, *QUANTIZED, "int8"), peft="LoraConfig"),
    "dora": Row("LORA", {**LORA, "use_dora": True}, (*ALL, *DIFFUSION), (FLOAT, *QUANTIZED, "int8"), targets=VIT_CONV,
                peft="LoraConfig"),
    "lora_bias_all": Row("LORA", {**LORA, "bias": "all"}, ("gpt2", "bert"), peft="LoraConfig"),
    "pissa": Row("LORA", {**LORA, "init_lora_weights": "pissa"}, ("llama", "gpt2", "t5", "vit"),
                 refuses=QUANTIZED, rewrites_base=True),
    "olora": Row("LORA", {**LORA, "init_lora_weights": "olora"}, ("llama", "bert"), refuses=QUANTIZED,
                 rewrites_base=True),
    "loha": Row("LOHA", dict(r=4, alpha=8), (*CONV_FAMILIES, *DIFFUSION), refuses=QUANTIZED, targets=VIT_CONV,
                peft="LoHaConfig"),
    "loha_effective_conv": Row("LOHA", dict(r=2, alpha=8, use_effective_conv2d=True), ("convnet", "unet", "sd_unet"),
                               peft="LoHaConfig"),
    "lokr": Row("LOKR", dict(r=2, alpha=4), (*CONV_FAMILIES, *DIFFUSION), refuses=QUANTIZED, targets=VIT_CONV,
                peft="LoKrConfig"),
    "lokr_decompose_both": Row("LOKR", dict(r=1, alpha=4, decompose_both=True, decompose_factor=8),
                               ("llama", "unet"), peft="LoKrConfig"),
    # peft's torch.kron fails on the strides its einsum leaves for Conv1d's (r, r, k, 1) core
    "lokr_effective_conv": Row("LOKR", dict(r=1, alpha=4, use_effective_conv2d=True),
                               ("convnet", "unet", "sd_unet"), peft="LoKrConfig", peft_families=("unet", "sd_unet")),
    # peft 0.21.2's unmerged OFT forward on convs wider than 1x1 is wrong (test_methods_reparam.py)
    "oft": Row("OFT", dict(r=0, oft_block_size=4), (*CONV_FAMILIES, *DIFFUSION), (FLOAT, *QUANTIZED),
               targets={**CONV2D, **CLIP_OFT}, peft="OFTConfig",
               peft_families=("llama", "bert", "t5", "sd3", "flux", "clip_text")),
    "oft_exact_cayley": Row("OFT", dict(r=0, oft_block_size=4, use_cayley_neumann=False), ("llama",),
                            peft="OFTConfig"),
    "oft_block_share": Row("OFT", dict(r=0, oft_block_size=8, block_share=True), ("llama",),
                           peft="OFTConfig"),
    "oft_coft": Row("OFT", dict(r=0, oft_block_size=4, coft=True, eps=0.3), ("llama",), peft="OFTConfig"),
    "boft": Row("BOFT", dict(boft_block_size=4), ("llama", "bert", "t5", "vit", "unet"), refuses=QUANTIZED,
                targets={**VIT_CONV, **UNET_BOFT}, peft="BOFTConfig"),
    # peft needs its CUDA block-diagonal kernel for more than one butterfly factor: ours alone here
    "boft_butterfly": Row("BOFT", dict(boft_block_size=2, boft_n_butterfly_factor=3), ("llama", "unet"),
                          targets={"llama": {"target_modules": ["q_proj", "down_proj"]}, **UNET_BOFT}),
    "vera": Row("VERA", dict(r=4), ("llama", "gpt2", "bert", "t5", "vit"), (FLOAT, *QUANTIZED),
                peft="VeraConfig"),
    "vera_no_projection": Row("VERA", dict(r=6, save_projection=False, projection_prng_key=7), ("gpt2",),
                              peft="VeraConfig"),
    "adalora": Row("ADALORA", dict(init_r=4, target_r=2, total_step=10, lora_alpha=8), ALL,
                   (FLOAT, *QUANTIZED),
                   targets=CONV2D, peft="AdaLoraConfig"),
    "relora": Row("RELORA", {**LORA, "relora_steps": 3, "relora_warmup_steps": 1}, ("llama", "gpt2", "t5"),
                  (FLOAT, *QUANTIZED)),
    "ulora": Row("ULORA", dict(r=4, num_tasks=2, default_task=1), TEXT, (FLOAT, *QUANTIZED)),
    "ulora_task_ids": Row("ULORA", dict(r=4, num_tasks=3), ("llama", "gpt2"), mergeable=False, call=task(2)),
    "ia3": Row("IA3", {}, TEXT, (FLOAT, *QUANTIZED), targets={**DEFAULT_TARGETS, "t5": IA3_T5},
               peft="IA3Config"),
    "ia3_all_feedforward": Row("IA3", dict(
        target_modules=".*(v_proj|c_attn|value|\\.v|wi|down_proj|c_fc|intermediate.dense)",
        feedforward_modules=".*(wi|down_proj|c_fc|intermediate.dense)"), TEXT, peft="IA3Config"),
    "ln_tuning": Row("LN_TUNING", {}, ("llama", "gpt2", "bert", "t5", "vit"), (FLOAT, *QUANTIZED),
                     targets=VIT_NORMS,
                     peft="LNTuningConfig", peft_families=("llama", "gpt2", "t5")),
    "bitfit": Row("BITFIT", {}, TEXT, (FLOAT, *QUANTIZED), targets=BITFIT),
    "houlsby": Row("BOTTLENECK", dict(bottleneck_type="houlsby", bottleneck_size=4), TEXT,
                   (FLOAT, *QUANTIZED),
                   targets=DEFAULT_TARGETS, mergeable=False),
    "pfeiffer": Row("BOTTLENECK", dict(bottleneck_type="pfeiffer", bottleneck_size=4, non_linearity="gelu"),
                    TEXT, targets=DEFAULT_TARGETS, mergeable=False),
    "parallel": Row("BOTTLENECK", dict(bottleneck_type="parallel", bottleneck_size=4, scaling=2.0),
                    TEXT, targets=DEFAULT_TARGETS, mergeable=False),
    "child_tuning": Row("CHILD_TUNING", {}, TEXT, (FLOAT, *QUANTIZED)),
    "prompt_tuning": Row("PROMPT_TUNING", PROMPT, TEXT, (FLOAT, *QUANTIZED), layer_targets=False,
                         keeps_output=False, mergeable=False, peft="PromptTuningConfig"),
    "p_tuning": Row("P_TUNING", {**PROMPT, "encoder_hidden_size": 8}, ("llama", "gpt2", "bert"),
                    (FLOAT, *QUANTIZED), layer_targets=False, keeps_output=False, mergeable=False,
                    peft="PromptEncoderConfig"),
    # peft 0.21.2 refuses prefix tuning on BERT under transformers 5 ("does not support past key values")
    "prefix_tuning": Row("PREFIX_TUNING", PROMPT, ("llama", "gpt2", "bert"), (FLOAT, *QUANTIZED),
                         layer_targets=False, keeps_output=False, mergeable=False, checkpointing=False,
                         peft="PrefixTuningConfig", peft_families=("llama", "gpt2")),
    "adaption_prompt": Row("ADAPTION_PROMPT", dict(adapter_len=3, adapter_layers=1), ("llama",),
                           (FLOAT, *QUANTIZED), layer_targets=False, mergeable=False,
                           peft="AdaptionPromptConfig"),
    "xlora": Row("XLORA", {}, ("llama",), layer_targets=False, keeps_output=False, mergeable=False,
                 setup=xlora_setup),
    "fusion": Row("BOTTLENECK_FUSION", {}, TEXT, layer_targets=False, keeps_output=False, mergeable=False,
                  setup=fusion_setup, load=fusion_load),
}


def cases(rows: dict[str, Row] = ROWS) -> list[tuple[str, str, str]]:
    """(row id, family, base kind) for every case; quantized kinds run on llama only."""
    out = [(row_id, family, FLOAT) for row_id, row in rows.items() for family in row.families]
    out += [(row_id, "llama", kind) for row_id, row in rows.items() for kind in row.bases if kind != FLOAT]
    return out


def build(row_id: str, family: str, base: str = FLOAT) -> dt.DeltaModel:
    """The row's model: its method on a fresh copy of the family's tiny model (seeded)."""
    row = ROWS[row_id]
    torch.manual_seed(0)
    kwargs = row.config_kwargs(family)
    if row.setup is not None:
        return row.setup(base_model(family, base), kwargs)
    return dt.get_peft_model(base_model(family, base), dt.registered_methods()[row.peft_type](**kwargs))


def forward_kwargs(row_id: str, batch: int) -> dict:
    call = ROWS[row_id].call
    return call(batch) if call else {}


# ---------------------------------------------------------------------- several active adapters
MERGEABLE_ON_LLAMA = sorted(r for r, row in ROWS.items() if row.mergeable and "llama" in row.families
                            and row.setup is None and not row.rewrites_base)
# Every mergeable method with itself (two adapters of one kind), then seeded random ordered pairs.
PAIRS = [(m, m) for m in ("lora", "dora", "ia3", "oft", "vera")]
PAIRS += random.Random(14).sample([(a, b) for a in MERGEABLE_ON_LLAMA for b in MERGEABLE_ON_LLAMA if a != b],
                                  12)
