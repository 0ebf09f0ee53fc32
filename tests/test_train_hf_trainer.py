"""A DeltaModel trains inside Hugging Face `Trainer`, and the adapter it saves loads back."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from deltatune import DeltaModel, LoraConfig, get_peft_model
from deltatune.train.data.files import Row
from deltatune.train.data.formats import to_sample
from deltatune.train.data.tokenize import Encoded, collate, encode
from deltatune.train.hf import DeltaTrainer
from helpers_train import make_tokenizer, upper_rows

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


# ---------------------------------------------------------------------- training-time method hooks
class HookLog:
    """Records the DeltaModel hooks a trainer calls, in order, with the step each gets."""

    def __init__(self, model: DeltaModel, monkeypatch) -> None:
        self.calls: list[tuple] = []
        for name in ("before_training", "before_optimizer_step", "after_optimizer_step", "extra_loss"):
            original = getattr(model, name)

            def spy(*args, _name=name, _original=original, **kwargs):
                step = args[0] if _name.endswith("optimizer_step") else None
                has_optimizer = len(args) > 1 and args[1] is not None
                self.calls.append((_name, step, has_optimizer) if step is not None else (_name,))
                return _original(*args, **kwargs)

            monkeypatch.setattr(model, name, spy)


def test_delta_trainer_calls_every_method_hook_where_the_loop_does(tmp_path, monkeypatch):
    """Before: DeltaTrainer never called before/after_optimizer_step (nor before_training or extra_loss),
    so AdaLoRA's budget, ReLoRA's merges, Child-Tuning's masks and COFT's projection silently did nothing."""
    model = wrapped(tied=False)
    log = HookLog(model, monkeypatch)
    args = arguments(tmp_path / "out", gradient_accumulation_steps=2, per_device_train_batch_size=2)
    DeltaTrainer(model=model, args=args, train_dataset=features(), data_collator=collator).train()
    per_step = [("extra_loss",), ("extra_loss",)]  # one per micro-batch, as train/loop.py
    expected = [("before_training",)]
    for step in range(4):
        expected += per_step + [("before_optimizer_step", step, False), ("after_optimizer_step", step, True)]
    assert log.calls == expected


def test_relora_merges_under_delta_trainer(tmp_path):
    """ReLoRA with relora_steps=2 over 4 steps merges twice: the base weights move and the adapter is back
    to a zero update (before: no merge ever happened under Trainer)."""
    from deltatune import ReLoraConfig

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(False), ReLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            relora_steps=2, relora_warmup_steps=0,
                                                            task_type="CAUSAL_LM"))
    q_proj = model.model.model.layers[0].self_attn.q_proj
    before = q_proj.base_layer.weight.detach().clone()
    DeltaTrainer(model=model, args=arguments(tmp_path / "out"), train_dataset=features(),
                 data_collator=collator).train()
    adapter = q_proj.adapters["default"]
    assert len(adapter.relora_merged) == 2  # merged after steps 2 and 4
    assert not torch.equal(q_proj.base_layer.weight, before)
    assert torch.count_nonzero(adapter.lora_B.weight) == 0  # re-initialised to a zero update at the last merge


def test_adalora_rank_budget_under_delta_trainer(tmp_path):
    """AdaLoRA's schedule prunes to target_r per layer by total_step - tfinal: under Trainer too."""
    from deltatune import AdaLoraConfig

    torch.manual_seed(1)
    config = AdaLoraConfig(init_r=6, target_r=2, tinit=0, tfinal=1, deltaT=1, total_step=4,
                           target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(False), config)
    DeltaTrainer(model=model, args=arguments(tmp_path / "out"), train_dataset=features(),
                 data_collator=collator).train()
    kept = model.peft_config["default"].rank_pattern  # {layer.lora_E: [kept?] * init_r}, set by the budget
    assert kept and len(kept) == 4 and all(len(mask) == 6 for mask in kept.values())
    assert sum(sum(mask) for mask in kept.values()) == 2 * len(kept)  # target_r per layer on average


def test_child_tuning_d_takes_its_fisher_mask_under_delta_trainer(tmp_path):
    """before_training hands Child-Tuning_D training batches and the task loss (hf.DeltaTrainer.task_loss);
    before: no mask, and the first optimizer step refused to run."""
    from deltatune import ChildTuningConfig

    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(False), ChildTuningConfig(child_tuning_mode="D", reserve_p=0.25,
                                                                target_modules=["q_proj", "v_proj"],
                                                                fisher_batches=2, task_type="CAUSAL_LM"))
    DeltaTrainer(model=model, args=arguments(tmp_path / "out"), train_dataset=features(),
                 data_collator=collator).train()
    masks = [m.adapters["default"].child_mask for _, m in model.delta_layers()]
    assert len(masks) == 4 and all(mask is not None for mask in masks)
    kept = sum(int(mask.sum()) for mask in masks) / sum(mask.numel() for mask in masks)
    assert 0.25 <= kept < 0.3  # the global top 25% (ties may keep a few more)
