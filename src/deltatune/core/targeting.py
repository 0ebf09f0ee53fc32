r"""Which modules a config adapts, and the check that every name or pattern a config gives matches one.

`target_modules` as a list matches a module whose name equals an entry or ends with "." + entry; as a
string it is a regular expression that must match the whole name; "all-linear" means every linear
layer except the output head (a language model's lm_head / classifier, a diffusers denoiser's top-level
proj_out); convolutions (a UNet's conv1/conv2/conv_shortcut, its 1x1 proj_in/out) are targeted by name.
`exclude_modules` takes the same forms. `layers_to_transform` keeps only modules inside the listed layer
indices (found after `layers_pattern`, or a common layer-list name).
Per-module keys (`rank_pattern`, `alpha_pattern`) are regexes matched against the end of a name after
a dot: `(.*\.)?(key)` must match the whole name, exactly as `peft` does (so "^q_proj" or a
"base_model.model."-prefixed path matches nothing there, nor here). Names are the module paths inside
the model the user wraps (`model.layers.0.self_attn.q_proj`).

Regexes may come from files, so each match runs under a time bound (naming.py, the leaf that quant/ shares):
a pattern that backtracks catastrophically is refused with an error naming the field instead of hanging the
load.
"""

from __future__ import annotations

import difflib
import functools
import re
import warnings
from collections.abc import Callable

from torch import nn

from ..naming import (  # noqa: F401  (re-exported)
    OUTPUT_HEAD_NAMES,
    PATTERN_SECONDS,
    denoiser_output_names,
    fullmatch,
    name_matches,
    output_head_names,
)
from .config import TASK_HEADS, DeltaConfig, DeltaConfigError

ALL_LINEAR = "all-linear"
COMMON_LAYER_LISTS = ("layers", "h", "block", "blocks", "layer", "encoder.layer", "decoder.layers")


def key_matches(key: str, name: str, field: str = "rank_pattern") -> bool:
    r"""A per-module key (rank_pattern, alpha_pattern) matches `name`: peft's `(.*\.)?(key)$`."""
    return fullmatch(rf"(.*\.)?(?:{key})", name, f"{field} key {key!r}")


def pattern_value(patterns: dict, name: str, default, field: str = "rank_pattern"):
    """Per-module override (rank_pattern, alpha_pattern): the first key that matches the end of the name."""
    for key, value in patterns.items():
        if key_matches(key, name, field):
            return value
    return default


def layer_index(name: str, layers_pattern: str | list[str] | None) -> int | None:
    lists = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or COMMON_LAYER_LISTS)
    for layer_list in lists:
        found = re.match(rf"(?:.*\.)?{re.escape(layer_list)}\.(\d+)\.", name)
        if found:
            return int(found.group(1))
    return None


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
        heads = output_head_names(model) | denoiser_output_names(model)
        chosen = [n for n, m in modules if is_linear(m) and n not in heads]
    else:
        chosen = [n for n, _ in modules if name_matches(config.target_modules, n)]
    if config.exclude_modules:
        chosen = [n for n in chosen if not name_matches(config.exclude_modules, n, "exclude_modules")]
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [n for n in chosen if layer_index(n, config.layers_pattern) in wanted]
    if not chosen:
        leaves = sorted({n.split(".")[-1] for n, m in modules if not list(m.children())})
        raise DeltaConfigError(
            f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r}"
            + (f", layers_pattern={config.layers_pattern!r}" if config.layers_pattern else "")
            + f") matches no module of "
            f"{type(model).__name__}; module names there include: {leaves[:20]}")
    return chosen


KeyCheck = tuple[list[str], Callable[[str, str], bool]]
PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")  # peft's per-module overrides, same rule in every config


def pattern_key_fields(config: DeltaConfig, *fields: str) -> dict[str, KeyCheck]:
    """`module_keys()` for dict fields keyed like rank_pattern (regexes matched against a name's end)."""
    return {name: (list(getattr(config, name) or {}), functools.partial(key_matches, field=name))
            for name in fields}


def _nearest(key: str, names: list[str]) -> list[str]:
    """Module names (or their dotted endings) closest to `key`, for error messages."""
    pool = {".".join(parts[i:]) for parts in (n.split(".") for n in names) for i in range(len(parts))}
    near = difflib.get_close_matches(key.strip("^$"), sorted(pool), n=3, cutoff=0.5)
    return near or sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})[:20]


def _hint(key: str) -> str:
    if key.startswith("base_model.model."):
        return " (names are paths inside the model you wrap: drop 'base_model.model.')"
    if key.startswith("^"):
        return " ('^' anchors at the start of the whole path, so it could only match a top-level module)"
    return ""


def check_every_key_matches(model: nn.Module, config: DeltaConfig, modules: list[tuple[str, nn.Module]],
                            targets: list[str], strict: bool = True) -> None:
    """Each entry of target_modules / exclude_modules / modules_to_save must match a module of the model,
    each layers_to_transform index a layer, and each per-module key (`config.module_keys()`, e.g.
    rank_pattern) a module this adapter targets; a key that selects nothing would be silently ignored.

    rank_pattern and alpha_pattern keys (any config) are checked with peft's rule; a method whose field
    means something else overrides it in module_keys() (AdaLoRA). Exempt: "all-linear", a method's own
    default target list (it names modules of several architectures) and the task heads the task type
    adds (peft writes both "classifier" and "score").

    Raises:
        DeltaConfigError naming every such key with the nearest module names; with `strict=False` (a file
        being loaded: peft only warns about such keys, so its files may carry them) a warning instead.
    """
    names = [name for name, _ in modules]
    problems: list[str] = []

    def check(field: str, key: str, pool: list[str], matches: Callable[[str, str], bool]) -> None:
        if any(matches(key, name) for name in pool):
            return
        where = "module"
        if pool is not names:
            where = "targeted module"
            others = [n for n in names if matches(key, n)]
            if others:
                where += f" (only modules target_modules leaves out, e.g. {others[0]!r})"
        problems.append(f"{field} entry {key!r} matches no {where}{_hint(key)}; nearest module names: "
                        f"{_nearest(key, pool or names)}")

    def entries(field: str, value, skip=()) -> None:
        if isinstance(value, str):
            check(field, value, names, lambda key, name: name_matches(key, name, field))
        elif value:
            for entry in value:
                if entry not in skip:
                    check(field, entry, names, lambda key, name: name_matches([key], name))

    if config.target_modules not in (ALL_LINEAR, [ALL_LINEAR], list(type(config).default_target_modules)):
        entries("target_modules", config.target_modules)
    entries("exclude_modules", config.exclude_modules)
    entries("modules_to_save", config.modules_to_save, skip=TASK_HEADS.get(config.task_type, []))
    if config.layers_to_transform is not None:
        found = {layer_index(name, config.layers_pattern) for name in names} - {None}
        for index in config.layers_to_transform:
            if index not in found:
                lists = f"after layers_pattern={config.layers_pattern!r}" if config.layers_pattern else "found"
                problems.append(f"layers_to_transform entry {index!r} is no layer of the model "
                                f"(layers {lists}: {sorted(found)})")
    dict_fields = [f for f in PATTERN_FIELDS if isinstance(getattr(config, f, None), dict)]
    per_module = pattern_key_fields(config, *dict_fields)
    for field, (keys, matches) in {**per_module, **config.module_keys()}.items():
        for key in keys:
            check(field, key, targets, matches)
    if not problems:
        return
    message = f"{type(model).__name__}: " + "; ".join(problems)
    if strict:
        raise DeltaConfigError(message)
    warnings.warn(f"{message} (kept as peft does, which loads such files with a warning)", stacklevel=3)
