"""LLaMA-Adapter: Efficient Fine-tuning of Language Models with Zero-init Attention (Zhang et al. 2023,
arXiv:2303.16199). Hugging Face PEFT calls it "adaption prompt" (peft_type ADAPTION_PROMPT).

    hidden (B, L, D) ─► attention (frozen) ──────────────────────────────────► out ─┐
         └─► q = rope(W_q hidden)     P (adapter_len x D, trainable)                (+) ──► out'
                 │                    k = W_k P, v = W_v P                            │
                 └─► g * softmax(q k^T / sqrt(Dh)) v ─► W_o ──────────────────────────┘

Update rule: in each of the top `adapter_layers` attention blocks, every query also attends, in a
separate softmax, to `adapter_len` learned prompt vectors P (`adaption_prompt`, 1 x adapter_len x D)
projected by the block's own frozen key/value projections; that result is scaled by the learned gate g
(`adaption_gate`, one scalar per block) and added to the block's output (after W_o for Llama/Mistral;
GPT-2's fused attention adds it before its output projection, as `peft` does).
Init rule: P ~ N(0, 1); g = 0, so the adapted model starts exactly equal to the base ("zero-init
attention"). Shapes: H heads, Dh head size, grouped-query keys/values are repeated to H heads.

The blocks are not replaced: while the adapter is active, forward/generate run with a forward hook on
each adapted block, so other adapters (LoRA on q_proj, say) stay in place.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig, DeltaConfigError, TaskType, register_method, require
from ..core.protocols import TakesOverForward
from ..core.targeting import canonical_name

ATTENTION_NAMES = {"llama": "self_attn", "mistral": "self_attn", "gpt2": "attn"}  # `peft`'s defaults
# DeltaConfig fields `peft`'s AdaptionPromptConfig does not have.
UNUSED_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save")


class AdaptionPrompt(nn.Module):
    """The trained state of one adapted attention block."""

    def __init__(self, adapter_len: int, dim: int, reference: torch.Tensor) -> None:
        super().__init__()
        factory = {"device": reference.device, "dtype": reference.dtype if reference.is_floating_point()
                   else torch.float32}
        self.adaption_prompt = nn.Parameter(torch.randn(1, adapter_len, dim, **factory))  # P
        self.adaption_gate = nn.Parameter(torch.zeros(1, **factory))  # g: zero-init


class AdaptionPrompts(nn.Module, TakesOverForward):
    """One AdaptionPrompt per adapted block, kept at the block's own path so the saved keys are `peft`'s:
    base_model.model.<block path>.adaption_prompt / .adaption_gate. It runs the model's forward and
    generate with its hooks on (TakesOverForward), so merge_adapter refuses it."""

    disk_prefix = "base_model.model."

    def __init__(self, model: nn.Module, blocks: dict[str, nn.Module], adapter_len: int,
                 fused_qkv: bool) -> None:
        super().__init__()
        # Hooked by object, not path, so wrappers added or removed around them later do not matter.
        # (A plain list: the base model's modules must not become this module's submodules.)
        self.paths, self.attention_modules, self.fused_qkv = list(blocks), list(blocks.values()), fused_qkv
        dim = model.config.hidden_size
        reference = model.get_input_embeddings().weight
        for path in self.paths:  # containers mirroring the path: model -> layers -> 1 -> self_attn
            parent = self
            *containers, leaf = path.split(".")
            for name in containers:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.Module())
                parent = getattr(parent, name)
            parent.add_module(leaf, AdaptionPrompt(adapter_len, dim, reference))

    @contextlib.contextmanager
    def hooked(self):
        handles = [attention.register_forward_hook(self._hook(path), with_kwargs=True)
                   for path, attention in zip(self.paths, self.attention_modules)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, path: str):
        prompt = self.get_submodule(path)

        def add_adapter_attention(attention: nn.Module, args: tuple, kwargs: dict, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            extra = adapter_attention(attention, prompt, hidden, kwargs, self.fused_qkv)
            if isinstance(output, tuple):
                return ((output[0] + extra).to(output[0].dtype), *output[1:])
            return (output + extra).to(output.dtype)

        return add_adapter_attention

    def call_state(self):
        """A checkpointed block's recompute in backward runs after forward_model removed the hooks: put
        them back for it (see DeltaConfig.make_model_adapter)."""
        return (), lambda tensors: self.hooked()

    def forward_model(self, model: nn.Module, *args, **kwargs):
        # no positions from the mask here (prefix tuning takes them): the zero-init gate promises the base
        # model's output exactly, and a base with absolute positions (GPT-2) numbers a padded row from 0
        with self.hooked():
            return model(*args, **kwargs)

    def generate_model(self, model: nn.Module, *args, **kwargs):
        with self.hooked():
            return model.generate(*args, **kwargs)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def adapter_attention(attention: nn.Module, prompt: AdaptionPrompt, hidden: torch.Tensor, kwargs: dict,
                      fused_qkv: bool) -> torch.Tensor:
    """g * softmax(q k_P^T / sqrt(Dh)) v_P for one block, projected like the block's own output."""
    batch, length, dim = hidden.shape
    heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    tokens = prompt.adaption_prompt  # (1, A, D)
    if fused_qkv:  # GPT-2: one c_attn gives q, k, v; its queries carry no rotary position
        query = attention.c_attn(hidden).split(dim, dim=2)[0]
        _, key, value = attention.c_attn(tokens).split(dim, dim=2)  # (1, A, D) each
        kv_heads = heads
    else:
        query = attention.q_proj(hidden)
        key, value = attention.k_proj(tokens), attention.v_proj(tokens)  # (1, A, kvh * Dh)
        kv_heads = getattr(attention.config, "num_key_value_heads", None) or heads
    query = query.view(batch, length, heads, head_dim).transpose(1, 2)  # (B, H, L, Dh)
    if not fused_qkv:
        if "position_embeddings" not in kwargs:
            raise RuntimeError("LLaMA-Adapter needs the rotary position_embeddings that "
                               f"{type(attention).__name__} "
                               "is called with; this Transformers version does not pass them")
        cos, sin = (t.unsqueeze(1) for t in kwargs["position_embeddings"])  # (B, 1, L, Dh)
        query = query * cos + rotate_half(query) * sin

    def per_head(states: torch.Tensor) -> torch.Tensor:  # (1, A, kvh * Dh) -> (B, H, A, Dh)
        states = states.view(1, -1, kv_heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)
        return states.repeat_interleave(heads // kv_heads, dim=1)

    dtype = query.dtype
    scores = query @ per_head(key).transpose(2, 3).to(dtype) / math.sqrt(head_dim)  # (B, H, L, A)
    weights = prompt.adaption_gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    out = (weights @ per_head(value)).transpose(1, 2).reshape(batch, length, -1)  # (B, L, H * Dh)
    return out if fused_qkv else attention.o_proj(out)


@register_method
@dataclass
class AdaptionPromptConfig(DeltaConfig):
    """LLaMA-Adapter; field names as in Hugging Face PEFT. `target_modules` names the attention block
    (default: "self_attn" for Llama/Mistral, "attn" for GPT-2)."""

    peft_type = "ADAPTION_PROMPT"
    targets_layers = False
    model_adapter_type = AdaptionPrompts
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                    "must be a positive integer")
        require(self.target_modules is None or isinstance(self.target_modules, str), "target_modules",
                self.target_modules, "must be the name of the attention block, e.g. 'self_attn'")
        require(self.task_type in (None, TaskType.CAUSAL_LM), "task_type",
                getattr(self.task_type, "value", self.task_type), "LLaMA-Adapter serves CAUSAL_LM models")
        for name in UNUSED_FIELDS:
            require(not getattr(self, name), name, getattr(self, name), "LLaMA-Adapter does not use it")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in UNUSED_FIELDS:
            data.pop(name, None)
        return data

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> AdaptionPrompts:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in ATTENTION_NAMES:
            raise DeltaConfigError(f"LLaMA-Adapter supports model types {sorted(ATTENTION_NAMES)}; "
                                   f"{type(model).__name__} is {model_type!r}")
        if self.target_modules is None:
            self.target_modules = ATTENTION_NAMES[model_type]
        blocks = {}  # canonical name -> the attention module itself (inside any wrappers)
        for name, module in model.named_modules():
            inside_wrapper = ".adapters." in name or ".copies." in name
            if name.endswith("." + self.target_modules) and not inside_wrapper:
                while hasattr(module, "base_layer"):
                    module = module.base_layer
                blocks.setdefault(canonical_name(name), module)
        if len(blocks) < self.adapter_layers:
            raise DeltaConfigError(f"adapter_layers={self.adapter_layers}: {type(model).__name__} has only "
                                   f"{len(blocks)} modules named {self.target_modules!r}")
        top = list(blocks.items())[-self.adapter_layers:]
        return AdaptionPrompts(model, dict(top), self.adapter_len, model_type == "gpt2")
