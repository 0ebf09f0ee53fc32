"""What the virtual-token methods (prompt tuning, P-tuning, prefix tuning) share, written once:
`PromptLearningFields` (PEFT's PromptLearningConfig fields, filled from the model as `peft` does);
`prompt_forward` / `prompt_generate` (T virtual embeddings before the input, mask/labels/token types
extended); `patched_prepare`, `prefix_ones`, `bind_arguments` (shared with prefix.py); `VirtualTokens`,
the model-level module saved as the one tensor `prompt_embeddings` (trained directly or by an encoder).

Shapes: B batch, L input length, T virtual tokens, D token_dim, N layers, H heads, Dh = D // H.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import DeltaConfigError, TaskType, require

IGNORE_INDEX = -100  # label value the loss skips: the virtual tokens have no target
# The order `forward` takes positional arguments in, for the models these methods serve.
POSITIONAL = ("input_ids", "attention_mask")
# Fields of DeltaConfig that mean nothing for a method that adapts no layer (and that `peft` does not write).
LAYER_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


@dataclass
class PromptLearningFields:
    """Hugging Face PEFT's PromptLearningConfig fields; left as None, they are read from the model."""

    # `peft` does not wrap the base model for prompt-learning methods, so it writes trained task heads
    # (modules_to_save) as base_model.<path>, not base_model.model.<path>. For io/keymap.py to read.
    head_key_prefix: ClassVar[str] = "base_model."

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None


def check_prompt_config(config, task_types: tuple[TaskType, ...]) -> None:
    """Checks shared by the soft-prompt configs (call from `__post_init__`)."""
    require(isinstance(config.num_virtual_tokens, int) and not isinstance(config.num_virtual_tokens, bool)
            and config.num_virtual_tokens > 0, "num_virtual_tokens", config.num_virtual_tokens,
            "must be a positive integer")
    require(config.task_type in task_types, "task_type", getattr(config.task_type, "value", config.task_type),
            f"{config.peft_type} needs one of {[t.value for t in task_types]}")
    for name in LAYER_FIELDS:
        require(getattr(config, name) is None, name, getattr(config, name),
                f"{config.peft_type} adapts no layer; leave it unset")
    for name in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
        value = getattr(config, name)
        require(value is None or (isinstance(value, int) and value > 0), name, value,
                "must be a positive integer")


def config_to_dict(config, data: dict[str, Any]) -> dict[str, Any]:
    """Drop the layer-targeting fields `peft` does not write for prompt-learning methods."""
    for name in LAYER_FIELDS:
        data.pop(name, None)
    return data


def fill_from_model(config, model: nn.Module, key_value_heads: bool = False) -> None:
    """Fill the unset size fields from the model's config, under the rules `peft` uses, so a file
    written by either library gives the same shapes. `key_value_heads`: size token_dim and
    num_attention_heads for the key/value heads of grouped-query attention (prefix tuning)."""
    model_config = getattr(model, "config", None)
    if model_config is None:
        raise DeltaConfigError(f"{config.peft_type} needs a Transformers model (one with a `config`); "
                               f"got {type(model).__name__}")
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()

    def first(*names: str):
        for name in names:
            value = getattr(model_config, name, None)
            if value is not None:
                return value
        return None

    for field_name, names in (("num_layers", ("num_hidden_layers", "num_layers", "n_layer")),
                              ("token_dim", ("hidden_size", "n_embd", "d_model")),
                              ("num_attention_heads", ("num_attention_heads", "n_head", "num_heads"))):
        if getattr(config, field_name) is None:
            value = first(*names)
            if value is None:
                raise DeltaConfigError(f"{field_name} is not set and {type(model).__name__}'s config does "
                                       f"not give it (looked for {list(names)}); set it in the config")
            setattr(config, field_name, value)
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if key_value_heads and kv_heads is not None:  # grouped-query attention: sized for the key/value heads
        head_dim = getattr(model_config, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim, config.num_attention_heads = head_dim * kv_heads, kv_heads
    if getattr(config, "encoder_hidden_size", "absent") is None:
        config.encoder_hidden_size = config.token_dim


def input_embeddings(model: nn.Module) -> nn.Module:
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None:
        raise DeltaConfigError(f"{type(model).__name__} has no input embeddings (get_input_embeddings()); "
                               "soft prompts need a model that takes inputs_embeds")
    return embed


def bind_arguments(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional `forward` arguments -> keywords (input_ids, attention_mask), so they can be extended."""
    if len(args) > len(POSITIONAL):
        raise TypeError(f"soft-prompt forward takes at most {len(POSITIONAL)} positional arguments "
                        f"({', '.join(POSITIONAL)}); pass the others by keyword")
    for name, value in zip(POSITIONAL, args):
        if name in kwargs:
            raise TypeError(f"forward got {name} both by position and by keyword")
        kwargs[name] = value
    return kwargs


def batch_size(kwargs: dict[str, Any]) -> int:
    for name in ("input_ids", "inputs_embeds"):
        if kwargs.get(name) is not None:
            return kwargs[name].shape[0]
    raise ValueError("give input_ids or inputs_embeds")


def prefix_ones(mask: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    """(B, L) mask -> (B, T + L): the virtual tokens are always attended to."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError("soft prompts need a 2-D (batch, length) attention mask, got shape "
                         f"{tuple(mask.shape)}")
    return torch.cat([mask.new_ones(mask.shape[0], num_tokens), mask], dim=1)


def drop_position_ids(kwargs: dict[str, Any]) -> None:
    if kwargs.get("position_ids") is not None:  # as `peft`: the model numbers the extended sequence itself
        warnings.warn("position_ids are ignored with soft prompts; the model numbers the extended sequence",
                      stacklevel=3)
    kwargs.pop("position_ids", None)


# ---------------------------------------------------------------------- virtual tokens as input embeddings
def prompt_forward(task_type: TaskType, model: nn.Module, prompts: torch.Tensor, args: tuple,
                   kwargs: dict[str, Any]):
    """Call `model` with `prompts` (T, D) in front of every sample's input embeddings."""
    kwargs = bind_arguments(args, dict(kwargs))
    num_tokens, batch = prompts.shape[0], batch_size(kwargs)
    drop_position_ids(kwargs)
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.pop("inputs_embeds", None)
    if embeds is None:
        embeds = input_embeddings(model)(input_ids)  # (B, L, D)
    prompts = prompts.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, T, D)
    kwargs["inputs_embeds"] = torch.cat([prompts, embeds], dim=1)  # (B, T + L, D)
    kwargs["attention_mask"] = prefix_ones(kwargs.get("attention_mask"), num_tokens)
    if task_type == TaskType.SEQ_CLS:
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, num_tokens), types], dim=1)
    elif task_type == TaskType.CAUSAL_LM:
        if kwargs.get("token_type_ids") is not None:
            warnings.warn("token_type_ids are ignored with soft prompts on a causal LM", stacklevel=3)
            kwargs["token_type_ids"] = None
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((batch, num_tokens), IGNORE_INDEX), labels], dim=1)
    return model(**kwargs)


@contextlib.contextmanager
def patched_prepare(model: nn.Module, wrap: Callable[[dict[str, Any]], dict[str, Any]]):
    """Within the block, `model.generate` passes each step's model inputs through `wrap` (the one hook
    Transformers gives for changing what a generation step feeds the model)."""
    own = model.__dict__.get("prepare_inputs_for_generation")
    original = model.prepare_inputs_for_generation

    def prepare(*args, **kwargs):
        return wrap(original(*args, **kwargs), kwargs)

    model.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        if own is None:
            del model.prepare_inputs_for_generation
        else:
            model.prepare_inputs_for_generation = own


def is_prefill(step_inputs: dict[str, Any]) -> bool:
    cache = step_inputs.get("past_key_values")
    return cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)


def prompt_generate(model: nn.Module, prompts: torch.Tensor, args: tuple, kwargs: dict[str, Any]):
    """`model.generate` with the virtual tokens in front of the prompt. Decoder-only: the first step feeds
    [prompts, embeddings of input_ids]; the cache then holds them, and every step's mask gets T ones in
    front. Encoder-decoder: the encoder input gets the prompts."""
    kwargs = bind_arguments(args, dict(kwargs))
    drop_position_ids(kwargs)
    if getattr(model.config, "is_encoder_decoder", False):
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate with soft prompts needs input_ids")
        embeds = input_embeddings(model)(input_ids)
        prompts = prompts.to(embeds.dtype)
        batch_prompts = prompts.unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, T, D)
        kwargs["inputs_embeds"] = torch.cat([batch_prompts, embeds], dim=1)
        kwargs["attention_mask"] = prefix_ones(kwargs.get("attention_mask"), prompts.shape[0])
        return model.generate(**kwargs)
    if kwargs.get("inputs_embeds") is not None:
        raise ValueError("generate with soft prompts takes input_ids, not inputs_embeds")

    def wrap(step: dict[str, Any], _: dict[str, Any]) -> dict[str, Any]:
        if is_prefill(step):
            ids = step["input_ids"]
            embeds = input_embeddings(model)(ids)  # (B, L, D)
            batch_prompts = prompts.to(embeds.dtype).unsqueeze(0).expand(ids.shape[0], -1, -1)  # (B, T, D)
            step["inputs_embeds"], step["input_ids"] = torch.cat([batch_prompts, embeds], dim=1), None
        step["attention_mask"] = prefix_ones(step.get("attention_mask"), prompts.shape[0])
        step.pop("position_ids", None)
        return step

    with patched_prepare(model, wrap):
        return model.generate(**kwargs)


# ---------------------------------------------------------------------- the model-level module
class VirtualTokens(nn.Module):
    """The table of virtual-token vectors `prompt_embeddings` (T', W) and how the model reads it.

    Without `encoder` the table is the trained parameter. With one (P-tuning, prefix projection) the table
    is `encoder()` while training; `prompt_embeddings` then mirrors that output, which is all a file holds
    (as in `peft`). A file loaded into it (or any write to it) makes the mirror the prompt from then on, so a
    reloaded adapter gives the saved outputs and keeps training from them. `run(model, table, args, kwargs)`
    and `generate(model, table, args, kwargs)` place the first `num_virtual_tokens` rows.
    """

    mergeable = False
    disk_prefix = ""  # saved as the bare key `prompt_embeddings`, as `peft` saves it

    def __init__(self, num_virtual_tokens: int, run: Callable, generate: Callable,
                 table: torch.Tensor | None = None, encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.num_virtual_tokens, self.run, self.generate = num_virtual_tokens, run, generate
        self.encoder = encoder
        if encoder is not None:
            with torch.no_grad():
                table = encoder()
            # The mirror's last own value; kept in full-model checkpoints so a restored model keeps its mode.
            self.register_buffer("_synced", table.clone())
        self.prompt_embeddings = nn.Parameter(table.clone())  # (T', W)
        self.loaded = encoder is None

    def _notice_load(self) -> None:
        if not self.loaded and not torch.equal(self.prompt_embeddings, self._synced):
            self.loaded = True

    def table(self) -> torch.Tensor:
        self._notice_load()
        rows = self.prompt_embeddings if self.loaded else self.encoder()
        return rows[: self.num_virtual_tokens]  # (T, W)

    def requires_grad_(self, requires_grad: bool = True) -> VirtualTokens:
        """Turning training on turns on only the tensors in use: the encoder, or the table once loaded,
        so the trainable-parameter count is what trains."""
        super().requires_grad_(requires_grad)
        if requires_grad and self.encoder is not None:
            self._notice_load()
            (self.encoder if self.loaded else self.prompt_embeddings).requires_grad_(False)
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Called on this module alone (as io/ does to write or fill a file): only `prompt_embeddings`,
        refreshed from the encoder. Inside the whole model's state_dict the encoder is kept (checkpoints)."""
        if self.encoder is None or args or destination is not None or prefix:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.loaded:
            with torch.no_grad():
                self.prompt_embeddings.copy_(self.encoder())
                self._synced.copy_(self.prompt_embeddings)
        table = self.prompt_embeddings
        return {"prompt_embeddings": table if keep_vars else table.detach()}

    def forward_model(self, model: nn.Module, *args, **kwargs):
        return self.run(model, self.table(), args, kwargs)

    def generate_model(self, model: nn.Module, *args, **kwargs):
        return self.generate(model, self.table(), args, kwargs)

    def extra_repr(self) -> str:
        shape = tuple(self.prompt_embeddings.shape)
        return f"num_virtual_tokens={self.num_virtual_tokens}, table={shape}, encoder={not self.loaded}"
