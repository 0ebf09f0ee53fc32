"""Tiny random models for tests: seeded, float32, in eval mode, built in memory (no downloads).

Hidden sizes are 16-32 so a forward pass takes milliseconds. Each builder takes a `seed`, so two calls
with the same seed give bit-identical weights (handy for "same base, two libraries" comparisons).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 64


def _seeded(build, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return build().float().eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2-layer Llama, hidden 16: q/k/v/o_proj, gate/up/down_proj, embed_tokens, lm_head."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return _seeded(lambda: LlamaForCausalLM(config), seed)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2-layer GPT-2, hidden 16: Transformers Conv1D layers c_attn, c_proj, c_fc (weight stored (in, out))."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    return _seeded(lambda: GPT2LMHeadModel(config), seed)


def tiny_bert_cls(seed: int = 0, num_labels: int = 3) -> BertForSequenceClassification:
    """2-layer BERT, hidden 16, with a `classifier` head for sequence classification."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    return _seeded(lambda: BertForSequenceClassification(config), seed)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    """1+1-layer T5, d_model 16: q/k/v/o in SelfAttention and EncDecAttention, wi/wo in DenseReluDense."""
    config = T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0)
    return _seeded(lambda: T5ForConditionalGeneration(config), seed)


class TinyConvNet(nn.Module):
    """(batch, 3, 8, 8) images -> conv2d -> conv1d over the flattened pixels -> mean -> fc -> (batch, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2d(pixels))  # (B, 8, 8, 8)
        hidden = torch.relu(self.conv1d(hidden.flatten(2)))  # (B, 8, 64)
        return self.fc(hidden.mean(-1))  # (B, 4)


def tiny_convnet(seed: int = 0) -> TinyConvNet:
    return _seeded(TinyConvNet, seed)


def token_batch(batch: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    """Random token ids (batch, length) for the tiny language models."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=generator)


def image_batch(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random images (batch, 3, 8, 8) for tiny_convnet."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 8, 8, generator=generator)
