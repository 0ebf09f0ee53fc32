"""The errors every layer of deltatune raises, defined once at the bottom so any layer may raise them.

Each names the field, file or module at fault; the CLI prints the message as one line (no traceback).
"""

from __future__ import annotations

from typing import Any


class DeltaError(Exception):
    """Base of every error deltatune raises for bad input or a refused operation: the CLI prints its message as
    one line, without a traceback."""


class DeltaConfigError(DeltaError, ValueError):
    """A config field, file or target is wrong; the message names the one at fault."""


class AdapterContractError(DeltaError, TypeError):
    """A method's module does not provide what the protocols it declares ask for (core/protocols.py); raised
    when the method registers, i.e. when its module is imported."""


class VocabularyMismatchError(DeltaError, ValueError):
    """The base, expert and anti-expert do not share one vocabulary."""


class DivergenceError(DeltaError, RuntimeError):
    """Training produced a non-finite loss or gradient; the message names the step."""


class DataError(DeltaError, ValueError):
    """A data file or row is wrong; the message starts with `file:line:`."""


class CheckpointError(DeltaError, ValueError):
    """A checkpoint is incomplete, unreadable or does not fit the run; the message names it."""


class ModelNotFoundError(DeltaError, FileNotFoundError):
    """A model name is neither a known alias, a local Transformers directory nor a cached hub id."""


class AdapterFileError(DeltaError, ValueError):
    """An adapter file is missing, unreadable, or does not fit the model; the message names it."""


class WriteError(DeltaError, OSError):
    """A file could not be written; the message names it and says when the disk is full."""


class MergeError(DeltaError, RuntimeError):
    """A merge that cannot be done exactly (NaN/inf weights, or an order the merged weight cannot
    express); nothing was written."""


def require(condition: bool, field_name: str, value: Any, why: str) -> None:
    """Raise a DeltaConfigError naming the field and value when `condition` is false."""
    if not condition:
        raise DeltaConfigError(f"{field_name}={value!r}: {why}")
