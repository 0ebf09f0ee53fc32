"""Which modules a config adapts.

`target_modules` as a list matches a module whose name equals an entry or ends with "." + entry; as a
string it is a regular expression that must match the whole name; "all-linear" means every linear
layer except the output head. `exclude_modules` takes the same forms. `layers_to_transform` keeps only
modules inside the listed layer indices (found after `layers_pattern`, or a common layer-list name).
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

from torch import nn

from .config import DeltaConfig, DeltaConfigError

ALL_LINEAR = "all-linear"
COMMON_LAYER_LISTS = ("layers", "h", "block", "blocks", "layer", "encoder.layer", "decoder.layers")
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "head")


def name_matches(patterns: str | list[str], name: str) -> bool:
    """List: exact name or dotted suffix. String: regex, full match."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def pattern_value(patterns: dict, name: str, default):
    """Per-module override (rank_pattern, alpha_pattern): the first key that matches the end of the name."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    lists = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or COMMON_LAYER_LISTS)
    for layer_list in lists:
        found = re.match(rf"(?:.*\.)?{re.escape(layer_list)}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head(s): the module returned by get_output_embeddings, plus usual names."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in OUTPUT_HEAD_NAMES:
            heads.add(name)
    return heads


def canonical_name(path: str) -> str:
    """A module's name as the user's model and the file format know it: the path without the
    `.base_layer` hops that wrapping an enclosing block (a bottleneck on `mlp`) put into it."""
    return path.replace(".base_layer.", ".")


def canonical_param_name(name: str) -> str:
    """As canonical_name for a parameter; a wrapped layer's own `base_layer.bias` keeps its hop (PEFT's key)."""
    owner, _, leaf = name.rpartition(".")
    if owner.endswith(".base_layer"):
        return f"{canonical_name(owner.removesuffix('.base_layer'))}.base_layer.{leaf}"
    return f"{canonical_name(owner)}.{leaf}"


WRAPPER_INTERNALS = ("adapters", "copies", "original_module", "base_layer")


def adaptable_modules(model: nn.Module, wrapper_types: tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    """(canonical name, module) for every module a config may target. A wrapper stands for the module it
    wraps; its adapters and copies are skipped; modules inside a wrapped block stay reachable."""
    found, wrappers, hidden = [], set(), set()
    for name, module in model.named_modules():
        if not name:
            continue
        parent, _, leaf = name.rpartition(".")
        if parent in hidden:
            hidden.add(name)
            continue
        if parent in wrappers and leaf in WRAPPER_INTERNALS:
            if leaf != "base_layer":  # the wrapped module's children stay visible
                hidden.add(name)
            continue
        if isinstance(module, wrapper_types):
            wrappers.add(name)
        found.append((canonical_name(name), module))
    return found


def select_targets(model: nn.Module, config: DeltaConfig, modules: list[tuple[str, nn.Module]],
                   is_linear: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the modules `config` adapts, in model order. Errors name the patterns at fault."""
    if config.target_modules is None:
        raise DeltaConfigError(f"target_modules is not set for {config.peft_type}; give a list of module "
                               f"names, a regex, or {ALL_LINEAR!r}")
    if config.target_modules == ALL_LINEAR or config.target_modules == [ALL_LINEAR]:
        heads = output_head_names(model)
        chosen = [n for n, m in modules if is_linear(m) and n not in heads]
    else:
        chosen = [n for n, _ in modules if name_matches(config.target_modules, n)]
    if config.exclude_modules:
        chosen = [n for n in chosen if not name_matches(config.exclude_modules, n)]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [n for n in chosen if layer_index(n, config.layers_pattern) in wanted]
    if not chosen:
        leaves = sorted({n.split(".")[-1] for n, m in modules if not list(m.children())})
        raise DeltaConfigError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}) matches no module of "
            f"{type(model).__name__}; module names there include: {leaves[:20]}")
    return chosen
