"""Gradient checkpointing, in either torch variant, turned on before or after wrapping: every trainable
parameter gets a gradient on the first backward, and the same gradient as without checkpointing
(text, encoder, seq2seq and vision models; several methods). Issue 14 item 7."""

import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import ViTConfig, ViTForImageClassification

import deltatune as dt
from grad_checks import assert_every_trainable_param_gets_grad, randomize_trainable
from tiny_models import tiny_bert_cls, tiny_gpt2, tiny_llama, tiny_t5, token_batch
from tiny_vision import image_batch, tiny_vit

IDS = token_batch()
MODELS = {  # name: (builder, LoRA targets and task settings, batch with labels)
    "llama": (tiny_llama, dict(target_modules=["q_proj", "v_proj"]), {"input_ids": IDS, "labels": IDS}),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn"]), {"input_ids": IDS, "labels": IDS}),
    "bert": (tiny_bert_cls, dict(target_modules=["query"], task_type="SEQ_CLS"),
             {"input_ids": IDS, "labels": torch.tensor([0, 2])}),
    "t5": (tiny_t5, dict(target_modules=["q", "v"]), {"input_ids": IDS, "labels": IDS[:, :4].contiguous()}),
    "vit": (tiny_vit, dict(target_modules=["q_proj"], modules_to_save=["classifier"]),
            {"pixel_values": image_batch(), "labels": torch.tensor([0, 3])}),
    "vit_no_head": (tiny_vit, dict(target_modules=["q_proj", "fc2"]),
                    {"pixel_values": image_batch(), "labels": torch.tensor([0, 3])}),
}


def enable(model, reentrant: bool) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})


def wrapped(builder, config, checkpointing: str | None, reentrant: bool = True):
    """A trainable, randomized adapter on a fresh base; checkpointing turned on "before" or "after" wrapping."""
    base = builder()
    if checkpointing == "before":
        enable(base, reentrant)
    model = dt.get_peft_model(base, config)
    if checkpointing == "after":
        enable(model, reentrant)
    model.train()
    randomize_trainable(model)
    return model


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_adapter_gets_the_uncheckpointed_gradient(model_name, reentrant, when):
    builder, settings, batch = MODELS[model_name]
    config = dt.LoraConfig(r=2, lora_alpha=4, **settings)
    checkpointed = wrapped(builder, config, when, reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    grads = assert_every_trainable_param_gets_grad(checkpointed, batch)
    plain = assert_every_trainable_param_gets_grad(wrapped(builder, config, None), batch)
    assert grads.keys() == plain.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


METHODS = {  # adapters of other kinds inside the checkpointed blocks of a ViT (no input_ids: the hard case)
    "dora": dt.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "loha": dt.LoHaConfig(r=2, alpha=4, target_modules=["q_proj"]),
    "lokr": dt.LoKrConfig(r=2, alpha=4, target_modules=["q_proj"]),
    "ia3": dt.IA3Config(target_modules=["q_proj", "fc2"], feedforward_modules=["fc2"]),
    "vera": dt.VeraConfig(r=2, target_modules=["q_proj", "v_proj"]),
    "adalora": dt.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj"]),
    "ln_tuning": dt.LNTuningConfig(target_modules=["layernorm_before"]),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("method", list(METHODS))
def test_other_methods_train_under_reentrant_checkpointing(method):
    batch = {"pixel_values": image_batch(), "labels": torch.tensor([1, 2])}
    grads = assert_every_trainable_param_gets_grad(wrapped(tiny_vit, METHODS[method], "before"), batch)
    plain = assert_every_trainable_param_gets_grad(wrapped(tiny_vit, METHODS[method], None), batch)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain[name], atol=1e-6, rtol=1e-5, msg=name)


def one_layer_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=3)
    return ViTForImageClassification(config).float().eval()


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("head", [["classifier"], None], ids=["trained_head", "no_head"])
def test_issue_replay_one_layer_vit(head):
    # The issue's input: reentrant checkpointing before get_peft_model, LoRA on the attention query
    # (named q_proj in this Transformers), classifier in modules_to_save. Before: every LoRA gradient was
    # None; without the head, torch's bare "element 0 of tensors does not require grad".
    base = one_layer_vit()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = dt.get_peft_model(base, dt.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=head)).train()
    randomize_trainable(model)
    grads = assert_every_trainable_param_gets_grad(model, {"pixel_values": image_batch(), "labels": torch.tensor([0, 2])})
    assert sum(".lora_" in name for name in grads) == 2


class CheckpointedMLP(nn.Module):
    """No Transformers model: one block checkpointed reentrantly, and no input embeddings to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.block.gradient_checkpointing = True
        self.block._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.block(x)
        return self.block._gradient_checkpointing_func(self.block, x)


def test_reentrant_checkpointing_without_input_embeddings_is_a_clear_error():
    torch.manual_seed(0)
    model = dt.get_peft_model(CheckpointedMLP(), dt.LoraConfig(r=2, target_modules=["block.0"])).train()
    with pytest.raises(dt.DeltaConfigError, match=r"use_reentrant=True.*\['block'\].*use_reentrant': False"):
        model(torch.randn(2, 4))
    model.eval()  # no training forward, nothing to check
    with torch.no_grad():
        assert model(torch.randn(2, 4)).shape == (2, 4)
