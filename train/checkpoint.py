"""Orbax checkpoints of a run: the latest (for `resume`) and the best (by the task's metric).

`<output_dir>/checkpoints/latest/<step>/` holds `state` (trainable params: adapters, head, optional LayerNorms;
optimizer state; step) and `meta` (JSON: data position, best score so far, config). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.
`<output_dir>/checkpoints/best/<step>/` keeps the trainable params of the best evaluation.

Resume walks back: a latest checkpoint that cannot be restored (a truncated array file, an unreadable `meta`) is
reported in one line and moved aside to `<step>.corrupt`, and the next older one is tried; with none left,
`CheckpointError`. After a resume only the newest `keep` checkpoints remain.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be restored."""


_META_KEYS = ("step", "best", "data_position")


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding, so restored arrays land where the jit step expects them."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """The latest and the best checkpoints of one run."""

    def __init__(self, directory: str, keep: int = 2):
        directory = os.path.abspath(directory)
        self.keep = keep
        self.latest = ocp.CheckpointManager(
            os.path.join(directory, "latest"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))
        self.best = ocp.CheckpointManager(
            os.path.join(directory, "best"),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m["score"],
                                                 best_mode="max"),
            item_names=("params", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = {**meta, "state_signature": _signature(state)}
        self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)

    def save_best(self, step: int, params: Any, meta: dict, score: float) -> None:
        self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                     meta=ocp.args.JsonSave(meta)),
                       metrics={"score": float(score)}, force=True)

    def drop_after(self, step: int) -> None:
        """Deletes checkpoints past `step`: on resume, those are from the lost part of a killed run."""
        for manager in (self.latest, self.best):
            for s in manager.all_steps():
                if s > step:
                    manager.delete(s)

    def latest_step(self) -> Optional[int]:
        return self.latest.latest_step()

    def restore_latest(self, like_state: Any) -> tuple[Any, dict]:
        """Restores the newest (state, meta) that can be restored; `like_state` gives structure, dtypes and shardings.

        A checkpoint that fails is moved aside to `<step>.corrupt` (one line says why) and the next older one is
        tried; then checkpoints beyond the newest `keep` are deleted. Raises `CheckpointError` when none restores.
        """
        moved = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            try:
                with _quiet_orbax():
                    meta = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
                missing = [k for k in _META_KEYS if not isinstance(meta, dict) or k not in meta]
                if missing:
                    raise ValueError(f"meta lacks {missing}")
                if int(meta["step"]) != step:
                    raise ValueError(f"meta says step {meta['step']}")
            except Exception as e:  # orbax/json raise many types for a damaged file
                _drop_closed_loop_reports()
                moved.append(self._move_aside(step, e))
                continue
            # An intact checkpoint of another layout (a changed rank, method or optimizer) is not corrupt: never
            # move it aside, stop instead.
            if meta.get("state_signature", _signature(like_state)) != _signature(like_state):
                raise CheckpointError(
                    f"checkpoint {self.latest.directory}/{step} holds a different set or shape of parameters or "
                    "optimizer state than this config builds (another adapter.rank, method, targets or optimizer?); "
                    "resume with the config of that run, or use a new output_dir")
            try:
                with _quiet_orbax():
                    restored = self.latest.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(like_state)), meta=ocp.args.JsonRestore()))
            except Exception as e:  # orbax/tensorstore raise many types for a damaged file
                _drop_closed_loop_reports()
                moved.append(self._move_aside(step, e))
                continue
            self._keep_newest()
            return restored.state, restored.meta
        raise CheckpointError(f"no checkpoint in {self.latest.directory} can be restored (moved aside: "
                              f"{', '.join(moved) or 'none'}); start over without resume=true, or point output_dir "
                              "at a run with an intact checkpoint")

    def _move_aside(self, step: int, error: Exception) -> str:
        path = os.path.join(str(self.latest.directory), str(step))
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        target = path + ".corrupt"
        if jax.process_index() == 0:
            n = 1
            while os.path.exists(target):
                target, n = f"{path}.corrupt{n}", n + 1
            os.rename(path, target)
            print(f"checkpoint {path} cannot be restored ({type(error).__name__}: {reason}); moved it to {target}, "
                  "trying the next older one")
        _sync(f"move_aside_{step}")
        self.latest.reload()
        return os.path.basename(target)

    def _keep_newest(self) -> None:
        """Deletes all but the newest `keep` latest checkpoints (e.g. left by a run with a larger keep)."""
        for s in sorted(self.latest.all_steps())[:-self.keep]:
            self.latest.delete(s)

    def restore_best(self, like_params: Any) -> tuple[Any, dict]:
        step = self.best.best_step()
        restored = self.best.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(like_params)), meta=ocp.args.JsonRestore()))
        return restored.params, restored.meta

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
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
