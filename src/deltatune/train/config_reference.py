"""The table of every config key in examples/README.md, generated from the config dataclasses.

The key, type and default columns come from the dataclasses in config.py; the description column is
written by hand in the README and kept when the table is regenerated, so a new field shows up as a row
with an empty description, which tests/test_data_sources.py refuses. Regenerate with

    python -m deltatune.train.config_reference --write examples/README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from .config import SECTIONS, RunConfig, describe

START, END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"
HEADER = "| key | takes | default | what it does |\n|---|---|---|---|"


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, accepted form in words, default as YAML) for every key a run config reads, in the
    order of the sections and their fields; the method section is `method.name` plus the chosen
    method's own fields (listed by its config class, not here)."""
    rows = []
    for top in dataclasses.fields(RunConfig):  # sections in the order a config file lists them
        if top.name == "method":
            rows.append(("method.name", "a string", "lora"))
        elif top.name in SECTIONS:
            cls = SECTIONS[top.name]
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((f"{top.name}.{f.name}", describe(hints[f.name]), _yaml(default)))
        else:
            rows.append((top.name, describe(typing.get_type_hints(RunConfig)[top.name]), _yaml(top.default)))
    return rows


def _block(text: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"no {START} ... {END} block to hold the config key table")
    return text[text.index(START) + len(START) : text.index(END)]


def descriptions(text: str) -> dict[str, str]:
    """{key: description} from the table in a README's marked block."""
    out = {}
    for line in _block(text).splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`"):
            out[cells[0].strip("`")] = " | ".join(cells[3:]).strip()
    return out


def render(known: dict[str, str]) -> str:
    """The marked block's content: one row per config key, descriptions taken from `known`."""
    lines = [HEADER]
    for key, form, default in config_keys():
        lines.append(f"| `{key}` | {form} | `{default}` | {known.get(key, '')} |")
    return "\n" + "\n".join(lines) + "\n"


def regenerate(text: str) -> str:
    """`text` (a README) with its key table rebuilt from the dataclasses, descriptions kept."""
    block = _block(text)
    return text.replace(START + block + END, START + render(descriptions(text)) + END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="README", help="rewrite the table in this file")
    parser.add_argument("--check", metavar="README", help="exit 1 when the table is out of date")
    args = parser.parse_args(argv)
    target = args.write or args.check
    if target is None:
        print(render({}))
        return 0
    path = Path(target)
    text = path.read_text(encoding="utf-8")
    new = regenerate(text)
    if args.write:
        path.write_text(new, encoding="utf-8")
        missing = [key for key, desc in descriptions(new).items() if not desc]
        if missing:
            print(f"describe these keys in {path}: {', '.join(missing)}", file=sys.stderr)
        return 0
    return 0 if new == text and all(descriptions(text).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
