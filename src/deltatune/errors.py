"""The errors every layer of deltatune raises, defined once at the bottom so any layer may raise them.

Each names the field, file or module at fault; the CLI prints the message as one line (no traceback).
"""

from __future__ import annotations

from typing import Any


class DeltaConfigError(ValueError):
    """A config field, file or target is wrong; the message names the one at fault."""


class AdapterContractError(TypeError):
    """A method's module does not provide what the protocols it declares ask for (core/protocols.py); raised
    when the method registers, i.e. when its module is imported."""


def require(condition: bool, field_name: str, value: Any, why: str) -> None:
    """Raise a DeltaConfigError naming the field and value when `condition` is false."""
    if not condition:
        raise DeltaConfigError(f"{field_name}={value!r}: {why}")
