"""Prefix tuning: Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li and Liang 2021,
arXiv:2101.00190).

    prompt_embeddings (T x N*2*D) ─► view (T, 2N, H, Dh) ─► layer i: keys K_i, values V_i (B, H, T, Dh)
    every attention layer i attends over [K_i; k(x)] and [V_i; v(x)]            (placed in its KV cache)

Update rule: each layer's attention sees T extra trained key/value vectors in front of the sequence's
own; the model's weights and inputs are unchanged. They go in through the model's cache (a Transformers
`DynamicCache` holding T positions, passed under the keyword the model takes: `past_key_values`, or
`cache` since Transformers 5.2x), so the attention mask gets T ones in front, given position ids move
by T, and `generate` continues from the same cache (its own, filled with the prefix at the first step).
With `prefix_projection` the table is P = W2 tanh(W1 E) (E: T x D, W1: D -> encoder_hidden_size,
W2: -> N*2*D) while training, as in the paper; files hold P itself (`prompt_embeddings`, as in `peft`).
Init rule: P ~ N(0, 1) (E and the MLP as PyTorch initialises them); `init_weights="zero"` starts the table
(or the MLP's last layer) at zero. Models with grouped-query attention get prefixes for their
key/value heads (D = num_key_value_heads * head_dim), as in `peft`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig, DeltaConfigError, TaskType, register_method, require
from ._placement import (
    batch_size,
    bind_arguments,
    cache_keyword,
    given_cache,
    input_embeddings,
    patched_prepare,
    positions_from_mask,
    prefix_ones,
)
from ._virtual_tokens import (
    PromptLearningFields,
    VirtualTokens,
    check_prompt_config,
    config_to_dict,
    fill_from_model,
)

TASK_TYPES = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS)
INIT_WEIGHTS = (None, "zero")


@register_method
@dataclass
class PrefixTuningConfig(DeltaConfig, PromptLearningFields):
    """Prefix tuning; field names as in Hugging Face PEFT."""

    peft_type = "PREFIX_TUNING"
    targets_layers = False
    model_adapter_type = VirtualTokens
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prompt_config(self, TASK_TYPES)
        require(isinstance(self.prefix_projection, bool), "prefix_projection", self.prefix_projection,
                "must be true or false")
        require(self.encoder_hidden_size is None or (isinstance(self.encoder_hidden_size, int)
                                                     and self.encoder_hidden_size > 0),
                "encoder_hidden_size", self.encoder_hidden_size, "must be a positive integer")
        require(self.init_weights in INIT_WEIGHTS, "init_weights", self.init_weights,
                f"must be one of {INIT_WEIGHTS}")

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, super().to_dict())

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> VirtualTokens:
        refuse_checkpointing(model)
        fill_from_model(self, model, key_value_heads=True)
        require(self.token_dim % self.num_attention_heads == 0, "token_dim", self.token_dim,
                f"must be a multiple of num_attention_heads={self.num_attention_heads}")
        keyword = cache_keyword(model)
        if keyword is None:
            raise DeltaConfigError(f"prefix tuning puts its prefix in the model's KV cache, and "
                                   f"{type(model).__name__}.forward takes none (no `cache` or "
                                   "`past_key_values`)")
        weight = input_embeddings(model).weight
        width = self.num_layers * 2 * self.token_dim
        layout = (self.num_layers, self.num_attention_heads)
        run = partial(cache_forward, self.task_type, layout, keyword)
        generate = partial(cache_generate, layout, keyword)
        if self.prefix_projection and not self.inference_mode:
            encoder = PrefixProjection(self.num_virtual_tokens, self.token_dim, self.encoder_hidden_size,
                                       width, zero=self.init_weights == "zero")
            return VirtualTokens(self.num_virtual_tokens, run, generate,
                                 encoder=encoder.to(device=weight.device, dtype=weight.dtype))
        table = weight.new_zeros(self.num_virtual_tokens, width)  # (T, N*2*D)
        if self.init_weights is None:
            nn.init.normal_(table)
        return VirtualTokens(self.num_virtual_tokens, run, generate, table=table)


class PrefixProjection(nn.Module):
    """The paper's reparameterization: P = W2 tanh(W1 E), E the trainable (T x D) prefix inputs."""

    def __init__(self, num_tokens: int, dim: int, hidden: int, width: int, zero: bool) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_tokens, dim)  # E, (T, D)
        self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        if zero:
            nn.init.zeros_(self.transform[-1].weight)
            nn.init.zeros_(self.transform[-1].bias)

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding.weight)  # (T, N*2*D)


def prefix_states(table: torch.Tensor, batch: int, layout: tuple[int, int], dtype: torch.dtype) -> list:
    """(T, N*2*D) table -> per layer i its (keys, values), each (B, H, T, Dh). Column layout as `peft`'s:
    for each layer, its keys then its values."""
    num_layers, heads = layout
    tokens = table.shape[0]
    kv = table.to(dtype).view(tokens, 2 * num_layers, heads, -1).permute(1, 2, 0, 3)  # (2N, H, T, Dh)
    kv = kv.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2N, B, H, T, Dh)
    return [(kv[2 * i], kv[2 * i + 1]) for i in range(num_layers)]


def prefix_cache(table: torch.Tensor, batch: int, layout: tuple[int, int], dtype: torch.dtype):
    """A Transformers DynamicCache holding the prefix: T positions in every layer."""
    from transformers import DynamicCache

    return DynamicCache(prefix_states(table, batch, layout, dtype))


def refuse_checkpointing(model: nn.Module) -> None:
    # Transformers turns the cache off under gradient checkpointing, which would drop the prefix.
    if any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        raise DeltaConfigError("prefix tuning works through the model's cache, which gradient checkpointing "
                               "turns off; disable it (model.gradient_checkpointing_disable())")


def shift_positions(kwargs: dict[str, Any], tokens: int) -> None:
    if kwargs.get("position_ids") is not None:  # the sequence starts after the T cached positions
        kwargs["position_ids"] = kwargs["position_ids"] + tokens


def cache_forward(task_type: TaskType, layout: tuple[int, int], keyword: str, model: nn.Module,
                  table: torch.Tensor, args: tuple, kwargs: dict[str, Any]):
    """Call `model` with the prefix in its cache (passed as `keyword`); mask and position ids extended."""
    kwargs = bind_arguments(args, dict(kwargs))
    if model.training:
        refuse_checkpointing(model)
    if given_cache(kwargs) is not None:
        raise ValueError("prefix tuning puts its prefix in the model's cache; run the model without a cache "
                         "of your own (generate() continues from the prefix by itself)")
    tokens = table.shape[0]
    positions_from_mask(model, kwargs)
    kwargs["attention_mask"] = prefix_ones(kwargs.get("attention_mask"), tokens)
    shift_positions(kwargs, tokens)
    if task_type == TaskType.CAUSAL_LM and kwargs.get("token_type_ids") is not None:
        warnings.warn("token_type_ids are ignored with prefix tuning on a causal LM", stacklevel=3)
        kwargs["token_type_ids"] = None
    dtype = input_embeddings(model).weight.dtype
    kwargs[keyword] = prefix_cache(table, batch_size(kwargs), layout, dtype)
    return model(**kwargs)


def cache_generate(layout: tuple[int, int], keyword: str, model: nn.Module, table: torch.Tensor,
                   args: tuple, kwargs: dict[str, Any]):
    """`model.generate` whose passes over the whole sequence start from the prefix: generate's own (empty)
    cache is filled with it, or without a cache one is given as `keyword`. Every step's mask gets T ones in
    front and its position ids (when the model is given them) move on by T."""
    from transformers import Cache

    kwargs = bind_arguments(args, dict(kwargs))
    if given_cache(kwargs) is not None:
        raise ValueError("prefix tuning generates from its own prefix cache; do not pass a cache")
    tokens, dtype = table.shape[0], input_embeddings(model).weight.dtype

    def wrap(step: dict[str, Any], whole: bool) -> dict[str, Any]:
        if whole:
            states = prefix_states(table, batch_size(step), layout, dtype)
            caches = [value for value in step.values() if isinstance(value, Cache)]
            if caches and caches[0].get_seq_length() == 0:  # generate's own cache, whatever its keyword
                for layer, (keys, values) in enumerate(states):
                    caches[0].update(keys, values, layer)
            else:
                step[keyword] = prefix_cache(table, batch_size(step), layout, dtype)
        step["attention_mask"] = prefix_ones(step.get("attention_mask"), tokens)
        shift_positions(step, tokens)
        return step

    with patched_prepare(model, wrap):
        return model.generate(**kwargs)
