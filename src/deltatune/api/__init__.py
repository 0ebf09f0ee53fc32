"""The public, `peft`-style face of deltatune: the layer above io/ and compose/ (issue 16).

facade.py holds the DeltaModel users hold (core's, plus files and weighted merges); peft_face.py the same
class as a `peft.PeftModel` to isinstance checks, built instead once `peft` is imported (Transformers'
Trainer and TRL import it), so they save and resume it as an adapter. Importing this package makes every
`DeltaModel(...)` build one of the two (core/model.py `set_class_to_build`).
"""

from __future__ import annotations

import sys

from ..core import model as core
from .facade import DeltaModel, get_peft_model


def class_to_build(requested: type) -> type:
    """The class `DeltaModel(...)` builds for `requested`: the facade, or its peft face once `peft` is imported
    (importing peft takes seconds, so a process that never imports it never pays for it). A user's own
    subclass, and the peft face itself (copies, unpickling), are built as they are."""
    if requested not in (core.DeltaModel, DeltaModel):
        return requested
    if "peft" in sys.modules:
        from .peft_face import DeltaModel as face

        return face
    return DeltaModel


core.set_class_to_build(class_to_build)

__all__ = ["DeltaModel", "class_to_build", "get_peft_model"]
