"""Files of an exported adapter or merged model: written whole or not at all, and checked when read.

`atomic_folder(target, owned)` yields a staging folder beside `target` (same file system); the writer puts its files
there, and only when it returns is the staging folder renamed into place. Files of the old `target` that the write
does not own (`owned`: glob patterns such as `adapter_*`) are moved over first, so a README or a tokenizer beside the
adapter stays. A failure at any point leaves the old `target` whole (or no `target`), never a mix of old and new
files; the staging folder is removed.

`read_adapter_config` and `check_adapter_tensors` are `load_peft`'s checks of a PEFT LoRA adapter: each problem
(malformed JSON, a non-numeric, non-finite or non-positive `lora_alpha` or `r`, an empty tensor file, a non-finite
value, a rank-0 factor, `modules_to_save` without any of its weights) is one `ValueError` naming the file and the key.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, owned: Sequence[str]) -> Iterator[str]:
  """Yields a staging folder that replaces `target` when the `with` block finishes without an exception.

  Args:
    target: the folder to write; created if missing, replaced if present.
    owned: glob patterns of the file names the writer owns; the old folder's other entries are kept.
  """
  target = os.path.abspath(os.fspath(target))
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{name}.writing-", dir=parent)
  try:
    yield staging
    _swap(staging, target, owned)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _swap(staging: str, target: str, owned: Sequence[str]) -> None:
  """Renames `staging` to `target`, the old `target`'s entries outside `owned` moved into `staging` first."""
  if not os.path.isdir(target):
    os.rename(staging, target)
    return
  written = set(os.listdir(staging))
  kept = [
    entry for entry in os.listdir(target) if entry not in written and not any(fnmatch.fnmatch(entry, p) for p in owned)
  ]
  moved = []
  try:
    for entry in kept:
      os.rename(os.path.join(target, entry), os.path.join(staging, entry))
      moved.append(entry)
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
    os.rmdir(old)
    os.rename(target, old)
  except OSError:
    for entry in moved:  # put the old folder back as it was
      os.rename(os.path.join(staging, entry), os.path.join(target, entry))
    raise
  try:
    os.rename(staging, target)
  except OSError:
    os.rename(old, target)
    for entry in moved:
      os.rename(os.path.join(staging, entry), os.path.join(target, entry))
    raise
  shutil.rmtree(old, ignore_errors=True)


_PEFT_HEAD_NAMES = ("classifier", "score", "qa_outputs")  # the heads PEFT adds to modules_to_save by task type


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_adapter_config(path: str) -> dict:
  """The mapping in a PEFT adapter_config.json, with `r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` checked:
  numbers (not strings or booleans), finite and positive."""
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ValueError(f"{path}: not valid JSON ({e}); re-export the adapter") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object of PEFT settings, got a {type(config).__name__}")
  checks = [("r", config.get("r", 8)), ("lora_alpha", config.get("lora_alpha", 8))]
  for pattern in ("rank_pattern", "alpha_pattern"):
    values = config.get(pattern) or {}
    if not isinstance(values, dict):
      raise ValueError(f"{path}: {pattern} must map module names to numbers, got {values!r}")
    checks += [(f"{pattern}[{name!r}]", value) for name, value in values.items()]
  for key, value in checks:
    if not _number(value) or not math.isfinite(value) or value <= 0:
      raise ValueError(f"{path}: {key} must be a positive finite number, got {value!r}")
  return config


def check_adapter_tensors(path: str, tensors: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> None:
  """Raises `ValueError` for an adapter tensor file without LoRA factors, a non-finite value, a rank-0 factor
  (lora_A: (r, in), lora_B: (out, r) with r = 0), or `modules_to_save` in `config` with none of its weights."""
  if not any(".lora_A" in key for key in tensors):
    raise ValueError(
      f"{path}: holds no LoRA factors ({len(tensors)} tensors, none named *.lora_A.*); the file is "
      "empty or not a LoRA adapter"
    )
  for key, value in tensors.items():
    value = np.asarray(value)
    if (".lora_A" in key and value.ndim >= 1 and value.shape[0] == 0) or (
      ".lora_B" in key and value.ndim >= 2 and value.shape[1] == 0
    ):
      raise ValueError(f"{path}: {key} has rank 0 (shape {value.shape}); drop the module from the adapter instead")
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
      raise ValueError(
        f"{path}: {key} holds {bad} NaN or infinite values; the adapter is broken, re-train or re-export it"
      )
  # PEFT adds its task's head names (`classifier` and `score` for a classifier) to modules_to_save and saves the one
  # the model has, so of those one with weights is enough; every other listed module needs its weights.
  plain = ["." + key for key in tensors if ".lora_" not in key]
  has = lambda module: any(f".{module}." in key for key in plain)  # noqa: E731
  listed = list(config.get("modules_to_save") or ())
  alternatives = [m for m in listed if m in _PEFT_HEAD_NAMES]
  missing = [m for m in listed if m not in _PEFT_HEAD_NAMES and not has(m)]
  if alternatives and not any(has(m) for m in alternatives):
    missing.append(" or ".join(repr(m) for m in alternatives))
  if missing:
    raise ValueError(
      f"{path}: modules_to_save lists {', '.join(map(str, missing))} but the file holds no weights "
      "of it; that head would be left random, re-export the adapter with its head"
    )
