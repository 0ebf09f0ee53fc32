"""`model(input_ids=..., labels=...)` (core/labels_loss.py): Transformers' loss taken from the hidden states
in chunks, `logits` computed when first read; checked against the loss computed by hand from the logits,
against the wrapped model's own loss, and for the memory it was built to save."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.core import linear_loss
from test_linear_loss import LargestNewTensor  # records the largest tensor any op makes
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, token_batch


def lora(build=tiny_llama, **config):
    model = deltatune.get_peft_model(build(), deltatune.LoraConfig(r=4, target_modules="all-linear",
                                                                   init_lora_weights="gaussian", **config))
    return model


def labelled(rows: int = 3, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    ids = token_batch(rows, length)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[0, -1] = -100
    return ids, labels


def by_hand(logits: torch.Tensor, labels: torch.Tensor, count=None) -> torch.Tensor:
    """Next-token cross-entropy written out: position t predicts label t+1; -100 does not count."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    keep = targets != -100
    picked = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    total = -(picked * keep).sum()
    return total / (keep.sum() if count is None else count)


def adapter_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])  # untied head; head tied to the embeddings
def test_loss_logits_and_gradients_equal_the_logits_path(build, monkeypatch):
    monkeypatch.setattr(linear_loss, "CHUNK_ELEMENTS", 4 * VOCAB)  # 4 rows per chunk: several chunks
    model, (ids, labels) = lora(build), labelled()
    out = model(input_ids=ids, labels=labels)
    assert out.loss.dtype == torch.float32 and out.loss.grad_fn.name() == "DivBackward0"  # the chunked path
    out.loss.backward()
    ours = adapter_grads(model)
    logits = model(input_ids=ids).logits  # no labels: the wrapped model's own forward
    reference = by_hand(logits, labels)
    reference.backward()
    torch.testing.assert_close(out.loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits, logits.detach())
    for name, grad in adapter_grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    model.chunked_labels_loss = False
    torch.testing.assert_close(model(input_ids=ids, labels=labels).loss, out.loss, rtol=1e-6, atol=1e-6)


def test_num_items_in_batch_shift_labels_and_ignore_index_as_transformers_reads_them():
    model, (ids, labels) = lora(), labelled()
    logits = model(input_ids=ids).logits
    count = torch.tensor(11)  # Trainer's token count over a whole optimizer step
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=count).loss,
                               by_hand(logits, labels, count))
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    torch.testing.assert_close(model(input_ids=ids, labels=labels, shift_labels=shifted).loss, by_hand(logits, labels))
    minus_one = torch.where(labels == -100, -1, labels)
    torch.testing.assert_close(model(input_ids=ids, labels=minus_one, ignore_index=-1).loss, by_hand(logits, labels))
    model.chunked_labels_loss = False  # Transformers' own loss agrees on each
    torch.testing.assert_close(model(input_ids=ids, labels=labels, num_items_in_batch=count).loss,
                               by_hand(logits, labels, count))


def test_every_way_of_reading_the_logits_gives_them():
    model, (ids, labels) = lora(), labelled()
    model.eval()
    with torch.no_grad():
        model.chunked_labels_loss = False
        plain = model(input_ids=ids, labels=labels)
        model.chunked_labels_loss = True
        reads = {
            "attribute": lambda out: out.logits,
            "key": lambda out: out["logits"],
            "index": lambda out: out[1],
            "to_tuple": lambda out: out.to_tuple()[1],
            "items": lambda out: dict(out.items())["logits"],
            "values": lambda out: list(out.values())[1],
            "get": lambda out: out.get("logits"),
            "pickle": lambda out: pickle.loads(pickle.dumps(out)).logits,
            "deepcopy": lambda out: copy.deepcopy(out).logits,
            "unpacked": lambda out: {**out}["logits"],
        }
        for how, read in reads.items():
            out = model(input_ids=ids, labels=labels)
            assert list(out.keys()) == list(plain.keys()) and isinstance(out, type(plain)), how
            torch.testing.assert_close(read(out), plain.logits, msg=how)
        assert type(pickle.loads(pickle.dumps(out))) is type(plain)


def test_logits_read_later_keep_the_forward_calls_graph_and_autocast():
    """Read under no_grad (TRL's entropy does), they still carry the graph a forward with grad made; a loss
    built on them (distillation) back-propagates into the adapters as the eager logits do."""
    model, (ids, labels) = lora(), labelled()
    out = model(input_ids=ids, labels=labels)
    with torch.no_grad():
        out.logits.sum()
    out.logits.pow(2).mean().backward()
    ours = adapter_grads(model)
    model(input_ids=ids).logits.pow(2).mean().backward()
    for name, grad in adapter_grads(model).items():
        torch.testing.assert_close(ours[name], grad, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels)
        expected = model(input_ids=ids).logits
    assert out.logits.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.logits, expected)


def test_reading_logits_after_the_head_changed_is_an_error():
    model, (ids, labels) = lora(), labelled()
    out = model(input_ids=ids, labels=labels)
    with torch.no_grad():
        model.model.lm_head.weight.mul_(2)
    with pytest.raises(RuntimeError, match="output head's weight changed"):
        _ = out.logits


@pytest.mark.parametrize("case", ["head_trains", "custom_loss", "logits_to_keep", "positions_to_keep", "tuple",
                                  "switched_off", "prompt", "patched_forward"])
def test_calls_whose_numbers_could_differ_run_the_models_own_loss(case):
    model, (ids, labels) = lora(), labelled()
    kwargs = {"input_ids": ids, "labels": labels}
    if case == "head_trains":
        model = lora(modules_to_save=["lm_head"])
    elif case == "custom_loss":
        model.model.loss_function = lambda logits, labels, vocab_size, **kw: logits.float().mean()
    elif case == "logits_to_keep":
        kwargs.update(logits_to_keep=3, labels=labels[:, -3:])  # Transformers: the loss of the last 3
    elif case == "positions_to_keep":  # a tensor of positions (Transformers takes those too)
        kwargs.update(logits_to_keep=torch.tensor([5, 6]), labels=labels[:, -2:])
    elif case == "patched_forward":  # an instance-level forward, as TRL's add_fused_lm_head installs
        original = model.model.forward
        model.model.forward = lambda *a, **kw: original(*a, **kw)
    elif case == "tuple":
        kwargs["return_dict"] = False
    elif case == "switched_off":
        model.chunked_labels_loss = False
    else:
        model = deltatune.get_peft_model(tiny_llama(), deltatune.PromptTuningConfig(
            num_virtual_tokens=2, task_type="CAUSAL_LM"))
    out = model(**kwargs)
    loss = out[0]
    assert loss.grad_fn.name() != "DivBackward0"  # not the chunked path
    if case == "custom_loss":
        torch.testing.assert_close(loss, model(input_ids=ids).logits.float().mean())


def test_a_training_step_that_reads_only_the_loss_makes_no_logits_tensor(monkeypatch):
    """The point of it: `model(**batch).loss.backward()` (Trainer, TRL, a hand-written loop) never makes a
    (tokens x vocabulary) tensor; reading the logits does."""
    monkeypatch.setattr(linear_loss, "CHUNK_ELEMENTS", 8 * 4096)
    config = LlamaConfig(vocab_size=4096, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = deltatune.get_peft_model(LlamaForCausalLM(config), deltatune.LoraConfig(r=2, target_modules="all-linear"))
    ids = torch.randint(0, 4096, (4, 48))
    tokens_by_vocab = 4 * 48 * 4096
    with LargestNewTensor() as seen:
        model(input_ids=ids, labels=ids).loss.backward()
    assert seen.largest < tokens_by_vocab // 10, seen.largest
    with LargestNewTensor() as seen:
        _ = model(input_ids=ids, labels=ids).logits
    assert seen.largest == tokens_by_vocab
