"""The optimizer a run trains with (`training.optimizer`), built from the training section.

    adamw        torch.optim.AdamW (decoupled weight decay; Loshchilov & Hutter, arXiv:1711.05101)
    adamw_8bit   bitsandbytes' AdamW8bit: both moments stored block-wise quantized to 8 bits (Dettmers
                 et al., arXiv:2110.02861), about a quarter of AdamW's optimizer memory; it runs on CPU
                 too (checked with bitsandbytes 0.50). Tensors under 4,096 elements keep 32-bit moments.
    sgd          torch.optim.SGD, with `training.momentum` (default 0)
    adafactor    torch.optim.Adafactor: factored second moment, no first moment (Shazeer & Stern,
                 arXiv:1804.04235)

Transformers' names are accepted as aliases (`adamw_torch`, `adamw_bnb_8bit`). A setting an optimizer
does not use (`training.momentum` with adamw, `training.adam_beta1` with sgd) is refused by name rather
than ignored. Every optimizer's state_dict is tensors and numbers, so checkpoints save and resume it.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ...core.config import DeltaConfigError

OPTIMIZERS = ("adamw", "adamw_8bit", "sgd", "adafactor")
ALIASES = {"adamw_torch": "adamw", "adamw_bnb_8bit": "adamw_8bit", "bnb_adamw_8bit": "adamw_8bit"}
# the training-section keys each optimizer reads (besides lr and weight_decay)
USES = {
    "adamw": ("adam_beta1", "adam_beta2", "adam_epsilon"),
    "adamw_8bit": ("adam_beta1", "adam_beta2", "adam_epsilon"),
    "sgd": ("momentum",),
    "adafactor": (),
}
SETTINGS = ("adam_beta1", "adam_beta2", "adam_epsilon", "momentum")


def optimizer_name(name: str) -> str:
    """`name` with Transformers' aliases resolved.

    Raises:
        DeltaConfigError: not a known optimizer (the message lists them).
    """
    name = ALIASES.get(name, name)
    if name not in OPTIMIZERS:
        raise DeltaConfigError(f"training.optimizer={name!r}: must be one of {list(OPTIMIZERS)}")
    return name


def check_optimizer_settings(training: Any) -> None:
    """Refuse settings the chosen optimizer would not use, and values out of range, by key."""
    used = USES[training.optimizer]
    for key in SETTINGS:
        value = getattr(training, key)
        if value is None:
            continue
        if key not in used:
            raise DeltaConfigError(
                f"training.{key}={value!r}: training.optimizer={training.optimizer!r} does not use it"
                + (f" (it reads {', '.join('training.' + k for k in used)})" if used else "")
            )
        if key in ("adam_beta1", "adam_beta2", "momentum") and not 0 <= value < 1:
            raise DeltaConfigError(f"training.{key}={value!r}: must be in [0, 1)")
        if key == "adam_epsilon" and value <= 0:
            raise DeltaConfigError(f"training.{key}={value!r}: must be > 0")


def check_optimizer_installed(name: str) -> None:
    """Before the model loads: the optimizer's package is installed (8-bit AdamW needs bitsandbytes).

    Raises:
        DeltaConfigError: naming `training.optimizer` and the package to install.
    """
    if name == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        raise DeltaConfigError(
            "training.optimizer='adamw_8bit': needs the bitsandbytes package: pip install bitsandbytes "
            "(or pip install 'deltatune[quant]')"
        )


def _betas(training: Any) -> dict:
    settings = {}
    if training.adam_beta1 is not None or training.adam_beta2 is not None:
        settings["betas"] = (
            0.9 if training.adam_beta1 is None else training.adam_beta1,
            0.999 if training.adam_beta2 is None else training.adam_beta2,
        )
    if training.adam_epsilon is not None:
        settings["eps"] = training.adam_epsilon
    return settings


def make_optimizer(params: list[torch.nn.Parameter], training: Any) -> torch.optim.Optimizer:
    """The optimizer `training.optimizer` names over `params`, with `training.lr` and `weight_decay`."""
    common = {"lr": training.lr, "weight_decay": training.weight_decay}
    if training.optimizer == "adamw":
        return torch.optim.AdamW(params, **common, **_betas(training))
    if training.optimizer == "adamw_8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, **common, **_betas(training))
    if training.optimizer == "sgd":
        return torch.optim.SGD(params, **common, momentum=training.momentum or 0.0)
    if training.optimizer == "adafactor":
        return torch.optim.Adafactor(params, **common)
    raise AssertionError(training.optimizer)  # optimizer_name refused it when the config was read
