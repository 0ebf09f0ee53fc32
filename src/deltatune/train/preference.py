"""Preference tuning with TRL (DPO, KTO) on a DeltaModel, the reference being the adapter switched off.

DPO and KTO score each completion against a frozen reference model. For a `peft.PeftModel` passed
without `ref_model`, TRL holds no second base: it adds a frozen copy of the adapter, "ref", and scores the
reference through it (the adapter as it was when training started). A DeltaModel built once `peft` is
imported (importing TRL does) is such a model (core/peft_face.py), so plain `trl.DPOTrainer` takes it;
for any other model TRL loads a second base from `config._name_or_path`.

TRL's other supported way to train without a reference in memory is `precompute_ref_log_probs=True`:
before the first step it scores every example once through `compute_ref_log_probs(model, batch)` and
stores the reference log-probs as dataset columns. The trainers here take that path and run that one
method inside `model.disable_adapter()` (which gives the base model's output exactly, core/model.py) and
in eval mode (as TRL runs a separate reference model), so:

    from trl import DPOConfig
    from deltatune import DeltaDPOTrainer, LoraConfig, get_peft_model

    model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))
    trainer = DeltaDPOTrainer(model=model, args=DPOConfig(output_dir="out", beta=0.1),
                              train_dataset=pairs, processing_class=tokenizer)  # prompt/chosen/rejected
    trainer.train()

The reference is the base model whatever the adapter holds when training starts (a fresh adapter, or
one loaded to be trained further), so TRL's "ref" copy is dropped; its log-probs come from the same fused
LM head and autocast TRL uses for the policy, and each example is scored once rather than once per
epoch. Passing `ref_model=` keeps TRL's own behaviour. TRL's other form, `model=base,
peft_config=deltatune.LoraConfig(...)`, works too. ORPO has no reference model: TRL's
`trl.experimental.orpo.ORPOTrainer` takes a DeltaModel as it is.

Limits. As TRL does for `peft`, an adapter on the LM head is refused (TRL's fused head reads
`lm_head.weight` directly); so are adapters that act on the whole model (prompt and prefix tuning,
LLaMA-Adapter, X-LoRA), since TRL's fused head calls the backbone past DeltaModel.forward. Under FSDP
TRL still loads its own reference model for the precompute (and frees it). A dataset passed to
`evaluate()` after training started is refused by TRL (pass it as `eval_dataset` up front).
"""

from __future__ import annotations

import copy
import logging

from transformers import set_seed
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from ..api import get_peft_model
from ..core.config import DeltaConfig
from ..core.layer import DeltaLayer, ModulesToSave
from ..core.model import DeltaModel
from ..core.protocols import TakesOverForward, declares

logger = logging.getLogger(__name__)


def check_reference_ready(model: DeltaModel) -> None:
    """Refuse what TRL's fused LM head would silently skip on `model`.

    Raises:
        ValueError: the output embedding (`lm_head`) carries an adapter, or an active adapter acts on
            the whole model (soft prompts, LLaMA-Adapter, X-LoRA), naming it.
    """
    if isinstance(model.get_output_embeddings(), (DeltaLayer, ModulesToSave)):
        raise ValueError("preference tuning with TRL cannot train an adapter on the LM head (TRL scores "
                         "tokens from lm_head.weight directly); remove 'lm_head' from "
                         "target_modules / modules_to_save")
    adapters = model.model_adapters
    whole_model = sorted(name for name in model.active_adapters
                         if name in adapters and declares(adapters[name], TakesOverForward))
    if whole_model:
        raise ValueError(f"preference tuning with TRL cannot train adapters {whole_model}: they act on the "
                         "whole model (prompts, gates) and TRL's fused LM head calls the backbone past "
                         "them; use a layer method (LoRA, DoRA, LoHa, IA3 ...)")


class _AdapterDisabledReference:
    """Mixin for TRL trainers: the reference log-probs are precomputed with the adapter disabled."""

    _config_class: type = DPOConfig

    def __init__(self, model, ref_model=None, args=None, *rest, peft_config: DeltaConfig | None = None,
                 **kwargs) -> None:
        if args is None:  # TRL's own default output_dir, "<model name>-<config class>"
            name = model.config._name_or_path.split("/")[-1]
            args = self._config_class(f"{name}-{self._config_class.__name__}")
        if peft_config is not None:  # TRL's `model=base, peft_config=...` form, with a deltatune config
            if not isinstance(peft_config, DeltaConfig) or isinstance(model, DeltaModel):
                raise TypeError(f"peft_config must be a deltatune config (e.g. deltatune.LoraConfig) for a "
                                f"model without adapters; got {type(peft_config).__name__} for "
                                f"{type(model).__name__}")
            set_seed(args.seed)  # as TRL does before wrapping: adapter init is random
            model = get_peft_model(model, peft_config)
            try:
                check_reference_ready(model)
            except ValueError:
                model.unload()  # refused: hand the caller's base back as it was
                raise
        if not isinstance(model, DeltaModel):
            raise TypeError(f"{type(self).__name__} trains a DeltaModel (deltatune.get_peft_model(base, "
                            f"config), or model=base with peft_config=); got {type(model).__name__}")
        check_reference_ready(model)
        if ref_model is None and "default" not in model.peft_config:
            # TRL reads peft_config["default"] of a peft.PeftModel (which a DeltaModel is to TRL) to build
            # its reference, and fails inside with KeyError: 'default' otherwise
            raise ValueError(f"{type(self).__name__}: TRL expects the trained adapter to be named 'default'; "
                             f"this model has {sorted(model.peft_config)} (get_peft_model(base, config) names "
                             "it 'default'), or pass ref_model=")
        if ref_model is None and not args.precompute_ref_log_probs:
            # TRL's path with no reference model in memory; a copy, so the caller's args stay as given
            logger.info("reference log-probs: computed once before training, with the adapter disabled")
            args = copy.copy(args)
            args.precompute_ref_log_probs = True
        own_ref = "ref" in model.peft_config
        super().__init__(model, ref_model, args, *rest, **kwargs)
        if ref_model is None and not own_ref and "ref" in model.peft_config:
            # TRL gives a `peft.PeftModel` (which a DeltaModel is once peft is imported, core/peft_face.py)
            # a frozen copy of its adapter named "ref" as the reference; ours is the base, precomputed above,
            # so the copy would only be held, saved with every checkpoint and never trained: drop it
            model.delete_adapter("ref")

    def compute_ref_log_probs(self, model, inputs):
        """TRL's reference log-probs of one padded batch, from the base: adapter disabled, eval mode
        (as TRL runs a separate reference model)."""
        if self.ref_model is not None:  # the caller's reference model (or TRL's own under FSDP)
            return super().compute_ref_log_probs(model, inputs)
        delta_model = self.accelerator.unwrap_model(self.model)
        was_training = delta_model.training
        delta_model.eval()
        try:
            with delta_model.disable_adapter():
                return super().compute_ref_log_probs(model, inputs)
        finally:
            delta_model.train(was_training)


class DeltaDPOTrainer(_AdapterDisabledReference, DPOTrainer):
    """TRL's `DPOTrainer` for a DeltaModel. The reference is the base (the adapter disabled), scored
    once before training (`precompute_ref_log_probs`), so no second copy of the base is held.
    Arguments as `trl.DPOTrainer`."""

    _config_class = DPOConfig


class DeltaKTOTrainer(_AdapterDisabledReference, KTOTrainer):
    """TRL's `KTOTrainer` for a DeltaModel. The reference (and its KL completions) come from the base,
    the adapter disabled, scored once before training. Arguments as `trl.KTOTrainer`."""

    _config_class = KTOConfig


__all__ = ["DeltaDPOTrainer", "DeltaKTOTrainer", "check_reference_ready"]
