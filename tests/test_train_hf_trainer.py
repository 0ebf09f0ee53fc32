"""A DeltaModel trains inside Hugging Face `Trainer`, and the adapter it saves loads back."""

from __future__ import annotations

import pytest
import torch
from helpers_train import make_tokenizer, upper_rows
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from deltatune import DeltaModel, LoraConfig, get_peft_model
from deltatune.train.data.files import Row
from deltatune.train.data.formats import to_sample
from deltatune.train.hf import DeltaTrainer
from deltatune.train.data.tokenize import Encoded, collate, encode

TOKENIZER = make_tokenizer()


def tiny_llama(tied: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same base every call
    config = LlamaConfig(
        vocab_size=len(TOKENIZER),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        pad_token_id=TOKENIZER.pad_token_id,
    )
    return LlamaForCausalLM(config)


def features() -> list[dict]:
    samples = [to_sample(Row(row, "mem", i), "messages") for i, row in enumerate(upper_rows(16))]
    examples, _ = encode(samples, TOKENIZER, max_length=64)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def collator(batch: list[dict]) -> dict:
    return collate([Encoded(f["input_ids"], f["labels"]) for f in batch], TOKENIZER.pad_token_id)


def arguments(out, **extra) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
    )
    settings.update(extra)
    return TrainingArguments(**settings)


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def wrapped(tied: bool) -> DeltaModel:
    torch.manual_seed(1)
    return get_peft_model(
        tiny_llama(tied), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )


def test_stock_trainer_trains_only_the_adapter(tmp_path):
    model = wrapped(tied=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, remove_unused_columns=False),
        train_dataset=features(),
        data_collator=collator,
    )
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    for name, param in model.named_parameters():
        assert torch.equal(before[name], param) != param.requires_grad, name  # adapters moved, base did not
    model.save_pretrained(str(tmp_path / "adapter"))
    batch = collator(features()[:2])
    reloaded = DeltaModel.from_pretrained(tiny_llama(tied=False), str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


def test_delta_trainer_checkpoints_are_adapters(tmp_path):
    """Tied embeddings (like SmolLM2) break the stock Trainer's state-dict save; DeltaTrainer saves the
    adapter, which loads back with the same outputs, and resumes from it."""
    tied = True
    model = wrapped(tied)
    trainer = DeltaTrainer(
        model=model,
        args=arguments(tmp_path / "out", save_strategy="steps", save_steps=2),
        train_dataset=features(),
        data_collator=collator,
    )  # default remove_unused_columns
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (
        checkpoint / "adapter_config.json"
    ).is_file()
    batch = collator(features()[:2])
    reloaded = DeltaModel.from_pretrained(tiny_llama(tied), str(checkpoint))
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=1e-5, atol=1e-5)

    resumed = wrapped(tied)
    trainer = DeltaTrainer(
        model=resumed,
        args=arguments(tmp_path / "out", save_strategy="steps", save_steps=2),
        train_dataset=features(),
        data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    torch.testing.assert_close(logits(resumed, batch), logits(model, batch), rtol=1e-4, atol=1e-5)


def test_stock_trainer_with_bf16_autocast(tmp_path):
    model = wrapped(tied=False)
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, remove_unused_columns=False, bf16=True, max_steps=2),
        train_dataset=features(),
        data_collator=collator,
    )
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_delta_trainer_loss_from_hidden_states_trains_like_the_stock_trainer(tmp_path, accumulate, monkeypatch):
    """DeltaTrainer takes the loss without the full logits tensor (linear_loss.py); the training losses
    and the trained adapter equal the stock Trainer's, with and without gradient accumulation."""
    from deltatune.train import evaluate

    calls = []
    chunked = evaluate.linear_cross_entropy
    monkeypatch.setattr(evaluate, "linear_cross_entropy", lambda *a: calls.append(1) or chunked(*a))
    runs = {}
    for name, cls in (("stock", Trainer), ("delta", DeltaTrainer)):
        model = wrapped(tied=True)
        trainer = cls(model=model, args=arguments(tmp_path / name, remove_unused_columns=False,
                                                  gradient_accumulation_steps=accumulate),
                      train_dataset=features(), data_collator=collator)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[name] = (losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert len(calls) == 4 * accumulate  # DeltaTrainer took the chunked path on every micro-batch
    assert runs["delta"][0] == pytest.approx(runs["stock"][0], rel=1e-4)
    for name, param in runs["stock"][1].items():
        torch.testing.assert_close(runs["delta"][1][name], param, rtol=1e-4, atol=1e-5)
