"""Reading a run config: a YAML file plus `key=value` overrides, validated before any model is loaded.

Values are coerced to each field's type (YAML reads `1e-3` as a string); an unknown key stops with the
nearest valid key, searched in its own section and, for a misplaced key, in the others.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from ..core.config import DeltaConfigError
from .config import SECTIONS, RunConfig, _suggest, check, coerce, method_values
from .files import BUNDLED_PREFIX


def _build_section(name: str, cls: type, values: Any):
    check(isinstance(values, dict), name, values, "must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise DeltaConfigError(
                f"unknown key {name}.{key}{_suggest(key, list(hints), name + '.')}; "
                f"valid keys: {sorted(hints)}"
            )
        kwargs[key] = coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one clause: the problem and its line:column."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.lr=1e-3` -> (["training", "lr"], 0.001); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise DeltaConfigError(f"override {text!r}: expected key=value, e.g. training.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise DeltaConfigError(
            f"override {text!r}: the value is not valid YAML ({yaml_problem(err)}); expected "
            f"{key.strip()}=VALUE with a YAML value, e.g. 1e-3, true, [q_proj, v_proj] or 'quoted text'"
        ) from None
    return key.strip().split("."), value


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DeltaConfigError(f"override {'.'.join(path)}: {part} is not a section")
    node[path[-1]] = value


def from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Validate a parsed config (sections as nested dicts) and build a RunConfig."""
    if not isinstance(raw, dict):
        raise DeltaConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    valid = [f.name for f in dataclasses.fields(RunConfig)]
    for key in raw:
        if key not in valid:
            leaf = [
                f"{s}.{key}"
                for s, cls in SECTIONS.items()
                if key in {f.name for f in dataclasses.fields(cls)}
            ]
            hint = f" (did you mean {leaf[0]!r}?)" if leaf else _suggest(key, valid)
            raise DeltaConfigError(f"{source}: unknown key {key!r}{hint}; valid top-level keys: {valid}")
    sections = {name: _build_section(name, cls, raw.get(name) or {}) for name, cls in SECTIONS.items()}
    method = raw.get("method") or {"name": "lora"}
    output_dir = raw.get("output_dir", "runs/deltatune")
    check(isinstance(output_dir, str) and output_dir, "output_dir", output_dir, "must be a directory path")
    _, values = method_values(method)  # validate now, long before a model loads
    method = {"name": method.get("name", "lora"), **values}  # values as the method's field types
    config = RunConfig(method=method, output_dir=output_dir, **sections)
    config.method_config()
    return config


def _relative_to(config_path: Path, value: Any) -> Any:
    """A relative data path in the YAML as a path from the YAML's folder (other values as they are)."""
    if isinstance(value, str) and not Path(value).is_absolute() and not value.startswith(BUNDLED_PREFIX):
        return str(config_path.parent / value)
    return value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides, validate, and resolve data paths.

    Data file paths in the YAML are relative to the YAML file's folder; paths given as overrides are
    relative to the current directory.

    Raises:
        DeltaConfigError: the file is missing or malformed, or a key or value is invalid.
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DeltaConfigError(f"config file {str(path)!r} not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise DeltaConfigError(
                f"{where}: not valid YAML ({yaml_problem(err)}); expected sections of key: value lines"
            ) from None
        if not isinstance(raw, dict):
            raise DeltaConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
        for key in ("train", "eval", "chat_template"):
            value = (raw.get("data") or {}).get(key) if isinstance(raw.get("data"), dict) else None
            if value is None:
                continue
            if isinstance(value, list):  # several data paths: each relative to the YAML's folder
                raw["data"][key] = [_relative_to(path, v) for v in value]
            elif key != "chat_template" or (isinstance(value, str) and (path.parent / value).exists()):
                raw["data"][key] = _relative_to(path, value)  # a template name or Jinja text stays as is
    for text in overrides:
        apply_override(raw, *parse_override(text))
    return from_dict(raw, source=str(path) if path else "config")
