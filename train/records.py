"""Small JSON records beside a run (a study's per-run record, a stage's record): written whole, read tolerantly.

`write_record(path, value)` writes to `<path>.tmp` and renames it into place, so a reader sees the old record or the
new one, never a half-written file. `read_record(path)` returns the mapping in `path`, or None when the file is
missing, empty, not JSON or not a mapping (a record cut short by a kill or a full disk, or written by hand): the
caller treats the record as absent and redoes or rewrites it, instead of failing on every later run. A damaged file
is reported in one line naming it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional


def write_record(path: str, value: Any) -> None:
  """Writes `value` as JSON to `path` atomically (temporary file, then rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, default=str)
  os.replace(tmp, path)


def read_record(path: str) -> Optional[dict]:
  """The JSON mapping in `path`; None (with one line saying why) when it is missing, empty or damaged."""
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    reason = "empty" if os.path.exists(path) and os.path.getsize(path) == 0 else type(e).__name__
    print(f"note: {path} cannot be read ({reason}); treating it as absent")
    return None
  if not isinstance(value, dict):
    print(f"note: {path} holds a JSON {type(value).__name__}, not a record; treating it as absent")
    return None
  return value
