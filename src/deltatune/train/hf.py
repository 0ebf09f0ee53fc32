"""Hugging Face `Trainer` with a DeltaModel.

A DeltaModel is a plain nn.Module, so the stock `Trainer` trains it as it is (pass
`remove_unused_columns=False`: Trainer reads the columns to keep from `forward`'s signature, and
DeltaModel.forward takes **kwargs). Saving is where the stock Trainer falls short: it only calls
`save_pretrained` on its own model classes and `peft`'s, and otherwise writes the full state dict,
which fails for models with tied embeddings (SmolLM2, Llama 3.2 ...). `DeltaTrainer` fixes both:

    trainer = DeltaTrainer(model=delta_model, args=args, train_dataset=ds)
    trainer.train()        # checkpoint-N/ holds adapter_config.json + adapter_model.safetensors
    trainer.train(resume_from_checkpoint=True)      # resumes from them

It also takes a causal LM's loss straight from the hidden states (train/linear_loss.py: no full logits
tensor, the same value) when a batch holds only input_ids / attention_mask / position_ids / labels and no label
smoothing or custom loss function is set; otherwise the stock `compute_loss` runs.
"""

from __future__ import annotations

import inspect
import os

import torch
from transformers import Trainer

from ..io.adapter_files import assign_weights, read_adapter
from .evaluate import token_loss_sum
from .linear_loss import token_loss_parts

PLAIN_BATCH_KEYS = {"input_ids", "attention_mask", "position_ids", "labels"}  # position_ids: padding-free


def _delta(model):
    return model if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else None


class DeltaTrainer(Trainer):
    """`transformers.Trainer` that saves and resumes a DeltaModel as an adapter."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = (return_outputs or "labels" not in inputs or set(inputs) - PLAIN_BATCH_KEYS
                 or self.label_smoother is not None or self.compute_loss_func is not None
                 or token_loss_parts(model) is None)
        if plain:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss_sum, count = token_loss_sum(model, inputs)
        # what the model's own loss would be: a sum over the accumulated batch's tokens, or a mean
        by_items = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = loss_sum / (num_items_in_batch if by_items else max(count, 1))
        if self.args.average_tokens_across_devices and by_items:
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss

    def _set_signature_columns_if_needed(self):
        inner = _delta(self.accelerator.unwrap_model(self.model))
        if self._signature_columns is None and inner is not None:
            names = inspect.signature(inner.get_base_model().forward).parameters
            self._signature_columns = list(dict.fromkeys([*names, "label", "label_ids", *self.label_names]))
        super()._set_signature_columns_if_needed()

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
        _, weights = read_adapter(resume_from_checkpoint)
        assign_weights(inner, inner.active_adapter, weights, source=str(resume_from_checkpoint))
        return None
