"""`deltatune.models` is io/models.py (the one model loader) under its earlier name.

The very same module object, not a copy of its names, so code that reads or patches an attribute here
(`models.ensure_default_model`, `models.load_default`) changes what io/models.py's own functions call.
"""

import sys

from .io import models

sys.modules[__name__] = models
