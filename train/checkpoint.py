"""Orbax checkpoints of a run: the latest (for `resume`) and the best (by the task's metric).

`<output_dir>/checkpoints/latest/<step>/` holds `state` (trainable params: adapters, head, optional LayerNorms;
optimizer state; step) and `meta` (JSON: data position, best score so far, config). Orbax writes each step into a
temporary directory and renames it when complete, so a run killed mid-save leaves the previous checkpoint intact.
`<output_dir>/checkpoints/best/<step>/` keeps the trainable params of the best evaluation.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _abstract(tree):
    """ShapeDtypeStructs carrying each leaf's sharding, so restored arrays land where the jit step expects them."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    """The latest and the best checkpoints of one run."""

    def __init__(self, directory: str, keep: int = 1):
        directory = os.path.abspath(directory)
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
        """Restores the latest (state, meta); `like_state` gives structure, dtypes and shardings."""
        step = self.latest.latest_step()
        restored = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like_state)), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

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
