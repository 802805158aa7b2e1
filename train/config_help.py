"""`--help` of the programs: the table of every config key with its default and description."""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from train.config import RunConfig


def describe(cls=RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
  """(dotted key, default as YAML, description) for every leaf field, in declaration order."""
  rows = []
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(f.default):
      rows.extend(describe(type(f.default), prefix + f.name + "."))
      continue
    default = f.default
    shown = (
      "none"
      if default is None
      else yaml.safe_dump(
        list(default) if isinstance(default, tuple) else default, default_flow_style=True, width=10**6
      )
      .strip()
      .removesuffix("...")
      .strip()
    )
    rows.append((prefix + f.name, shown, f.metadata.get("help", "")))
  return rows


def help_text(cls=RunConfig) -> str:
  """`--help`'s table: one line per key with its default and description."""
  rows = describe(cls)
  width = max(len(k) for k, _, _ in rows)
  return "\n".join(f"  {key:<{width}}  {text}  [default: {default}]" for key, default, text in rows)


def section_help_text(section: str, cls: type, run_defaults: dict[str, Any], program: str) -> str:
  """`--help` of a program with a section of its own: the section's keys, then the trainer's with its defaults."""
  changed = ", ".join(f"{k}={v}" for k, v in run_defaults.items())
  return (
    f"{section} keys ({section}.<key> or the bare key):\n{help_text(cls)}\n"
    f"trainer keys ({program}'s defaults differ: {changed}):\n{help_text()}"
  )
