"""Atomic file writes for the programs' records: a file is written beside itself and renamed into place, so a kill
leaves the old file or the new one, whole, never a torn one (results.json, stage.json, stages.json, the run log)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable


def write_text(path: str, lines: Iterable[str]) -> None:
  """Writes `lines` (each ending in a newline) to `path` atomically (`path`.tmp, then `os.replace`)."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(lines)
  os.replace(path + ".tmp", path)


def write_json(path: str, value: Any) -> None:
  """Writes `value` to `path` as indented JSON, atomically; values JSON does not know (numpy scalars, paths) are
  written as their `str`."""
  write_text(path, [json.dumps(value, indent=2, default=str)])


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)
