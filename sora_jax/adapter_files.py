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
import re
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


# The heads PEFT adds to modules_to_save by task type (peft >= 0.22 adds DistilBERT's pre_classifier to a classifier's).
_PEFT_HEAD_NAMES = ("classifier", "score", "pre_classifier", "qa_outputs")


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any, whole: bool = False) -> bool:
  """A positive finite number (not a string or boolean); with `whole`, an integer up to 2^31 - 1 (a rank)."""
  if not _number(value):
    return False
  try:
    number = float(value)
  except OverflowError:  # an integer beyond any float
    return False
  if not (math.isfinite(number) and number > 0):
    return False
  return not whole or (number.is_integer() and number <= _MAX_RANK)


_MAX_RANK = 2**31 - 1
_MAX_PATTERN = 500  # characters of a rank_pattern / alpha_pattern key; module names are far shorter


def _shown(text: Any) -> str:
  text = repr(text)
  return text if len(text) <= 80 else text[:77] + "..."


def _nested_repetition(pattern: str) -> bool:
  """Whether a group that holds a repetition (`*`, `+`, `{m,n}`) or an alternation (`|`) is itself repeated, as in
  `(a+)+` or `(a|a)*`: the shapes whose matching can take exponential time (catastrophic backtracking). Escapes
  and character classes are skipped; a conservative syntactic check, no regex engine internals."""
  groups = [False]  # per open group: whether it holds a repetition or alternation
  i, closed = 0, None  # closed: whether the group that just closed held one
  while i < len(pattern):
    c = pattern[i]
    repeat = c in "*+" or (c == "{" and re_bounded_repeat(pattern, i))
    if repeat:
      if closed:
        return True
      groups[-1] = True
    closed = None
    if c == "\\":
      i += 2
      continue
    if c == "[":  # a character class: skip to its end
      j = i + 1 + (pattern[i + 1 : i + 2] == "^")
      j += pattern[j : j + 1] == "]"
      while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
      i = j + 1
      continue
    if c == "(":
      groups.append(False)
    elif c == ")" and len(groups) > 1:
      closed = groups.pop()
      groups[-1] = groups[-1] or closed
    elif c == "|":
      groups[-1] = True
    i += 1
  return False


def re_bounded_repeat(pattern: str, i: int) -> bool:
  """Whether `{` at `pattern[i]` opens a repetition of more than one (`{2}`, `{1,}`, `{0,5}`), not a literal brace."""
  end = pattern.find("}", i)
  body = pattern[i + 1 : end] if end > 0 else ""
  low, comma, high = body.partition(",")
  if not (low.isdigit() or (comma and not low)) or (high and not high.isdigit()):
    return False
  return bool(comma and not high) or int(high or low or 0) > 1


def _check_pattern_key(path: str, field: str, key: Any) -> None:
  """A `rank_pattern` / `alpha_pattern` key is a regex PEFT matches against module names (`(.*\\.)?(key)$`): it
  must compile, be at most `_MAX_PATTERN` characters and hold no nested repetition."""
  where = f"{path}: {field}[{_shown(key)}]"
  if not isinstance(key, str) or len(key) > _MAX_PATTERN:
    raise ValueError(f"{where} must be a module name or a short regex (at most {_MAX_PATTERN} characters)")
  try:
    re.compile(rf"(.*\.)?({key})$")
  except re.error as e:
    raise ValueError(
      f"{where} is not a valid regex ({e}); PEFT matches these keys as regexes on module names"
    ) from None
  if _nested_repetition(key):
    raise ValueError(
      f"{where} has nested repetition (a repeated group that itself repeats or alternates), which can take "
      "exponential time to match; give the module name or a simpler regex"
    )


def read_adapter_config(path: str) -> dict:
  """The mapping in a PEFT adapter_config.json, with `r`, `lora_alpha`, `rank_pattern` and `alpha_pattern` checked:
  numbers (not strings or booleans), finite and positive, ranks whole; pattern keys valid, short regexes without
  nested repetition."""
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise ValueError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]}); re-export the adapter") from None
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object of PEFT settings, got a {type(config).__name__}")
  checks = [("r", config.get("r", 8), True), ("lora_alpha", config.get("lora_alpha", 8), False)]
  for pattern in ("rank_pattern", "alpha_pattern"):
    values = config.get(pattern) or {}
    if not isinstance(values, dict):
      raise ValueError(f"{path}: {pattern} must map module names to numbers, got {_shown(values)}")
    for name, value in values.items():
      _check_pattern_key(path, pattern, name)
      checks.append((f"{pattern}[{_shown(name)}]", value, pattern == "rank_pattern"))
  for key, value, whole in checks:
    if not _positive(value, whole):
      kind = f"a positive whole number up to {_MAX_RANK}" if whole else "a positive finite number"
      raise ValueError(f"{path}: {key} must be {kind}, got {_shown(value)}")
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
    if (".lora_A" in key or ".lora_B" in key) and value.ndim != 2:
      raise ValueError(
        f"{path}: {key} has shape {value.shape}; LoRA factors of Linear layers are 2-D (lora_A (r, in), "
        "lora_B (out, r)): the file is damaged or not a LoRA adapter of Linear layers"
      )
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
