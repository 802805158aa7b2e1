"""One owner per run directory.

`claim(output_dir, resume, overwrite)` is called before a run builds anything:

- A lock file `<output_dir>/.lock` (JSON: pid, host) is created exclusively. If it exists and names a live process,
  the run is refused (`RunDirectoryError`, one line naming that pid and host). A lock whose process is dead (same
  host, pid gone) is stale: it is reported and taken over. A lock from another host cannot be checked and is
  refused; delete it when that host's run is gone. The lock is removed when the run ends (`release`, or at exit).
- A new run (`resume=false`) into a directory that holds another run's checkpoints or results is refused, before
  anything of the old run is touched: `resume=true` continues it, `overwrite=true` deletes it first (checkpoints,
  metrics.jsonl, tensorboard, results.json, peft), another `output_dir` keeps it.
- `resume=true` with nothing to resume from: a finished run (results.json or peft) without a checkpoint is refused
  like a new run (a fresh start would replace its results); a run killed before its first checkpoint starts from
  step 0, with a line that says so.
- A lock file that is empty, unreadable or names a dead process on this host is stale (a run killed while taking
  it, or a crash): it is reported and taken over.

On several processes (a shared file system) only process 0 holds the lock; the others wait at a barrier for its
decision.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import time
from typing import Optional

LOCK_NAME = ".lock"
# What a run writes into its output_dir: their presence means the directory holds a run.
RUN_ENTRIES = ("checkpoints", "metrics.jsonl", "tensorboard", "results.json", "peft")


class RunDirectoryError(RuntimeError):
  """The output directory is owned by another live run, or holds a run that a new run would mix with."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _read_lock(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      owner = json.load(f)
    return owner if isinstance(owner, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):  # half-written by a process killed while taking it
    return {}


def _take(path: str) -> bool:
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
  return True


STALE_UNREADABLE_S = 60  # an empty or unreadable lock older than this was left by a run killed while taking it


def _unreadable_and_old(path: str) -> bool:
  """A lock that is empty or not JSON and was last written over `STALE_UNREADABLE_S` seconds ago (a starting run
  writes its pid right after creating the file)."""
  try:
    return time.time() - os.lstat(path).st_mtime > STALE_UNREADABLE_S
  except FileNotFoundError:
    return False


def _lock(output_dir: str) -> str:
  path = os.path.join(output_dir, LOCK_NAME)
  for _ in range(3):  # a stale lock removed by two starters at once: one of them wins the retake
    if _take(path):
      return path
    owner = _read_lock(path)
    if owner is None:
      if os.path.islink(path):  # a link to nowhere: no run can hold it
        print(f"note: {path} is a link to a missing file; removing it")
        _remove(path)
      continue
    if not owner and _unreadable_and_old(path):
      print(
        f"note: {path} is empty or unreadable and older than {STALE_UNREADABLE_S} s (left by a run killed "
        "while taking it); taking the run directory over"
      )
      _remove(path)
      continue
    pid, host = owner.get("pid"), owner.get("host")
    if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
      print(f"note: {path} was left by process {pid} on {host}, which is gone; taking the run directory over")
      os.remove(path)
      continue
    if host == socket.gethostname() and pid == os.getpid():
      return path  # already ours (a second fit of the same process)
    where = f"process {pid} on {host}" if pid is not None else "an unreadable lock"
    raise RunDirectoryError(
      f"{output_dir} is in use by another run ({where}, lock {path}); wait for it, use "
      "another output_dir, or delete the lock if that run is gone"
    )
  raise RunDirectoryError(f"cannot take the lock {path}; another run is starting in {output_dir}")


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _holds_run(output_dir: str) -> list[str]:
  return [name for name in RUN_ENTRIES if os.path.exists(os.path.join(output_dir, name))]


def _has_checkpoint(output_dir: str) -> bool:
  """Whether `<output_dir>/checkpoints` holds a complete checkpoint (a step folder orbax has finalised)."""
  for kind in ("latest", "best"):
    folder = os.path.join(output_dir, "checkpoints", kind)
    if os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder)):
      return True
  return False


def _check_resumable(output_dir: str, found: list[str]) -> None:
  """resume=true into a folder without a checkpoint: refused when it holds a finished run's outputs, else noted."""
  if not found or _has_checkpoint(output_dir):
    return
  finished = [name for name in ("results.json", "peft") if name in found]
  if finished:
    raise RunDirectoryError(
      f"resume=true but {output_dir} holds a finished run ({', '.join(finished)}) and no checkpoint to resume "
      "from; overwrite=true deletes it and starts afresh, or give another output_dir"
    )
  print(f"resume=true: {output_dir} holds no checkpoint yet (the run stopped before its first); starting at step 0")


def claim(output_dir: str, resume: bool, overwrite: bool) -> Optional[str]:
  """Locks `output_dir` for this run and checks it may be used; returns the lock path (None on processes > 0).

  Raises `RunDirectoryError` when another live run holds the directory, or when `resume` and `overwrite` are
  false and the directory holds a run; with `overwrite` (and no `resume`) that run's files are deleted.
  """
  import jax

  lock, error = None, None
  if jax.process_index() == 0:
    try:
      os.makedirs(output_dir, exist_ok=True)
      lock = _lock(output_dir)
      atexit.register(release, lock)
      found = _holds_run(output_dir)
      if resume:
        try:
          _check_resumable(output_dir, found)
        except RunDirectoryError:
          release(lock)
          lock = None
          raise
      if found and not resume:
        if not overwrite:
          release(lock)
          lock = None
          raise RunDirectoryError(
            f"{output_dir} holds another run ({', '.join(found)}); resume=true continues it, "
            "overwrite=true deletes it and starts afresh, or give another output_dir"
          )
        for name in found:
          path = os.path.join(output_dir, name)
          shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        print(f"overwrite=true: deleted the previous run in {output_dir} ({', '.join(found)})")
    except RunDirectoryError as e:
      error = e
  _agree(error)
  return lock


def _agree(error: Optional[RunDirectoryError]) -> None:
  """Raises process 0's error on every process (a refused run stops everywhere, not only on process 0)."""
  import jax

  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is None and int(refused):
      raise RunDirectoryError("process 0 refused the output_dir (its error says why)")
  if error is not None:
    raise error


def release(lock: Optional[str]) -> None:
  """Removes the lock if this process still holds it."""
  if lock is None:
    return
  owner = _read_lock(lock)
  if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
    try:
      os.remove(lock)
    except FileNotFoundError:
      pass
