"""The chunked next-token loss (train/linear_loss.py) gives the plain logits path's loss and gradients,
and models it cannot serve keep the plain path."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.core import linear_loss
from deltatune.train import evaluate
from deltatune.train.evaluate import token_loss_sum
from deltatune.train.linear_loss import chunked_loss_head, linear_cross_entropy
from tiny_models import tiny_gpt2, tiny_llama, token_batch


@pytest.mark.parametrize("with_bias,head_trains", [(False, False), (True, True)])
def test_chunks_equal_cross_entropy_on_full_logits(monkeypatch, with_bias, head_trains):
    monkeypatch.setattr(linear_loss, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk: several chunks
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=gen, requires_grad=True)
    weight = torch.randn(50, 8, generator=gen).requires_grad_(head_trains)
    bias = torch.randn(50, generator=gen).requires_grad_(head_trains) if with_bias else None
    targets = torch.randint(0, 50, (10,), generator=gen)
    targets[[2, 7]] = -100  # ignored rows
    inputs = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]

    ours = linear_cross_entropy(hidden, weight, bias, targets)
    (2.5 * ours).backward()
    got = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    logits = F.linear(hidden, weight, bias)
    reference = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    (2.5 * reference).backward()
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-5)
    for mine, theirs in zip(got, [t.grad for t in inputs]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, bias, targets), reference.detach())


def plain_token_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])  # untied head; head tied to the embeddings
def test_training_loss_and_adapter_gradients_equal_the_logits_path(build, monkeypatch):
    monkeypatch.setattr(linear_loss, "CHUNK_ELEMENTS", 4 * 1000)  # a few rows per chunk
    model = deltatune.get_peft_model(build(), deltatune.LoraConfig(r=4, target_modules="all-linear",
                                                                   init_lora_weights="gaussian"))
    assert chunked_loss_head(model) is not None
    ids = token_batch(3, 7)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt tokens do not count
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    loss, count = token_loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    reference = plain_token_loss(model, batch)
    reference.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-5)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_models_it_cannot_serve_keep_the_logits_path():
    prompt = deltatune.get_peft_model(tiny_llama(), deltatune.PromptTuningConfig(num_virtual_tokens=2,
                                                                                 task_type="CAUSAL_LM"))
    assert chunked_loss_head(prompt) is None  # the soft prompt runs the model its own way
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert chunked_loss_head(capped) is None
    head_adapted = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=2, target_modules=["lm_head"]))
    assert chunked_loss_head(head_adapted) is None


def lora_llama(seed: int = 0):
    return deltatune.get_peft_model(tiny_llama(seed), deltatune.LoraConfig(r=4, target_modules="all-linear",
                                                                           init_lora_weights="gaussian"))


def labelled_batch(rows: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    ids = token_batch(rows, length)
    labels = ids.clone()
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def count_chunked(monkeypatch) -> list[int]:
    calls, chunked = [], evaluate.linear_cross_entropy
    monkeypatch.setattr(evaluate, "linear_cross_entropy", lambda *a: calls.append(1) or chunked(*a))
    return calls


def test_the_chunked_loss_runs_through_delta_model_forward(monkeypatch):
    """It called the backbone directly, past DeltaModel.forward's lock, routing and checkpoint replay."""
    model, calls = lora_llama(), count_chunked(monkeypatch)
    entered = []
    model.register_forward_pre_hook(lambda module, args: entered.append(module))
    head = model.model.lm_head
    token_loss_sum(model, labelled_batch())
    assert entered == [model] and calls == [1]
    assert model.model.lm_head is head  # the head is back after the call


def test_under_ddp_the_same_chunked_loss_and_gradients(monkeypatch):
    """One process and N processes take one path: DDP around the DeltaModel no longer falls back to the
    full logits (a 1-process gloo group here; tests/test_train_ddp.py runs 2 processes end to end)."""
    if not dist.is_initialized():
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        plain, wrapped_inner = lora_llama(), lora_llama()
        wrapped = torch.nn.parallel.DistributedDataParallel(wrapped_inner)
        assert chunked_loss_head(wrapped) is wrapped_inner.model.lm_head
        calls, batch = count_chunked(monkeypatch), labelled_batch()
        for model in (plain, wrapped):
            loss, _ = token_loss_sum(model, batch)
            loss.backward()
        assert calls == [1, 1]
        torch.testing.assert_close(token_loss_sum(wrapped, batch)[0], token_loss_sum(plain, batch)[0])
        for (name, a), b in zip(plain.named_parameters(), wrapped_inner.parameters()):
            if a.requires_grad:
                torch.testing.assert_close(a.grad, b.grad, msg=name)
    finally:
        dist.destroy_process_group()


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor any op makes (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


def test_no_tokens_by_vocabulary_tensor_is_made(monkeypatch):
    """The point of linear_loss.py, now that the loss goes through the model's forward: the largest
    tensor of a forward and backward is one chunk of logits or the head's weight (or a view of it), not
    (tokens x vocabulary)."""
    monkeypatch.setattr(linear_loss, "CHUNK_ELEMENTS", 8 * 4096)  # 8 rows of a 4096-token vocabulary
    config = LlamaConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = deltatune.get_peft_model(LlamaForCausalLM(config), deltatune.LoraConfig(r=2, target_modules="all-linear"))
    batch = labelled_batch(4, 48)  # 188 predicted tokens: logits would be 770k floats
    with LargestNewTensor() as seen:
        loss, _ = token_loss_sum(model, batch)
        loss.backward()
    tokens_by_vocab = 4 * 47 * 4096
    head_weight = 4096 * 16
    assert seen.largest <= max(8 * 4096, head_weight) < tokens_by_vocab // 10, seen.largest
