"""Files of an exported adapter or merged model: written whole or not at all, and checked when read.

`atomic_folder(target, owned)` yields a staging folder beside `target` (same file system); the writer puts its files
there, and only when it returns is the staging folder renamed into place. A symlinked `target` (`current -> v1/`) is
resolved first: the link stays and the folder it points to is replaced. The write touches only its own files: the
files it writes now, the files the previous export listed in its manifest (`.sora_jax_export.json`, written with
every export), and the names in `owned` that a loader would read instead of the new files (a stale
`adapter_model.bin`); every other entry of the old `target` (a README, a tokenizer, the user's own `adapter_*` files)
is kept. Folders and files get the modes the umask gives (an existing `target` keeps its folder mode), so a serving
account can read them. A failure at any point leaves the old `target` whole (or no `target`), never a mix of old and
new files; the staging folder is removed, and so are staging folders that a killed export of this host left behind.

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
import socket
import stat
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

MANIFEST = ".sora_jax_export.json"  # the names of the files the last export wrote into its folder


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, owned: Sequence[str] = ()) -> Iterator[str]:
  """Yields a staging folder that replaces `target` when the `with` block finishes without an exception.

  Args:
    target: the folder to write (a symlink to a folder is followed); created if missing, replaced if present.
    owned: exact names or glob patterns of files a loader would read in place of the new ones (stale weights of
      another format or shard count); they are replaced even when the previous export left no manifest.
  """
  target = os.path.realpath(os.fspath(target))
  parent, name = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  _clean_interrupted(parent, name)
  staging = tempfile.mkdtemp(prefix=f".{name}.writing-{_tag()}~", dir=parent)
  try:
    os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode) if os.path.isdir(target) else 0o777 & ~_umask())
    yield staging
    _seal(staging)
    _swap(staging, target, owned)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def _tag() -> str:
  """`<pid>-<host>`: which process of which host a staging folder belongs to (hostnames hold no '~')."""
  return f"{os.getpid()}-{socket.gethostname()}"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _clean_interrupted(parent: str, name: str) -> None:
  """Removes the staging folders that an export of `name` killed on this host left in `parent` (their process is
  gone); a moved-aside old folder whose replacement never arrived is put back first."""
  host = socket.gethostname()
  for entry in sorted(os.listdir(parent)):
    for kind in ("writing", "old"):
      prefix = f".{name}.{kind}-"
      if not entry.startswith(prefix) or "~" not in entry:
        continue
      pid, _, owner = entry[len(prefix) :].rpartition("~")[0].partition("-")
      if owner != host or not pid.isdigit() or _alive(int(pid)):
        continue
      path, target = os.path.join(parent, entry), os.path.join(parent, name)
      if kind == "old" and not os.path.exists(target):
        os.rename(path, target)  # killed between the two renames of `_swap`: the old folder is the one to keep
      else:
        shutil.rmtree(path, ignore_errors=True)


def _seal(staging: str) -> None:
  """Gives the written files the umask's modes and lists them in the folder's manifest."""
  mode = 0o666 & ~_umask()
  written = sorted(os.listdir(staging))
  for entry in written:
    path = os.path.join(staging, entry)
    if os.path.isfile(path) and not os.path.islink(path):
      os.chmod(path, mode)
  with open(os.path.join(staging, MANIFEST), "w") as f:
    json.dump({"files": written}, f)
  os.chmod(os.path.join(staging, MANIFEST), mode)


def _previous_files(target: str) -> set[str]:
  """The files the previous export wrote into `target`, from its manifest (none without a readable one)."""
  try:
    with open(os.path.join(target, MANIFEST)) as f:
      files = json.load(f).get("files", [])
  except (OSError, ValueError, AttributeError):
    return set()
  return {f for f in files if isinstance(f, str) and os.sep not in f and f not in (".", "..")}


def _swap(staging: str, target: str, owned: Sequence[str]) -> None:
  """Renames `staging` to `target`, the old `target`'s entries that are not this writer's moved into `staging`
  first."""
  if not os.path.isdir(target):
    os.rename(staging, target)
    return
  written = set(os.listdir(staging))
  ours = _previous_files(target)
  kept = [
    entry
    for entry in os.listdir(target)
    if entry not in written and entry not in ours and not any(fnmatch.fnmatch(entry, p) for p in owned)
  ]
  moved = []
  try:
    for entry in kept:
      os.rename(os.path.join(target, entry), os.path.join(staging, entry))
      moved.append(entry)
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-{_tag()}~", dir=os.path.dirname(target))
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
