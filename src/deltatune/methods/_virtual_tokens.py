"""What the virtual-token methods (prompt tuning, P-tuning, prefix tuning) share, written once:
`PromptLearningFields` (PEFT's PromptLearningConfig fields, filled from the model as `peft` does) and
`VirtualTokens`, the model-level module saved as the one tensor `prompt_embeddings` (trained directly or by
an encoder). Where the tokens go in a forward pass and in `generate` is _placement.py's concern.

Shapes: B batch, L input length, T virtual tokens, D token_dim, N layers, H heads, Dh = D // H.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.config import DeltaConfigError, TaskType, require
from ..core.protocols import TakesOverForward

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


# ---------------------------------------------------------------------- the model-level module
class VirtualTokens(nn.Module, TakesOverForward):
    """The table of virtual-token vectors `prompt_embeddings` (T', W) and how the model reads it.

    Without `encoder` the table is the trained parameter. With one (P-tuning, prefix projection) the table
    is `encoder()` while training; `prompt_embeddings` then mirrors that output, which is all a file holds
    (as in `peft`). A file loaded into it (or any write to it) makes the mirror the prompt from then on, so a
    reloaded adapter gives the saved outputs and keeps training from them. `run(model, table, args, kwargs)`
    and `generate(model, table, args, kwargs)` place the first `num_virtual_tokens` rows.

    A model-level adapter that runs the wrapped model's forward and generate (TakesOverForward), so
    merge_adapter refuses it; it keeps no per-call state (the table is recomputed in a recompute).
    """

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

    def call_state(self) -> tuple[tuple[torch.Tensor, ...], None]:
        return (), None  # the tokens go in through the inputs, which a recompute gets again

    def extra_repr(self) -> str:
        shape = tuple(self.prompt_embeddings.shape)
        return f"num_virtual_tokens={self.num_virtual_tokens}, table={shape}, encoder={not self.loaded}"
