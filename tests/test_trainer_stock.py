"""A `peft` user's training script runs unchanged on a deltatune model: stock `transformers.Trainer` and
TRL's `SFTTrainer` with their defaults (the column filter on), two steps, a checkpoint after each, a
resume from the first; checkpoints and `save_model()` hold the adapter only, even with tied embeddings
(GPT-2 ties wte and lm_head: the full state dict refuses to save, "Some tensors share memory")."""

from __future__ import annotations

import copy
import inspect
import os
import pickle
import sys
import types

import datasets
import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import deltatune as dt
from deltatune.api import facade as plain_model
from deltatune.api import peft_face
from deltatune.io.adapter_files import AdapterFileError
from deltatune.train.hf import DeltaTrainer
from helpers_train import make_tokenizer
from tiny_models import VOCAB, tiny_bert_cls, tiny_gpt2, tiny_llama, token_batch

# what Trainer writes next to the model in a checkpoint; the model itself must be these two files only
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def lora_gpt2() -> dt.DeltaModel:
    torch.manual_seed(1)
    return dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))


def token_dataset() -> datasets.Dataset:
    """16 rows of 8 token ids, plus a text column no forward takes (the column filter must drop it)."""
    ids = torch.randint(1, VOCAB, (16, 8), generator=torch.Generator().manual_seed(0)).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "text": ["not a model input"] * 16})


def arguments(out, cls=TrainingArguments, **extra):
    settings = dict(output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=4,
                    learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=3)
    return cls(**{**settings, **extra})


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(trainer) -> list[torch.Tensor]:
    state = trainer.optimizer.state_dict()["state"]
    return [t for key in sorted(state) for t in state[key].values() if isinstance(t, torch.Tensor)]


def assert_same_run(straight, resumed, straight_model, resumed_model) -> None:
    """The run resumed from checkpoint-1 ends where the straight run ended: adapter and optimizer state."""
    assert resumed.state.global_step == straight.state.global_step == 2
    ends = trained(straight_model)
    for name, value in trained(resumed_model).items():
        torch.testing.assert_close(value, ends[name], rtol=0, atol=0, msg=name)
    for mine, theirs in zip(optimizer_tensors(resumed), optimizer_tensors(straight), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_forward_shows_the_wrapped_models_parameters():
    """Trainer's column filter reads inspect.signature(model.forward): each base shows its own columns."""
    causal = dt.get_peft_model(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    classifier = dt.get_peft_model(tiny_bert_cls(), dt.LoraConfig(r=4, target_modules=["query"]))
    for model in (causal, classifier):
        shown = inspect.signature(model.forward).parameters
        base = inspect.signature(model.get_base_model().forward).parameters
        assert [n for n in shown if n not in ("adapter_names", "task_ids")] == list(base)
        assert shown["adapter_names"].kind is inspect.Parameter.KEYWORD_ONLY
        assert isinstance(model.forward, types.MethodType)  # accelerate's autocast wraps forward.__func__
    assert "labels" in inspect.signature(causal.forward).parameters
    assert "token_type_ids" in inspect.signature(classifier.forward).parameters
    assert "token_type_ids" not in inspect.signature(causal.forward).parameters
    ids = token_batch()
    torch.testing.assert_close(causal(ids).logits, causal(input_ids=ids).logits, rtol=0, atol=0)


def test_peft_face_is_a_peft_model_that_answers_like_a_delta_model(monkeypatch):
    model = lora_gpt2()
    assert isinstance(model, peft.PeftModel) and isinstance(model, dt.DeltaModel)
    assert model.base_model.model is model.get_base_model()  # peft's shape: label smoothing, NEFTune
    monkeypatch.delitem(sys.modules, "peft")  # a process that never imported peft gets the plain class
    plain = lora_gpt2()
    monkeypatch.undo()
    assert type(plain) is plain_model.DeltaModel
    for name in peft_face._peft_only_names():  # peft's own attributes are hidden: the same answers as plain
        assert hasattr(model, name) == hasattr(plain, name), name
    assert model.peft_config.keys() == plain.peft_config.keys()
    assert model.active_adapters == plain.active_adapters
    ids = token_batch()
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=0)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert type(copied) is type(model)
        torch.testing.assert_close(logits(copied, ids), logits(model, ids), rtol=0, atol=0)


def test_stock_trainer_checkpoints_the_adapter_and_resumes(tmp_path):
    out = tmp_path / "run"
    straight_model = lora_gpt2()
    straight = Trainer(model=straight_model, args=arguments(out), train_dataset=token_dataset())
    straight.train()
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        assert set(os.listdir(out / checkpoint)) == ADAPTER_FILES | TRAINER_STATE

    resumed_model = lora_gpt2()
    resumed = Trainer(model=resumed_model, args=arguments(out), train_dataset=token_dataset())
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert_same_run(straight, resumed, straight_model, resumed_model)

    straight.save_model(str(tmp_path / "final"))
    assert set(os.listdir(tmp_path / "final")) == ADAPTER_FILES | {"training_args.bin"}
    ids = token_batch()
    expected = logits(straight_model, ids)
    ours = dt.DeltaModel.from_pretrained(tiny_gpt2(), str(tmp_path / "final"))
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "final"))
    torch.testing.assert_close(logits(ours, ids), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(theirs, ids), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits(tiny_gpt2(), ids), expected, atol=1e-4)  # training moved the adapter


def tied_llama(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    return LlamaForCausalLM(config)


def test_trl_sft_trainer_checkpoints_the_adapter_and_resumes(tmp_path):
    tokenizer = make_tokenizer()
    data = datasets.Dataset.from_dict({"prompt": [f"Q{i}:" for i in range(16)],
                                       "completion": [f" A{i}" for i in range(16)]})
    out = tmp_path / "sft"

    def run(resume=None):
        torch.manual_seed(1)
        model = dt.get_peft_model(tied_llama(tokenizer), dt.LoraConfig(r=4, target_modules="all-linear"))
        trainer = SFTTrainer(model=model, args=arguments(out, SFTConfig, max_length=32), train_dataset=data,
                             processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, model

    straight, straight_model = run()
    files = set(os.listdir(out / "checkpoint-1"))
    assert ADAPTER_FILES | TRAINER_STATE <= files and not {"model.safetensors", "pytorch_model.bin"} & files
    resumed, resumed_model = run(resume=str(out / "checkpoint-1"))
    assert_same_run(straight, resumed, straight_model, resumed_model)
    reloaded = dt.DeltaModel.from_pretrained(tied_llama(tokenizer), str(out / "checkpoint-2"))
    ids = token_batch()
    # SFTConfig trains in bf16 autocast by default: accelerate wrapped forward, unwrap_model takes it off
    final = straight.accelerator.unwrap_model(straight_model, keep_fp32_wrapper=False)
    torch.testing.assert_close(logits(reloaded, ids), logits(final, ids), rtol=0, atol=0)


def test_delta_trainer_saves_the_adapter_without_peft(tmp_path, monkeypatch):
    """Where peft is not installed (a plain DeltaModel), DeltaTrainer still checkpoints the adapter and
    resumes; the stock Trainer's full state dict would refuse GPT-2's tied embeddings."""
    monkeypatch.delitem(sys.modules, "peft")
    straight_model, resumed_model = lora_gpt2(), lora_gpt2()
    monkeypatch.undo()
    assert type(straight_model) is plain_model.DeltaModel
    out = tmp_path / "run"
    straight = DeltaTrainer(model=straight_model, args=arguments(out), train_dataset=token_dataset())
    straight.train()
    assert set(os.listdir(out / "checkpoint-1")) == ADAPTER_FILES | TRAINER_STATE
    resumed = DeltaTrainer(model=resumed_model, args=arguments(out), train_dataset=token_dataset())
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    assert_same_run(straight, resumed, straight_model, resumed_model)


def test_load_adapter_into_an_existing_adapter_replaces_its_weights(tmp_path):
    """peft's rule, which Trainer's resume relies on; a differently configured file is refused."""
    source = lora_gpt2()
    with torch.no_grad():
        for param in source.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1)
    source.save_pretrained(str(tmp_path / "a"))
    target = lora_gpt2()
    target.load_adapter(str(tmp_path / "a"), "default", is_trainable=True)
    ids = token_batch()
    torch.testing.assert_close(logits(target, ids), logits(source, ids), rtol=0, atol=0)
    assert list(target.peft_config) == ["default"]
    other = dt.get_peft_model(tiny_gpt2(), dt.LoraConfig(r=2, target_modules=["c_attn"]))
    other.save_pretrained(str(tmp_path / "b"))
    before = trained(target)
    differ = r"'default' already exists with another config \(r, target_modules"
    with pytest.raises(AdapterFileError, match=differ):
        target.load_adapter(str(tmp_path / "b"), "default")
    for name, value in trained(target).items():
        assert torch.equal(value, before[name]), name
