"""Module-name patterns: the rules every layer matches module names with (a leaf: imports only errors).

A list of names matches a module whose name equals an entry or ends with "." + entry; a string is a regular
expression that must match the whole name. Regexes may come from files, so each match runs under a time
bound (PATTERN_SECONDS, with the `regex` package, which Transformers already requires): a pattern that
backtracks catastrophically is refused with an error naming the field instead of hanging the load.

core/targeting.py (what a config adapts) and quant/ (which layers `quantize` skips) both use these, so the
quantization backends need not import core.
"""

from __future__ import annotations

import functools

import regex
from torch import nn

from .errors import DeltaConfigError

OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "head")
# a diffusers denoiser's last layer, a direct child of the model: the DiTs' (SD3, Flux, PixArt) proj_out, the
# UNet's conv_out. Deeper modules of these names (a UNet block's proj_out, a Flux block's) are ordinary layers.
DENOISER_OUTPUT_NAMES = ("proj_out", "conv_out")
PATTERN_SECONDS = 0.5  # one regex on one module name; real patterns take microseconds


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str, what: str) -> regex.Pattern:
    try:
        return regex.compile(pattern)  # VERSION0: the syntax and matching of Python's re
    except (regex.error, TypeError) as err:
        raise DeltaConfigError(f"{what} is not a valid regular expression ({err})") from None


def fullmatch(pattern: str, name: str, what: str) -> bool:
    """Whether regex `pattern` matches all of `name`. `what` names the field in errors, e.g.
    "target_modules='...'". Raises DeltaConfigError for an invalid pattern, or one that needs more than
    PATTERN_SECONDS on one name (nested repeats such as `(.*.*)*` backtrack exponentially)."""
    try:
        return _compiled(pattern, what).fullmatch(name, timeout=PATTERN_SECONDS) is not None
    except TimeoutError:
        raise DeltaConfigError(
            f"{what} took over {PATTERN_SECONDS} s to match the module name {name!r} and is refused: nested "
            "repeats such as (.*)* or (a|a)* backtrack exponentially; write it without them") from None


def name_matches(patterns: str | list[str], name: str, field: str = "target_modules") -> bool:
    """List: exact name or dotted suffix. String: regex, full match (time-bounded)."""
    if isinstance(patterns, str):
        return fullmatch(patterns, name, f"{field}={patterns!r}")
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head(s): the module returned by get_output_embeddings, plus usual names."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in OUTPUT_HEAD_NAMES:
            heads.add(name)
    return heads


def denoiser_output_names(model: nn.Module) -> set[str]:
    """The top-level output layer of a diffusers denoiser (DENOISER_OUTPUT_NAMES), which "all-linear" leaves out
    as it leaves out a language model's head: it writes the noise prediction itself."""
    return {name for name, _ in model.named_children() if name in DENOISER_OUTPUT_NAMES}
