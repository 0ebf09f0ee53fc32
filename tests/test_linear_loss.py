"""The chunked next-token loss (train/linear_loss.py) gives the plain logits path's loss and gradients,
and models it cannot serve keep the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_gpt2, tiny_llama, token_batch

import deltatune
from deltatune.train import linear_loss
from deltatune.train.evaluate import token_loss_sum
from deltatune.train.linear_loss import linear_cross_entropy, token_loss_parts


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
    assert token_loss_parts(model) is not None
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
    assert token_loss_parts(prompt) is None  # the soft prompt runs the model its own way
    capped = tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    assert token_loss_parts(capped) is None
    head_adapted = deltatune.get_peft_model(tiny_llama(), deltatune.LoraConfig(r=2, target_modules=["lm_head"]))
    assert token_loss_parts(head_adapted) is None
    assert token_loss_parts(torch.nn.parallel.DistributedDataParallel.__new__(
        torch.nn.parallel.DistributedDataParallel)) is None
