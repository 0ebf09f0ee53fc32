"""Reading a run config: a YAML file plus `key=value` overrides, validated before any model is loaded.

Values are coerced to each field's type (YAML reads `1e-3` as a string); an unknown key stops with the
nearest valid key, searched in its own section and, for a misplaced key, in the others. Command-line
overrides follow what a user means by them (load_config lists the rules): `key=null` unsets a key, a
stopping rule replaces the file's other one, and a new `method.name` drops the file's keys it lacks.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from ..core.config import DeltaConfigError, config_class
from ..errors import require
from .config import SECTIONS, RunConfig, _suggest, coerce, method_values
from .data.files import BUNDLED_PREFIX, DataError


def _build_section(name: str, cls: type, values: Any):
    require(isinstance(values, dict), name, values, "must be a mapping of keys to values")
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
    """Set `path` to `value` in the raw config; `None` (`key=null`) removes the key, so the field takes
    its default, except where null is itself a setting the field accepts besides its default
    (`training.max_grad_norm=null`: no clipping), which is set as null."""
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DeltaConfigError(f"override {'.'.join(path)}: {part} is not a section")
    if value is None and not _null_is_a_setting(path):
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


def _null_is_a_setting(path: list[str]) -> bool:
    """True for a section field whose type takes null and whose default is not null."""
    cls = SECTIONS.get(path[0]) if len(path) == 2 else None
    if cls is None:
        return False
    found = {f.name: f for f in dataclasses.fields(cls)}.get(path[1])
    if found is None or found.default is None or found.default is dataclasses.MISSING:
        return False
    return type(None) in typing.get_args(typing.get_type_hints(cls)[path[1]])


def _one_stopping_rule(raw: dict, cli_keys: set[str], notes: list[str]) -> None:
    """A stopping rule set on the command line replaces the YAML's other one (`training.max_steps=2`
    on a config with `epochs: 3` runs 2 steps); both set on the command line stay an error."""
    training = raw.get("training")
    if not isinstance(training, dict):
        return
    for given, other in (("max_steps", "epochs"), ("epochs", "max_steps")):
        if (
            f"training.{given}" in cli_keys
            and training.get(given) is not None
            and f"training.{other}" not in cli_keys
            and training.get(other) is not None
        ):
            notes.append(
                f"training.{given}={training[given]} (command line) replaces "
                f"training.{other}={training.pop(other)} from the config file"
            )


def _switch_method(raw: dict, yaml_method: dict, cli_keys: set[str], notes: list[str]) -> None:
    """`method.name=NEW` on the command line drops the config file's method keys that NEW's config lacks
    (`method.name=loha` on a LoRA config drops `lora_alpha`, `lora_dropout`), with a note; keys shared by
    both methods (`r`, `target_modules`) carry over, and keys given on the command line are kept (so a
    wrong one still stops with the nearest valid key)."""
    method = raw.get("method")
    if "method.name" not in cli_keys or not isinstance(method, dict) or not isinstance(yaml_method, dict):
        return
    if not isinstance(method.get("name", "lora"), str):
        return  # from_dict names the bad value
    new = config_class(method.get("name", "lora"), source="method.name")
    try:
        old = config_class(yaml_method.get("name", "lora"), source="method.name")
    except DeltaConfigError:
        old = None
    if old is new:
        return
    fields = {f.name for f in dataclasses.fields(new)}
    dropped = [
        f"method.{key}={method.pop(key)!r}"
        for key in list(method)
        if key != "name" and key not in fields and key in yaml_method and f"method.{key}" not in cli_keys
    ]
    if dropped:
        notes.append(
            f"method.name={method['name']} (command line): dropped {', '.join(dropped)} from the config file "
            f"({new.__name__} has no such keys)"
        )


def _locate(key: str, value: Any, yaml_file: Path | None) -> Any:
    """A data path as the run will open it.

    A relative path from the config file is looked up next to the config file first, then in the current
    directory (so both `examples/data/x.jsonl` run from the repository root and `x.jsonl` beside the YAML
    work); a path from the command line (`data.train=...`) is relative to the current directory. Lists
    (several files) resolve item by item.

    Raises:
        DataError: no candidate exists; names the key, the value, every absolute path tried and the rule.
    """
    if isinstance(value, list):
        return [_locate(f"{key}[{i}]", item, yaml_file) for i, item in enumerate(value)]
    if not isinstance(value, str) or not value or value.startswith(BUNDLED_PREFIX):
        return value  # the section checks the type; bundled files are checked where they are read
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates, rule = [path], "an absolute path"
    elif yaml_file is not None:
        candidates = [yaml_file.parent / path, path]
        rule = "a relative path in a config file is looked up next to that file, then in the current directory"
    else:
        candidates, rule = [path], "a relative path on the command line is relative to the current directory"
    for candidate in candidates:
        if candidate.exists() or (glob.has_magic(str(candidate)) and glob.glob(str(candidate))):
            return str(candidate)
    tried = " and ".join(str(c.absolute()) for c in dict.fromkeys(candidates))
    source = f"in {yaml_file}" if yaml_file is not None else "on the command line"
    raise DataError(f"{key}={value!r} ({source}): data file not found; looked for {tried} ({rule})")


def _resolve_data_paths(raw: dict, yaml_file: Path | None, cli_keys: set[str]) -> None:
    image = raw.get("image")  # a text-to-image run's class-image folder, by the same rule as data.train
    if isinstance(image, dict) and image.get("class_data") is not None:
        from_cli = yaml_file is None or "image" in cli_keys or "image.class_data" in cli_keys
        image["class_data"] = _locate("image.class_data", image["class_data"], None if from_cli else yaml_file)
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "eval"):
        if data.get(key) is not None:
            from_cli = yaml_file is None or "data" in cli_keys or f"data.{key}" in cli_keys
            data[key] = _locate(f"data.{key}", data[key], None if from_cli else yaml_file)
    template = data.get("chat_template")  # a file beside the YAML; a template name or Jinja text stays as is
    if isinstance(template, str) and yaml_file is not None and "data.chat_template" not in cli_keys:
        beside = yaml_file.parent / Path(template).expanduser()
        if not Path(template).is_absolute() and beside.exists():
            data["chat_template"] = str(beside)


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
    require(isinstance(output_dir, str) and output_dir, "output_dir", output_dir, "must be a directory path")
    _, values = method_values(method)  # validate now, long before a model loads
    method = {"name": method.get("name", "lora"), **values}  # values as the method's field types
    config = RunConfig(method=method, output_dir=output_dir, **sections)
    config.method_config()
    return config


def _read_yaml(path: Path) -> dict:
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
    return raw


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def load_config(path: str | Path | None, overrides: list[str] = (), log=_note) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides, validate, and resolve data paths.

    Rules for overrides (each change they make to the file's settings is passed to `log` as a note):
    - `key=null` removes the key, so the field takes its default (see `apply_override`).
    - `training.max_steps` or `training.epochs` given on the command line replaces the file's other
      stopping rule.
    - `method.name=NEW` drops the file's method keys that NEW lacks (see `_switch_method`).

    Data paths: a relative path in the YAML is looked up next to the YAML file, then in the current
    directory; a path given as an override is relative to the current directory.

    Raises:
        DeltaConfigError: the file is missing or malformed, or a key or value is invalid.
        DataError: a data file is missing (naming the key, the absolute paths tried and the rule).
    """
    raw: dict = {}
    if path is not None:
        path = Path(path)
        raw = _read_yaml(path)
    yaml_method = copy.deepcopy(raw.get("method"))
    cli_keys: set[str] = set()
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
        cli_keys.add(".".join(keys))
    notes: list[str] = []
    _one_stopping_rule(raw, cli_keys, notes)
    _switch_method(raw, yaml_method, cli_keys, notes)
    source = str(path) if path else "config"
    from_dict(raw, source)  # a bad key or value is named before a missing file
    _resolve_data_paths(raw, path, cli_keys)
    config = from_dict(raw, source)
    for note in notes:
        log(note)
    return config
