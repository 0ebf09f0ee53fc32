"""The DeltaModel that tools written for `peft` recognise: also a `peft.PeftModel` to isinstance checks.

Transformers' Trainer (5.x), TRL and accelerate decide by `isinstance(model, peft.PeftModel)` whether a
model is an adapter model: only then does `Trainer._save` call `model.save_pretrained(dir)` (otherwise it
writes the full state dict with safetensors, which refuses tied embeddings: "Some tensors share memory"),
`Trainer._load_from_checkpoint` call `model.load_adapter(checkpoint, active_adapter, is_trainable=True)`,
the column filter read the base model's forward, NEFTune hook the base embeddings, and TRL use the
adapter-disabled model as DPO's reference. There is no registration hook (PeftModel is not an ABC), so this
class inherits from it, and nothing else: `PeftModel.__init__` never runs and every attribute PeftModel
would add is hidden (`_Hidden`), so the object answers exactly as a plain DeltaModel does (lookups of
those names fall through to DeltaModel.__getattr__, i.e. to the wrapped model). The one addition is
peft's shape `model.base_model.model` (the tuner, holding the user's model): here `base_model` is the
DeltaModel itself, whose `.model` is the user's model.

`DeltaModel(...)` builds this class instead of the facade when `peft` is already imported (api/__init__.py
`class_to_build`), so a process that never imports peft pays nothing (importing peft takes seconds and
pulls in bitsandbytes). Importing Transformers' `Trainer` or TRL imports peft, so a script that imports
them before building its model gets this class. Importing this module imports peft.
"""

from __future__ import annotations

import torch
from peft import PeftModel

from . import facade as plain


class _Hidden:
    """A PeftModel attribute a DeltaModel does not have: reading it raises AttributeError, so Python falls
    back to DeltaModel.__getattr__; not a data descriptor, so instance attributes of the same name
    (`peft_config`, `active_adapters`) are set and read as usual."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj, owner=None):
        raise AttributeError(self.name)


def _peft_only_names() -> list[str]:
    """Names PeftModel and its mixins define that a plain DeltaModel does not resolve (dunders aside)."""
    names = set()
    for cls in PeftModel.__mro__:
        if cls not in (torch.nn.Module, object):
            names.update(vars(cls))
    return sorted(n for n in names if not (n.startswith("__") and n.endswith("__"))
                  and not hasattr(plain.DeltaModel, n))


class DeltaModel(plain.DeltaModel, PeftModel):
    """A DeltaModel that is also a `peft.PeftModel` to isinstance checks; otherwise the same object."""

    @property
    def base_model(self) -> DeltaModel:
        """peft's `model.base_model.model` is the user's model (Trainer's label smoothing, NEFTune)."""
        return self


for _name in _peft_only_names():
    setattr(DeltaModel, _name, _Hidden(_name))
