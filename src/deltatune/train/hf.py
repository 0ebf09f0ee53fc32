"""Hugging Face `Trainer` (and TRL's trainers, built on it) with a DeltaModel.

The stock `transformers.Trainer` and TRL's `SFTTrainer` take a DeltaModel as they take a `peft` model:
- the column filter (`remove_unused_columns=True`, the default) reads `model.forward`'s signature, which
  shows the wrapped model's parameters (core/forward_signature.py);
- saving and resuming: Trainer calls `save_pretrained` / `load_adapter` only on a `peft.PeftModel`; a
  DeltaModel built once `peft` is imported (importing Trainer or TRL imports it) is one to isinstance
  checks (core/peft_face.py), so checkpoint-N/ and `save_model()` hold adapter_config.json +
  adapter_model.safetensors, and `trainer.train(resume_from_checkpoint=...)` loads them back.
TRL's `peft_config=` takes only `peft.PeftConfig` objects and builds a model with `peft` itself, so with
deltatune wrap first and pass the model: `SFTTrainer(model=get_peft_model(base, LoraConfig(...)), ...)`.

`DeltaTrainer` adds three things:
- the training-time method hooks, at the points our own loop calls them (train/loop.py): a DeltaModel's
  `before_training` when training starts (Child-Tuning_D's Fisher mask), `extra_loss` once per optimizer
  step (AdaLoRA's orthogonality term), `before_optimizer_step` after clipping (gradient masks) and
  `after_optimizer_step` after `optimizer.step()` (AdaLoRA's rank budget, ReLoRA's merge-and-reset, COFT);
- installs without `peft`: the stock Trainer would save the full state dict (which fails for tied
  embeddings, as in SmolLM2 and Llama 3.2); DeltaTrainer saves and resumes the adapter there too;
- it takes a causal LM's loss straight from the hidden states (train/linear_loss.py: no full logits
  tensor, the same value) when a batch holds only input_ids / attention_mask / position_ids / labels and
  no label smoothing or custom loss function is set; otherwise the stock `compute_loss` runs.

    trainer = DeltaTrainer(model=delta_model, args=args, train_dataset=ds)
    trainer.train()        # checkpoint-N/ holds adapter_config.json + adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)      # resumes from them
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import _is_peft_model

from ..core.model import DeltaModel
from .evaluate import mean_token_loss, token_loss_sum
from .linear_loss import chunked_loss_head

PLAIN_BATCH_KEYS = {"input_ids", "attention_mask", "position_ids", "labels"}  # position_ids: padding-free


def _delta(model):
    """`model` if it is a DeltaModel that the stock Trainer does not see as a peft model, else None."""
    plain = hasattr(model, "peft_config") and hasattr(model, "get_base_model") and not _is_peft_model(model)
    return model if plain else None


class MethodHooks(TrainerCallback):
    """Calls a DeltaModel's training-time hooks from Trainer's events; the step is the 0-based index of the
    optimizer step being taken (`state.global_step` before Trainer counts it), as in train/loop.py."""

    def __init__(self, trainer: DeltaTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if isinstance(model, DeltaModel) and train_dataloader is not None:
            # a generator: only a method that wants batches draws them (and the sampler's random state)
            batches = (self.trainer._prepare_inputs(batch) for batch in train_dataloader)
            model.before_training(batches, self.trainer.task_loss)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if isinstance(model, DeltaModel):
            model.before_optimizer_step(state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if isinstance(model, DeltaModel):
            model.after_optimizer_step(state.global_step, optimizer)


class DeltaTrainer(Trainer):
    """`transformers.Trainer` with the chunked causal-LM loss and the DeltaModel's training-time hooks,
    saving and resuming a DeltaModel as an adapter also where `peft` is not installed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_callback(MethodHooks(self))

    def task_loss(self, model, batch: dict) -> torch.Tensor:
        """The mean token loss of `batch` for `before_training` hooks (no regulariser): the chunked loss
        when it applies, else the model's own."""
        if "labels" in batch and not set(batch) - PLAIN_BATCH_KEYS and chunked_loss_head(model) is not None:
            return mean_token_loss(model, batch)
        return model(**batch).loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = self._data_loss(model, inputs, return_outputs, num_items_in_batch)
        inner = self.accelerator.unwrap_model(model)
        regulariser = inner.extra_loss() if isinstance(inner, DeltaModel) and model.training else None
        if regulariser is None:
            return result
        # once per optimizer step, as in train/loop.py: Trainer divides the loss by the accumulation
        # steps unless the loss already counts the whole step's tokens
        scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func
        regulariser = regulariser / self.current_gradient_accumulation_steps if scaled else regulariser
        return (result[0] + regulariser, *result[1:]) if return_outputs else result + regulariser

    def _data_loss(self, model, inputs, return_outputs, num_items_in_batch):
        plain = (return_outputs or "labels" not in inputs or set(inputs) - PLAIN_BATCH_KEYS
                 or self.label_smoother is not None or self.compute_loss_func is not None
                 or chunked_loss_head(model) is None)
        if plain:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_sum, count = token_loss_sum(model, inputs)
        # what the model's own loss would be: a sum over the accumulated batch's tokens, or a mean
        by_items = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = loss_sum / (num_items_in_batch if by_items else max(count, 1))
        if self.args.average_tokens_across_devices and by_items:
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        inner = _delta(self.accelerator.unwrap_model(self.model))
        if inner is None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        inner.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        inner = _delta(self.accelerator.unwrap_model(model or self.model))
        if inner is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        # an existing adapter's weights are replaced (io/adapter_files.load_adapter)
        inner.load_adapter(resume_from_checkpoint, inner.active_adapter, is_trainable=True)
        return None
