"""Orbax checkpoints of a run: the latest (for `resume`) and the best (by the task's metric).

`<output_dir>/checkpoints/latest/<step>/` holds `state` (trainable params: adapters, head, optional LayerNorms;
optimizer state; step) and `meta` (JSON: data position, best score so far, config). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.
`<output_dir>/checkpoints/best/<step>/` keeps the trainable params of the best evaluation and, in a training run, the
rest of the state (`rest`: optimizer state, step) with the same `meta`, so it is a starting point too: a run killed
after its first kept-best checkpoint but before its first periodic one resumes from the best one.

Resume starts from the newest complete checkpoint, latest or best, and walks back: one that cannot be restored (a
truncated array file, an unreadable `meta`, arrays or `meta` whose checksum differs from the one saved) is reported
in one line and moved aside to `<step>.corrupt`, and the next older one is tried; with none left, `CheckpointError`.
After a resume only the newest `keep` latest checkpoints remain.

The checksum (`fingerprint`) is one uint32 per array, a position-weighted sum of the array's bits modulo 2^32 computed
on the devices: integer sums are exact in any order, so it does not depend on the mesh the arrays are sharded over,
and it needs no gather to one host. A save that fails (a full disk) raises `CheckpointError` naming the step and
the last checkpoint that was written completely; orbax's own error logs are kept out of the output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No checkpoint of the run can be restored."""


_META_KEYS = ("step", "best", "data_position")


def _abstract(tree):
  """ShapeDtypeStructs carrying each leaf's sharding, so restored arrays land where the jit step expects them."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
  """The latest and the best checkpoints of one run.

  With `parts` (`split(state) -> (params, rest)` and its inverse `join(params, rest) -> state`), `save_best` takes the
  whole training state and keeps the rest of it (optimizer state, step) beside the params, so a kept-best checkpoint
  is a starting point for a resume like a latest one.
  """

  def __init__(self, directory: str, keep: int = 2, parts: Optional[tuple[Callable, Callable]] = None):
    directory = os.path.abspath(directory)
    self.keep = keep
    self.parts = parts
    self.failed = False  # a save failed: later waits and closes stay silent
    self._pending: Optional[int] = None  # the step of the save orbax may still be writing
    self.latest = ocp.CheckpointManager(
      os.path.join(directory, "latest"),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=("state", "meta"),
    )
    self.best = ocp.CheckpointManager(
      os.path.join(directory, "best"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["score"], best_mode="max"),
      item_names=("params", "meta", "rest"),
    )

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts writing `state` and `meta` as checkpoint `step` (orbax finishes it in the background).

    `meta` gains the state's layout signature, its checksum (`fingerprint`), whether all of it is finite, and a
    checksum of `meta` itself (the best score and the data position are trusted on resume).
    """
    checksum, finite = fingerprint(state)
    meta = _sealed({**meta, "state_signature": _signature(state), "state_checksum": checksum, "finite": finite})
    self._guarded(
      step,
      lambda: self.latest.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True
      ),
    )
    self._pending = step

  def _guarded(self, step: Optional[int], write, manager=None) -> None:
    """Runs `write` (a save, or waiting for one); a failure becomes one `CheckpointError` line, and later waits
    stay silent, so the run stops with that line alone."""
    if self.failed:
      return
    try:
      with _quiet_orbax():
        write()
    except Exception as e:  # orbax/tensorstore wrap an OSError (ENOSPC) in many types
      self.failed = True
      reason = _os_reason(e)
      step = self._pending if step is None else step
      last = self._complete_steps(excluding=step)
      kept = (
        f"the last complete checkpoint is step {last[-1]} in {self.latest.directory} (resume=true restarts there)"
        if last
        else "no checkpoint was completed"
      )
      raise CheckpointError(
        f"saving checkpoint step {step} to {(manager or self.latest).directory} failed ({reason}); "
        f"stopped training; {kept}; free disk space and rerun with resume=true"
      ) from None

  def _complete_steps(self, excluding: Optional[int] = None) -> list[int]:
    """Steps whose folder orbax has finalised (renamed from its temporary name), oldest first."""
    directory = str(self.latest.directory)
    found = []
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
      if name.isdigit() and int(name) != excluding and os.path.isdir(os.path.join(directory, name)):
        found.append(int(name))
    return sorted(found)

  def last_finite_step(self) -> Optional[int]:
    """The newest latest checkpoint whose `meta` says all of its state was finite when saved."""
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        with _quiet_orbax():
          meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      except Exception:  # unreadable: not a step to name
        continue
      if isinstance(meta, dict) and meta.get("finite", True):
        return step
    return None

  def save_best(self, step: int, state: Any, meta: dict, score: float) -> None:
    """Keeps `state` (the params, or with `parts` the whole training state) as the best checkpoint at `step`."""
    params, rest = self.parts[0](state) if self.parts else (state, None)
    params_checksum, params_finite = fingerprint(params)
    meta = {**meta, "params_checksum": params_checksum}
    items = {"params": ocp.args.StandardSave(params)}
    if rest is not None:  # a starting point for a resume: the rest of the state, its checksum and layout
      checksum, finite = fingerprint(rest)
      meta.update(rest_checksum=checksum, state_signature=_signature((params, rest)), resumable=True)
      meta["finite"] = finite and params_finite
      items["rest"] = ocp.args.StandardSave(rest)
    meta = _sealed(meta)
    self._guarded(
      step,
      lambda: self.best.save(
        step,
        args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)),
        metrics={"score": float(score)},
        force=True,
      ),
      self.best,
    )
    if jax.process_count() > 1:
      # Several processes: finish this write before the next checksum, whose reductions run on every process, so
      # that no process's orbax thread is still writing when another starts a collective (a hang seen under load).
      self._guarded(step, self.best.wait_until_finished, self.best)

  def has_checkpoint(self) -> bool:
    """Whether any checkpoint a resume may start from is on disk (a latest one, or with `parts` a kept-best one)."""
    return bool(self.latest.all_steps() or (self.parts and self.best.all_steps()))

  def drop_after(self, step: int) -> None:
    """Deletes checkpoints past `step`: on resume, those are from the lost part of a killed run."""
    for manager in (self.latest, self.best):
      for s in manager.all_steps():
        if s > step:
          manager.delete(s)

  def latest_step(self) -> Optional[int]:
    return self.latest.latest_step()

  def _candidates(self) -> list[tuple[int, Any]]:
    """(step, manager) of every checkpoint a resume may start from, newest first; a latest one before a best one
    of the same step."""
    found = [(s, 1, self.latest) for s in self.latest.all_steps()]
    if self.parts:
      found += [(s, 0, self.best) for s in self.best.all_steps()]
    return [(s, m) for s, _, m in sorted(found, key=lambda c: c[:2], reverse=True)]

  def restore_latest(self, like_state: Any) -> tuple[Any, dict]:
    """Restores the newest (state, meta) that can be restored; `like_state` gives structure, dtypes and shardings.

    Candidates are the latest checkpoints and, with `parts`, the kept-best ones (whichever is newer). A checkpoint
    that fails is moved aside to `<step>.corrupt` (one line says why) and the next older one is tried; then latest
    checkpoints beyond the newest `keep` are deleted. Raises `CheckpointError` when none restores.
    """
    moved = []
    for step, manager in self._candidates():
      best = manager is self.best
      layout = _signature(self.parts[0](like_state) if best else like_state)
      try:
        with _quiet_orbax():
          meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if best and isinstance(meta, dict) and not meta.get("resumable"):
          continue  # a best checkpoint of params alone: not a starting point, not damaged either
        _check_meta(meta, step)
      except Exception as e:  # orbax/json raise many types for a damaged file
        _drop_closed_loop_reports()
        moved.append(self._move_aside(step, e, manager))
        continue
      # An intact checkpoint of another layout (a changed rank, method or optimizer) is not corrupt: never
      # move it aside, stop instead.
      if meta.get("state_signature", layout) != layout:
        raise CheckpointError(
          f"checkpoint {manager.directory}/{step} holds a different set or shape of parameters or "
          "optimizer state than this config builds (another adapter.rank, method, targets or optimizer?); "
          "resume with the config of that run, or use a new output_dir"
        )
      try:
        state = self._restore_state(step, manager, like_state, meta)
      except Exception as e:  # orbax/tensorstore raise many types for a damaged file
        _drop_closed_loop_reports()
        moved.append(self._move_aside(step, e, manager))
        continue
      self._keep_newest()
      return state, meta
    raise CheckpointError(
      f"no checkpoint in {os.path.dirname(str(self.latest.directory))} can be restored (moved aside: "
      f"{', '.join(moved) or 'none'}); start over without resume=true, or point output_dir "
      "at a run with an intact checkpoint"
    )

  def _restore_state(self, step: int, manager, like_state: Any, meta: dict) -> Any:
    """The state of checkpoint `step` of `manager`, its arrays checked against the checksums in `meta`."""
    damaged = "the arrays' checksum differs from the one saved with them (damaged data)"
    with _quiet_orbax():
      if manager is self.latest:
        state = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(like_state)))
        ).state
        if meta.get("state_checksum") is not None and fingerprint(state)[0] != meta["state_checksum"]:
          raise ValueError(damaged)
        return state
      like_params, like_rest = self.parts[0](like_state)
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(like_params)), rest=ocp.args.StandardRestore(_abstract(like_rest))
        ),
      )
    if fingerprint(restored.params)[0] != meta.get("params_checksum") or fingerprint(restored.rest)[0] != meta.get(
      "rest_checksum"
    ):
      raise ValueError(damaged)
    return self.parts[1](restored.params, restored.rest)

  def _move_aside(self, step: int, error: Exception, manager=None) -> str:
    manager = manager or self.latest
    path = os.path.join(str(manager.directory), str(step))
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    target = path + ".corrupt"
    if jax.process_index() == 0:
      n = 1
      while os.path.exists(target):
        target, n = f"{path}.corrupt{n}", n + 1
      os.rename(path, target)
      print(
        f"checkpoint {path} cannot be restored ({type(error).__name__}: {reason}); moved it to {target}, "
        "trying the next older one"
      )
    _sync(f"move_aside_{step}")
    manager.reload()
    return os.path.basename(target)

  def _keep_newest(self) -> None:
    """Deletes all but the newest `keep` latest checkpoints (e.g. left by a run with a larger keep)."""
    for s in sorted(self.latest.all_steps())[: -self.keep]:
      self.latest.delete(s)

  def restore_best(self, like_params: Any) -> tuple[Any, dict]:
    step = self.best.best_step()
    restored = self.best.restore(
      step,
      args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(like_params)), meta=ocp.args.JsonRestore()),
    )
    saved = restored.meta.get("params_checksum")
    sealed = restored.meta.get("meta_checksum")
    if (saved is not None and fingerprint(restored.params)[0] != saved) or (
      sealed is not None and sealed != _meta_checksum(restored.meta)
    ):
      raise CheckpointError(
        f"the kept-best checkpoint {self.best.directory}/{step} is damaged (its arrays' "
        "checksum differs from the one saved with them); rerun with final_params=last, or "
        "resume the run from its latest checkpoint"
      )
    return restored.params, restored.meta

  def check(self) -> None:
    """Raises `CheckpointError` if a save running in the background has failed (does not wait for it)."""
    self._guarded(None, self.latest.check_for_errors)

  def wait(self) -> None:
    self._guarded(None, lambda: (self.latest.wait_until_finished(), self.best.wait_until_finished()))

  def close(self) -> None:
    if self.failed:  # closing waits for the failed save again: its error is reported already
      with _quiet_orbax():
        for manager in (self.latest, self.best):
          try:
            manager.close()
          except Exception:
            pass
      return
    self.latest.close()
    self.best.close()


class _quiet_orbax:
  """Silences orbax's and asyncio's error logs during a restore that may fail: the failure is reported in one line
  by the caller instead of dozens of tracebacks ("Event loop is closed")."""

  _NAMES = ("absl", "orbax", "asyncio")

  def __enter__(self):
    self._levels = {n: logging.getLogger(n).level for n in self._NAMES}
    for n in self._NAMES:
      logging.getLogger(n).setLevel(logging.CRITICAL)

  def __exit__(self, *exc):
    for n, level in self._levels.items():
      logging.getLogger(n).setLevel(level)


_OS_REASON = re.compile(
  r"\[OS error(?: \d+)?: ([^\]]+)\]|(No space left on device|Disk quota exceeded|File too large"
  r"|Read-only file system)"
)


def _os_reason(error: Exception) -> str:
  """The operating system's words for a failed write ("No space left on device"), else the error's first 200
  characters: tensorstore wraps them in a long spec."""
  text = " ".join(str(error).split())
  match = _OS_REASON.search(text)
  return (match.group(1) or match.group(2)) if match else f"{type(error).__name__}: {text[:200]}"


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
  """sum_i bits(x_i) * (2 i + 1) mod 2^32 over the flattened array (uint32): exact in any reduction order."""
  import jax.numpy as jnp

  x = jnp.ravel(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 4:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  elif x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  elif x.dtype.itemsize == 1:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  else:
    raise ValueError(f"no checksum for {x.dtype} arrays")
  weights = 2 * jax.lax.iota(jnp.uint32, x.size) + 1
  return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprints(leaves):
  import jax.numpy as jnp

  finite = [jnp.all(jnp.isfinite(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  return [_leaf_fingerprint(x) for x in leaves], jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)


def fingerprint(state: Any) -> tuple[str, bool]:
  """A checksum of every array of `state` (hex, equal for equal arrays whatever their sharding) and whether all of
  its floating-point values are finite."""
  leaves = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype")]
  sums, finite = jax.device_get(_fingerprints(leaves))
  digest = hashlib.sha256(b"".join(int(v).to_bytes(4, "little") for v in sums)).hexdigest()[:16]
  return digest, bool(finite)


def _meta_checksum(meta: dict) -> str:
  """A digest of `meta` (JSON with sorted keys) without its own `meta_checksum` entry."""
  text = json.dumps({k: v for k, v in meta.items() if k != "meta_checksum"}, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sealed(meta: dict) -> dict:
  """`meta` with its checksum: the best score, the data position and the config a resume trusts are covered."""
  return {**meta, "meta_checksum": _meta_checksum(meta)}


def _check_meta(meta: Any, step: int) -> None:
  """Raises `ValueError` for a checkpoint `meta` that lacks a key a resume reads, names another step, or differs
  from its checksum."""
  missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
  if missing:
    raise ValueError(f"meta lacks {missing}")
  if int(meta["step"]) != step:
    raise ValueError(f"meta says step {meta['step']}")
  if meta.get("meta_checksum") is not None and meta["meta_checksum"] != _meta_checksum(meta):
    raise ValueError("meta differs from its checksum (damaged or edited: the best score or data position)")


def _signature(state: Any) -> str:
  """A digest of the tree structure, shapes and dtypes of `state`: equal for checkpoints of the same layout."""
  leaves, treedef = jax.tree_util.tree_flatten(state)
  text = repr(treedef) + repr([(tuple(x.shape), str(x.dtype)) for x in leaves])
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _drop_closed_loop_reports() -> None:
  """After a failed restore, reads of the abandoned attempt still finish and call back into the asyncio loop that
  orbax has closed; each callback prints "RuntimeError: Event loop is closed" with a traceback (dozens of them).
  From then on, exactly those reports are dropped; every other exception is reported as before."""
  closed = lambda kind, value: kind is RuntimeError and str(value) == "Event loop is closed"
  if not getattr(sys.excepthook, "drops_closed_loop", False):
    previous = sys.excepthook

    def excepthook(kind, value, tb):
      if not closed(kind, value):
        previous(kind, value, tb)

    excepthook.drops_closed_loop = True
    sys.excepthook = excepthook
  if not getattr(sys.unraisablehook, "drops_closed_loop", False):
    previous_unraisable = sys.unraisablehook

    def unraisablehook(args):
      if not closed(args.exc_type, args.exc_value):
        previous_unraisable(args)

    unraisablehook.drops_closed_loop = True
    sys.unraisablehook = unraisablehook


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
