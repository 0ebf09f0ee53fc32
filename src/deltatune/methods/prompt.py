"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al. 2021,
arXiv:2104.08691).

    [p_1 ... p_T] (trainable, T x D) ─┐
                                      cat ──► frozen model ──► out
    embed(input_ids)   (B x L x D)  ──┘

Update rule: the model reads [P; E(x)] instead of E(x); P (`prompt_embeddings`, T x D) is the only
trained tensor. The attention mask gets T ones and causal-LM labels T ignored (-100) labels at the same
place; a left-padded row reads [pads; P; E(x)], so its result does not depend on its padding (given
position ids are kept: P takes the first token's positions, x moves on by T; see _placement.py).
Init rule (`prompt_tuning_init`): "RANDOM" P ~ N(0, 1); "SAMPLE_VOCAB" rows of the word-embedding matrix
at random token ids; "TEXT" the embeddings of `prompt_tuning_init_text`, repeated or cut to T tokens.
For encoder-decoder models `peft` keeps 2T rows (one set per transformer stack); the encoder reads the
first T, as in `peft`, so files interchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig, DeltaConfigError, TaskType, register_method, require
from ._placement import input_embeddings, prompt_forward, prompt_generate
from ._virtual_tokens import (
    PromptLearningFields,
    VirtualTokens,
    check_prompt_config,
    config_to_dict,
    fill_from_model,
)

INIT_MODES = ("RANDOM", "SAMPLE_VOCAB", "TEXT")
TASK_TYPES = (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM)


@register_method
@dataclass
class PromptTuningConfig(DeltaConfig, PromptLearningFields):
    """Prompt tuning; field names as in Hugging Face PEFT. `tokenizer_name_or_path` also takes a tokenizer
    object (only its `name_or_path` is written to files)."""

    peft_type = "PROMPT_TUNING"
    targets_layers = False
    model_adapter_type = VirtualTokens
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        init = self.prompt_tuning_init
        self.prompt_tuning_init = str(getattr(init, "value", init)).upper()  # peft's enum or its value
        require(self.prompt_tuning_init in INIT_MODES, "prompt_tuning_init", self.prompt_tuning_init,
                f"must be one of {INIT_MODES}")
        check_prompt_config(self, TASK_TYPES)
        if self.prompt_tuning_init == "TEXT":
            require(isinstance(self.prompt_tuning_init_text, str) and self.prompt_tuning_init_text != "",
                    "prompt_tuning_init_text", self.prompt_tuning_init_text,
                    "is needed when prompt_tuning_init='TEXT'")
            require(bool(self.tokenizer_name_or_path), "tokenizer_name_or_path", self.tokenizer_name_or_path,
                    "is needed when prompt_tuning_init='TEXT' (a path or a tokenizer object)")
        require(not self.tokenizer_kwargs or self.prompt_tuning_init == "TEXT", "tokenizer_kwargs",
                self.tokenizer_kwargs, "only applies when prompt_tuning_init='TEXT'")

    def to_dict(self) -> dict[str, Any]:
        data = config_to_dict(self, super().to_dict())
        tokenizer = data["tokenizer_name_or_path"]
        if tokenizer is not None and not isinstance(tokenizer, str):
            data["tokenizer_name_or_path"] = getattr(tokenizer, "name_or_path", None) or None
        return data

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> VirtualTokens:
        fill_from_model(self, model)
        embed = input_embeddings(model)
        total = self.num_virtual_tokens * self.num_transformer_submodules
        weight = embed.weight
        table = torch.randn(total, self.token_dim, device=weight.device, dtype=weight.dtype)  # (T', D)
        if not self.inference_mode and self.prompt_tuning_init != "RANDOM":  # a loaded file overwrites it
            ids = self._init_token_ids(weight.shape[0], total).to(weight.device)
            with torch.no_grad():
                table = embed(ids).detach().clone()
        return input_prompt(self, table=table)

    def _init_token_ids(self, vocab_size: int, total: int) -> torch.Tensor:
        if self.prompt_tuning_init == "SAMPLE_VOCAB":
            return torch.randint(0, vocab_size, (total,))
        tokenizer = load_tokenizer(self.tokenizer_name_or_path, self.tokenizer_kwargs)
        ids = tokenizer(self.prompt_tuning_init_text)["input_ids"]
        if not ids:
            raise DeltaConfigError(f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} gives no "
                                   "tokens")
        ids = (ids * math.ceil(total / len(ids)))[:total]  # repeat a short text, cut a long one
        return torch.tensor(ids, dtype=torch.long)


def load_tokenizer(name_or_tokenizer: Any, kwargs: dict | None):
    """A tokenizer object as it is; a path through AutoTokenizer, never with remote code.

    The path may come from an adapter's config file (a trainable load builds the adapter before the
    file's weights overwrite it), so `trust_remote_code=False` is passed explicitly: left unset,
    Transformers asks on the terminal whether to run a folder's custom code.

    Raises:
        DeltaConfigError: the tokenizer cannot be loaded, or its folder needs custom code.
    """
    if not isinstance(name_or_tokenizer, str):
        return name_or_tokenizer
    from transformers import AutoTokenizer

    kwargs = {k: v for k, v in (kwargs or {}).items() if k != "trust_remote_code"}
    try:
        return AutoTokenizer.from_pretrained(name_or_tokenizer, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as err:  # missing files; a folder that asks for its own code
        reason = str(err).strip().splitlines()[0]
        raise DeltaConfigError(
            f"tokenizer_name_or_path={name_or_tokenizer!r}: could not load the tokenizer for "
            f"prompt_tuning_init='TEXT' without running custom code ({reason})") from None


def input_prompt(config, table: torch.Tensor | None = None,
                 encoder: nn.Module | None = None) -> VirtualTokens:
    """Virtual tokens placed in front of the input embeddings (prompt tuning, P-tuning)."""
    return VirtualTokens(config.num_virtual_tokens, partial(prompt_forward, config.task_type),
                         prompt_generate, table=table, encoder=encoder)
