"""Bounds for values read from files and the command line, whatever their size: how a value is shown in an error
(cut to about 80 characters), how many values a YAML file may expand to, how large an integer setting may be."""

from __future__ import annotations

import reprlib
from typing import Any

INT_LIMIT = 2**31 - 1  # steps, sizes and counts fit an int32 (the step counter is one)
MAX_YAML_VALUES = 100_000  # a config file holds a few dozen keys; more is an alias bomb or the wrong file


def shown(value: Any) -> str:
  """`repr(value)` cut to about 80 characters, whatever its size (a huge list, a 5000-digit number)."""
  shower = reprlib.Repr()
  shower.maxstring = shower.maxother = shower.maxlong = 60
  shower.maxlist = shower.maxtuple = shower.maxdict = 6
  text = shower.repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def count_values(value: Any, limit: int) -> int:
  """The number of values in `value` with YAML's shared (aliased) parts counted every time they appear; stops
  counting past `limit`, so an alias bomb or a self-referencing alias costs at most `limit` steps."""
  count, stack = 0, [value]
  while stack and count <= limit:
    item = stack.pop()
    count += 1
    if isinstance(item, dict):
      stack.extend(item.keys())
      stack.extend(item.values())
    elif isinstance(item, (list, tuple)):
      stack.extend(item)
  return count
