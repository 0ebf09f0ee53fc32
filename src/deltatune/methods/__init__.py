"""One file per method. Importing this package imports every method module, so each registers its
config under its peft_type (core/config.py) without a list to keep in sync here."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
