"""P-tuning: GPT Understands, Too (Liu et al. 2021, arXiv:2103.10385).

    E (trainable, T x D) ──► prompt encoder (MLP, or bi-LSTM + MLP) ──► P (T x D) ─┐
                                                                                  cat ──► frozen model
    embed(input_ids)                                               (B x L x D) ───┘

Update rule: as prompt tuning (prompt.py), but the virtual tokens are P = encoder(E), a
reparameterization that trains E and the encoder together:
  "MLP":  P = W3 relu(W2 relu(W1 E))           W1: D -> h, W2: h -> h, W3: h -> D
  "LSTM": P = W2 relu(W1 biLSTM(E))             biLSTM: D -> 2h (encoder_num_layers layers), W1: 2h -> 2h,
                                                W2: 2h -> D
with h = encoder_hidden_size (default D). Init rule: E ~ N(0, 1); linear and LSTM layers as PyTorch
initialises them.

The encoder is only needed while training. As in `peft`, a file stores the encoder's output P as
`prompt_embeddings` (T' x D), and a loaded adapter is a plain table. A table loaded into a trainable
adapter (`is_trainable=True`) is used and trained as it is, so the loaded model gives the saved outputs
(`peft` instead runs a freshly initialised encoder over it). See VirtualTokens in _virtual_tokens.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..core.config import DeltaConfig, register_method, require
from ._virtual_tokens import (
    PromptLearningFields,
    VirtualTokens,
    check_prompt_config,
    config_to_dict,
    fill_from_model,
)
from .prompt import TASK_TYPES, input_prompt

ENCODER_TYPES = ("MLP", "LSTM")
MLP_LAYERS = 2  # `peft`'s default encoder_num_layers; its MLP always has three linear layers


@register_method
@dataclass
class PromptEncoderConfig(DeltaConfig, PromptLearningFields):
    """P-tuning; field names as in Hugging Face PEFT."""

    peft_type = "P_TUNING"
    targets_layers = False
    model_adapter_type = VirtualTokens
    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = MLP_LAYERS
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = self.encoder_reparameterization_type
        self.encoder_reparameterization_type = str(getattr(kind, "value", kind)).upper()
        require(self.encoder_reparameterization_type in ENCODER_TYPES, "encoder_reparameterization_type",
                kind, f"must be one of {ENCODER_TYPES}")
        check_prompt_config(self, TASK_TYPES)
        require(self.encoder_hidden_size is None or (isinstance(self.encoder_hidden_size, int)
                                                     and self.encoder_hidden_size > 0),
                "encoder_hidden_size", self.encoder_hidden_size, "must be a positive integer")
        require(isinstance(self.encoder_num_layers, int) and self.encoder_num_layers > 0,
                "encoder_num_layers", self.encoder_num_layers, "must be a positive integer")
        require(isinstance(self.encoder_dropout, (int, float)) and 0 <= self.encoder_dropout < 1,
                "encoder_dropout", self.encoder_dropout, "must be in [0, 1)")
        if self.encoder_reparameterization_type == "MLP" and self.encoder_num_layers != MLP_LAYERS:
            warnings.warn(f"encoder_num_layers={self.encoder_num_layers} is ignored for the MLP encoder, "
                          "which has three linear layers (as in peft)", stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self, super().to_dict())

    def make_model_adapter(self, model: nn.Module, adapter_name: str) -> VirtualTokens:
        fill_from_model(self, model)
        weight = model.get_input_embeddings().weight
        total = self.num_virtual_tokens * self.num_transformer_submodules
        if self.inference_mode:  # only the encoder's output is needed, and that is what a file holds
            return input_prompt(self, table=weight.new_zeros(total, self.token_dim))
        encoder = PTuningEncoder(self, total).to(device=weight.device, dtype=weight.dtype)
        return input_prompt(self, encoder=encoder)


class PTuningEncoder(nn.Module):
    """E (trainable virtual-token inputs) and the network that maps them to the prompt P = encoder(E)."""

    def __init__(self, config: PromptEncoderConfig, total_tokens: int) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.kind = config.encoder_reparameterization_type
        self.embedding = nn.Embedding(total_tokens, dim)  # E, (T', D), N(0, 1)
        if self.kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        inputs = self.embedding.weight.unsqueeze(0)  # (1, T', D): one sample, shared by the whole batch
        if self.kind == "LSTM":
            inputs = self.lstm_head(inputs)[0]  # (1, T', 2h)
        return self.mlp_head(inputs)[0]  # (T', D)
