"""Preference tuning with TRL on a DeltaModel (issue 17, item 17): DPO and KTO with the reference being
the adapter disabled (no second base in memory, equal to the base exactly), and ORPO (no reference).

Each test follows a user's steps: wrap a base with deltatune.get_peft_model, build TRL's trainer on an
in-memory `datasets.Dataset`, train two steps. The reference log-probs TRL trains against are checked
against an untouched copy of the base, scored with the same arithmetic, bit for bit.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, KTOConfig
from trl.trainer.utils import add_fused_lm_head

from deltatune import DeltaDPOTrainer, DeltaKTOTrainer, DeltaModel, LoraConfig, PromptTuningConfig, get_peft_model
from helpers_train import make_tokenizer

TOKENIZER = make_tokenizer()
PAIRS = {
    "prompt": ["2+2=", "The capital of France is", "The sky is", "Say hi:"],
    "chosen": [" 4", " Paris", " blue", " hello"],
    "rejected": [" 5", " Rome", " green", " bye"],
}


def tiny_llama() -> LlamaForCausalLM:
    """2-layer random Llama (hidden 32) over the byte-level test tokenizer; the same weights every call."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=TOKENIZER.pad_token_id,
                         bos_token_id=TOKENIZER.bos_token_id, eos_token_id=TOKENIZER.eos_token_id)
    return LlamaForCausalLM(config).eval()


def base_and_policy(trained_adapter: bool):
    """(untouched copy of the base, DeltaModel over the same weights). `trained_adapter` gives lora_B
    random values, as an adapter loaded to be trained further: then policy != base."""
    base = tiny_llama()
    untouched = copy.deepcopy(base)
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if trained_adapter:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5)
    return untouched, model


def arguments(config_class, out, **extra):
    settings = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                    logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    settings.update(extra)
    return config_class(**settings)


def batches(trainer, ref_columns: list[str]):
    """The trainer's own padded batches, in the order TRL precomputed the reference (no shuffling)."""
    rows = trainer.train_dataset.remove_columns(ref_columns)
    return DataLoader(rows, batch_size=trainer.args.per_device_train_batch_size,
                      collate_fn=trainer.data_collator)


def scored(model, trainer, ref_columns: list[str]) -> torch.Tensor:
    """Completion log-probs of `model` on the trainer's batches through TRL's fused LM head, under the
    trainer's autocast (the arithmetic TRL uses): (rows in the collator's order,)."""
    model = copy.deepcopy(model)  # add_fused_lm_head patches forward; keep the caller's model as it is
    add_fused_lm_head(model)
    sums = []
    with torch.no_grad(), trainer.accelerator.autocast():  # TRL's precision (bf16 autocast by default)
        for batch in batches(trainer, ref_columns):
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        fused_lm_head=True)
            sums.append(out.log_probs.sum(-1))
    return torch.cat(sums)


def by_hand(model, trainer, ref_columns: list[str]) -> torch.Tensor:
    """The same log-probs from full logits with log_softmax (independent of TRL's fused kernel)."""
    sums = []
    with torch.no_grad():
        for batch in batches(trainer, ref_columns):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            sums.append((logps * batch["completion_mask"][:, 1:]).sum(-1))  # (rows,)
    return torch.cat(sums)


def dpo_reference(trainer) -> torch.Tensor:
    """TRL's precomputed reference, in the collator's order: each batch is [chosen rows, rejected rows]."""
    chosen = torch.tensor(trainer.train_dataset["ref_chosen_logps"])
    rejected = torch.tensor(trainer.train_dataset["ref_rejected_logps"])
    size = trainer.args.per_device_train_batch_size
    return torch.cat([torch.cat([c, r]) for c, r in zip(chosen.split(size), rejected.split(size))])


def frozen_and_adapter(model) -> tuple[dict, dict]:
    params = {name: param.detach().clone() for name, param in model.named_parameters()}
    adapter = {name: param for name, param in params.items() if "lora_" in name}
    return {name: param for name, param in params.items() if name not in adapter}, adapter


def check_trained_two_steps(trainer, model, untouched) -> None:
    """Two optimizer steps ran, every adapter parameter moved (each got a gradient), the base weights are
    bit-for-bit the untouched base's, and the adapter disabled gives the untouched base's logits (under
    the trainer's autocast, which accelerate leaves on the trained model's forward)."""
    before_base, before_adapter = frozen_and_adapter(model)
    trainer.train()
    after_base, after_adapter = frozen_and_adapter(model)
    assert trainer.state.global_step == 2
    assert all(not torch.equal(before_adapter[n], after_adapter[n]) for n in before_adapter)
    assert all(torch.equal(before_base[n], after_base[n]) for n in before_base)
    with model.disable_adapter():
        ids = TOKENIZER(["The sky is blue"], return_tensors="pt").input_ids
        model.eval()
        with trainer.accelerator.autocast():
            expected = untouched(input_ids=ids).logits.float()
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_dpo_two_steps_fresh_adapter_starts_at_ln2(tmp_path):
    """lora_B = 0: policy == reference, so every DPO margin is 0: the first loss is -log sigmoid(0) = ln 2."""
    untouched, model = base_and_policy(trained_adapter=False)
    args = arguments(DPOConfig, tmp_path)
    trainer = DeltaDPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PAIRS),
                              processing_class=TOKENIZER)
    assert trainer.ref_model is None  # no second copy of the base
    assert list(model.peft_config) == ["default"]  # nor TRL's copy of the adapter ("ref") for a PeftModel
    assert not args.precompute_ref_log_probs  # the caller's args are left as given
    check_trained_two_steps(trainer, model, untouched)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[1] != losses[0]


def test_dpo_with_peft_config_wraps_the_base(tmp_path):
    """TRL's `model=base, peft_config=...` form, with a deltatune config: the trainer wraps the base.
    With gradient checkpointing, which TRL's fused LM head must not cut off from the adapter."""
    base = tiny_llama()
    untouched = copy.deepcopy(base)
    trainer = DeltaDPOTrainer(model=base, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                              args=arguments(DPOConfig, tmp_path, gradient_checkpointing=True),
                              train_dataset=Dataset.from_dict(PAIRS), processing_class=TOKENIZER)
    assert isinstance(trainer.model, DeltaModel) and trainer.model.get_base_model() is base
    check_trained_two_steps(trainer, trainer.model, untouched)


def test_dpo_reference_is_the_base_bit_for_bit(tmp_path):
    """With an adapter that already changes the output, TRL's reference log-probs are still the base's:
    equal bit for bit to an untouched copy of the base, and unlike the policy's. In float32 (TRL's
    default is bf16 autocast, which the other tests keep) to compare with log_softmax by hand too."""
    untouched, model = base_and_policy(trained_adapter=True)
    trainer = DeltaDPOTrainer(model=model, args=arguments(DPOConfig, tmp_path, bf16=False),
                              train_dataset=Dataset.from_dict(PAIRS), processing_class=TOKENIZER)
    columns = ["ref_chosen_logps", "ref_rejected_logps"]
    reference = dpo_reference(trainer)
    assert torch.equal(reference, scored(untouched, trainer, columns))
    torch.testing.assert_close(reference, by_hand(untouched, trainer, columns), atol=1e-5, rtol=1e-6)
    policy = scored(model.model, trainer, columns)  # the adapter on
    assert (policy - reference).abs().min() > 1e-3
    check_trained_two_steps(trainer, model, untouched)


KTO_ROWS = {
    "prompt": PAIRS["prompt"] * 2,
    "completion": PAIRS["chosen"] + PAIRS["rejected"],
    "label": [True] * 4 + [False] * 4,
}


def test_kto_two_steps_reference_is_the_base(tmp_path):
    """KTO: the reference log-probs (and its KL completions' ones) are the untouched base's bit for bit."""
    untouched, model = base_and_policy(trained_adapter=True)
    args = arguments(KTOConfig, tmp_path, per_device_train_batch_size=4)
    trainer = DeltaKTOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(KTO_ROWS),
                              processing_class=TOKENIZER)
    columns = ["ref_logps", "ref_KL_logps"]
    reference = torch.tensor(trainer.train_dataset["ref_logps"])
    assert torch.equal(reference, scored(untouched, trainer, columns))
    assert (scored(model.model, trainer, columns) - reference).abs().min() > 1e-3
    check_trained_two_steps(trainer, model, untouched)


def test_kto_fresh_adapter_starts_at_one_half(tmp_path):
    """lora_B = 0: every log-ratio and the KL estimate are 0, so each KTO loss is 1 - sigmoid(0) = 1/2."""
    untouched, model = base_and_policy(trained_adapter=False)
    trainer = DeltaKTOTrainer(model=model, args=arguments(KTOConfig, tmp_path, per_device_train_batch_size=4),
                              train_dataset=Dataset.from_dict(KTO_ROWS), processing_class=TOKENIZER)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(0.5, abs=1e-6)


def test_orpo_two_steps(tmp_path):
    """ORPO has no reference model: TRL's (experimental) ORPOTrainer takes the DeltaModel as it is."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    untouched, model = base_and_policy(trained_adapter=False)
    trainer = ORPOTrainer(model=model, args=arguments(ORPOConfig, tmp_path, max_length=64),
                          train_dataset=Dataset.from_dict(PAIRS), processing_class=TOKENIZER)
    check_trained_two_steps(trainer, model, untouched)


@pytest.mark.parametrize("config, field", [
    (LoraConfig(r=4, target_modules=["q_proj", "lm_head"]), "lm_head"),
    (PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), "default"),
])
def test_refuses_adapters_trl_would_skip(tmp_path, config, field):
    """TRL's fused LM head reads lm_head.weight and calls the backbone directly: an adapter there would
    never train. Refused with one error naming it, before any dataset work."""
    model = get_peft_model(tiny_llama(), config)
    with pytest.raises(ValueError, match=field):
        DeltaDPOTrainer(model=model, args=arguments(DPOConfig, tmp_path),
                        train_dataset=Dataset.from_dict(PAIRS), processing_class=TOKENIZER)


def test_refused_peft_config_leaves_the_base_as_it_was(tmp_path):
    base = tiny_llama()
    names = [name for name, _ in base.named_modules()]
    with pytest.raises(ValueError, match="lm_head"):
        DeltaDPOTrainer(model=base, peft_config=LoraConfig(r=4, target_modules=["lm_head"]),
                        args=arguments(DPOConfig, tmp_path), train_dataset=Dataset.from_dict(PAIRS),
                        processing_class=TOKENIZER)
    assert [name for name, _ in base.named_modules()] == names


def test_refuses_a_model_without_adapters(tmp_path):
    with pytest.raises(TypeError, match="DeltaModel"):
        DeltaDPOTrainer(model=tiny_llama(), args=arguments(DPOConfig, tmp_path),
                        train_dataset=Dataset.from_dict(PAIRS), processing_class=TOKENIZER)


def test_import_deltatune_does_not_import_trl():
    """trl is optional: `import deltatune` leaves it alone; the trainers load it on first use (this
    module's own `from deltatune import DeltaDPOTrainer` is that first use)."""
    import subprocess
    import sys

    code = "import sys, deltatune; assert 'trl' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert DeltaDPOTrainer.__module__ == "deltatune.train.preference"


def test_stock_dpo_trainer_takes_a_deltamodel(tmp_path):
    """Plain `trl.DPOTrainer(model=deltamodel)`: TRL sees a `peft.PeftModel` (core/peft_face.py), holds no
    second base, and scores the reference with a frozen copy of the adapter as it was ("ref"): for a fresh
    adapter that is the untouched base bit for bit. Only "default" trains; the base stays as it was."""
    from trl import DPOTrainer

    untouched, model = base_and_policy(trained_adapter=False)
    args = arguments(DPOConfig, tmp_path, bf16=False, precompute_ref_log_probs=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=TOKENIZER)
    assert trainer.ref_model is None and sorted(model.peft_config) == ["default", "ref"]
    columns = ["ref_chosen_logps", "ref_rejected_logps"]
    assert torch.equal(dpo_reference(trainer), scored(untouched, trainer, columns))
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer.train()
    moved = {name for name, param in model.named_parameters() if not torch.equal(before[name], param)}
    assert moved == {name for name in before if ".default.lora_" in name}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)


def test_refuses_an_adapter_not_named_default(tmp_path):
    """TRL builds its reference from peft_config["default"]; another name is one clear error up front."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="mine")
    with pytest.raises(ValueError, match="named 'default'; this model has \\['mine'\\]"):
        DeltaDPOTrainer(model=model, args=arguments(DPOConfig, tmp_path),
                        train_dataset=Dataset.from_dict(PAIRS), processing_class=TOKENIZER)
