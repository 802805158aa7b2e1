"""The training loop: build a run from its config, fit, evaluate, and finish with the pruned-and-merged check.

The parts are separate functions so other programs (the staged sparsifying scheduler) can drive them; each lives in
a module of its own and is re-exported here:

  experiment = build(config)                   # train.build: model, adapters, data, mesh, shardings
  outcome = fit(experiment)                    # here: jit steps (train.step), periodic eval (train.evaluate),
                                               # orbax checkpoints, logs (train.runlog); resumable
  results = finish(experiment, outcome)        # train.finish: rank report, pruned+merged eval, results.json
  run(config) does all three. The optimizer (`train.optimizer`) is `sora_jax.sora_optimizer` around AdamW.

`fit` takes the starting trainable params, the threshold lambda and the output directory as arguments, so a stage of
a staged run is one `fit` call. One optimizer step is `train.batch_size` examples split into `train.grad_accum`
micro-batches whose gradients are averaged inside the jitted step (a `lax.scan`), so the schedules count optimizer
steps. The dropout key of step t is fold_in(seed, t) and batches are a pure function of the step, so a resumed run
repeats an uninterrupted one exactly. A step whose loss, gradients or updated params are not finite leaves the state
unchanged; `train.on_nonfinite` then stops the run (`NonFiniteError`, nothing saved from that step) or counts the
step as skipped. SIGTERM or SIGINT during `fit` finishes the step, saves it and raises `train.preemption.Preempted`;
checkpoints carry the run's config, and a resume with a changed key outside `train.config.RESUMABLE_KEYS` is a
`CheckpointError`. `run` holds the output directory's lock (`train.rundir`) while it works.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from sora_jax import adapters
from sora_jax import sharding as shd
from train.build import Experiment, build, resolve_model
from train import cut
from train.checkpoint import CheckpointError, Checkpoints
from train.config import RunConfig, to_dict
from train.evaluate import evaluate, predict, score_key
from train.finish import FitOutcome, finish, restore_best
from train.optimizer import Hyper, budget_mode, hyper_for, lr_schedule, make_optimizer, target_fraction
from train.preemption import Preempted, StopSignal
from train.runlog import RunLog
from train.settings import setting_changes
from train.step import NonFiniteError, TrainState, step_programs

__all__ = [
  "Experiment",
  "FitOutcome",
  "Hyper",
  "NonFiniteError",
  "TrainState",
  "build",
  "evaluate",
  "finish",
  "fit",
  "hyper_for",
  "make_optimizer",
  "predict",
  "resolve_model",
  "restore_best",
  "run",
  "step_programs",
  "target_fraction",
]


# How a kept-best checkpoint stores a `TrainState`: the params, and the rest beside them (`Checkpoints(parts=...)`).
STATE_PARTS = (
  lambda state: (state.params, {"step": state.step, "opt_state": state.opt_state}),
  lambda params, rest: TrainState(rest["step"], params, rest["opt_state"]),
)


def _start(experiment: Experiment, trainable, total: int, sparse_lambda: Optional[float]) -> tuple:
  """(hyper on the mesh, the initial TrainState, the jitted train step); the step programs are compiled once per
  experiment."""
  hyper = hyper_for(experiment.config, total, sparse_lambda, target_fraction(experiment))
  if "train_step" not in experiment.jitted:
    experiment.jitted.update(step_programs(experiment, trainable, hyper))
  hyper = jax.device_put(hyper, shd.replicated(experiment.mesh))
  return hyper, experiment.jitted["init_state"](trainable, hyper), experiment.jitted["train_step"]


def _resume(checkpoints: Checkpoints, state: TrainState, config: RunConfig, output_dir: str) -> tuple:
  """(state, start step, best, skipped steps, meta) from the newest complete checkpoint (latest or kept-best),
  checked to share the run's settings; (state, 0, no best, 0, {}) when there is none."""
  if not checkpoints.has_checkpoint():
    return state, 0, {"step": None, "score": -math.inf, "metrics": None}, 0, {}
  state, meta = checkpoints.restore_latest(state)
  _check_resume_config(meta, config, checkpoints)
  start, best, skipped = int(meta["step"]), meta["best"], int(meta.get("skipped_steps", 0))
  checkpoints.drop_after(start)
  best["score"] = -math.inf if best["score"] is None else best["score"]
  print(f"resumed from {output_dir} at step {start} (data position {meta['data_position']})")
  return state, start, best, skipped, meta


def _progress_bar(experiment: Experiment, total: int, start: int):
  """A tqdm bar on process 0 when `train.progress`; None otherwise."""
  if not (experiment.config.train.progress and jax.process_index() == 0):
    return None
  from tqdm.auto import tqdm

  name = f"{experiment.spec.name}/{experiment.config.adapter.method}"
  return tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)


def _drain(pending: list, checkpoints: Checkpoints, config: RunConfig) -> tuple[list, int]:
  """The metrics of the steps since the last check, fetched to the host, and how many of them were not finite;
  raises `NonFiniteError` on one under `train.on_nonfinite=stop`."""
  fetched = jax.device_get(pending)
  bad = [(s, m) for s, m in fetched if not m["finite"]]
  if bad and config.train.on_nonfinite == "stop":
    raise _nonfinite_error(bad[0], checkpoints, config)
  return [m for _, m in fetched], len(bad)


def _log_record(window: list, lr: float, steps_per_s: float, skipped: int) -> dict:
  """The train log's record of the steps in `window`: mean finite loss, the last step's norms, ranks and sparsity."""
  losses = [m["loss"] for m in window if m["finite"]]
  return {
    "loss": float(np.mean(losses)) if losses else math.nan,
    "grad_norm": float(window[-1]["grad_norm"]),
    "active_ranks": int(window[-1]["active_ranks"]),
    "lr": lr,
    "steps_per_s": steps_per_s,
    "skipped_steps": skipped,
    **{k: float(window[-1][k]) for k in ("lambda", "active_fraction", "target_fraction") if k in window[-1]},
  }


def _show(bar, record: dict, method: str, skipped: int) -> None:
  """The log record on the progress bar."""
  sparsity = {"lam": f"{record['lambda']:.3g}", "kept": f"{record['active_fraction']:.3f}"} if method == "sora" else {}
  bar.set_postfix(
    loss=f"{record['loss']:.4f}",
    lr=f"{record['lr']:.2e}",
    ranks=record["active_ranks"],
    **sparsity,
    it_s=f"{record['steps_per_s']:.2f}",
    **({"skipped": skipped} if skipped else {}),
  )


def _best_from(config: RunConfig, total: int) -> int:
  """The first step whose evaluation may be the best: after the cut to the budget in budget mode or with
  `adapter.truncate_at`, else 0."""
  cut_at = cut.cut_step(config, total)
  if cut_at is not None:
    return cut_at
  if not budget_mode(config):
    return 0
  from sora_jax.budget import budget_phases

  return int(budget_phases(total, config.adapter.budget_start, config.adapter.budget_reach)[1]) + 1


class _Fit:
  """One `fit`: the state, the checkpoints, the logs and the best evaluation as the steps go by."""

  def __init__(self, experiment: Experiment, output_dir: str, total: int, start: int, best: dict, skipped: int):
    self.experiment, self.config, self.total = experiment, experiment.config, total
    self.schedule = lr_schedule(self.config, total)
    self.log = RunLog(output_dir, start)
    self.key, self.best_from = score_key(experiment), _best_from(self.config, total)
    self.best, self.skipped, self.history = best, skipped, []
    self.last_time, self.last_step = time.time(), start
    self.bar = _progress_bar(experiment, total, start)

  def log_train(self, done: int, window: list) -> None:
    now = time.time()
    record = _log_record(
      window, float(self.schedule(done - 1)), (done - self.last_step) / max(now - self.last_time, 1e-9), self.skipped
    )
    self.last_time, self.last_step = now, done
    self.history.append({"step": done, **record})
    self.log.write(done, {f"train/{k}": v for k, v in record.items()})
    if self.bar is not None:
      _show(self.bar, record, self.config.adapter.method, self.skipped)

  def evaluate(self, done: int, state: TrainState, checkpoints: Checkpoints, window: list) -> None:
    results = evaluate(self.experiment, adapters.combine(state.params, self.experiment.frozen))
    self.log.write(done, {f"eval/{k}": v for k, v in results.items()})
    if self.bar is not None:
      self.bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
    if results[self.key] > self.best["score"] and done >= self.best_from:
      self.best = {"step": done, "score": results[self.key], "metrics": results}
      # the whole state and what a resume reads: the kept-best checkpoint is a starting point too
      checkpoints.save_best(done, state, {**self.meta(done, window), "metrics": results}, results[self.key])

  def meta(self, done: int, window: list) -> dict:
    """What a checkpoint at `done` carries besides the state."""
    return {
      "step": done,
      "best": self.best,
      "data_position": self.experiment.batches.position(done),
      "skipped_steps": self.skipped,
      "config": to_dict(self.config),
      "log_window": [float(m["loss"]) for m in window if m["finite"]],
    }

  def close(self) -> None:
    self.log.close()
    if self.bar is not None:
      self.bar.close()


def fit(
  experiment: Experiment,
  *,
  output_dir: Optional[str] = None,
  trainable=None,
  sparse_lambda: Optional[float] = None,
  resume: Optional[bool] = None,
  total_steps: Optional[int] = None,
) -> FitOutcome:
  """Trains from `trainable` (default: the experiment's initial params) for `total_steps` optimizer steps.

  Args:
    experiment: from `build`.
    output_dir: where checkpoints and logs go (default `config.output_dir`).
    trainable: starting trainable params (e.g. the previous stage's), same structure as `experiment.trainable`.
    sparse_lambda: the proximal threshold (default `config.adapter.sparse_lambda`).
    resume: continue from the latest checkpoint in `output_dir` if there is one (default `config.resume`).
    total_steps: default `experiment.total_steps`.
  """
  config, mesh, started = experiment.config, experiment.mesh, time.time()
  output_dir = output_dir or config.output_dir
  total = total_steps or experiment.total_steps
  trainable = experiment.trainable if trainable is None else trainable
  hyper, state, step_fn = _start(experiment, trainable, total, sparse_lambda)
  cut_at = cut.cut_step(config, total)
  checkpoints = Checkpoints(os.path.join(output_dir, "checkpoints"), config.train.keep_checkpoints, STATE_PARTS)
  start, best, skipped, meta = 0, {"step": None, "score": -math.inf, "metrics": None}, 0, {}
  if config.resume if resume is None else resume:
    state, start, best, skipped, meta = _resume(checkpoints, state, config, output_dir)
  progress = _Fit(experiment, output_dir, total, start, best, skipped)
  # The losses since the last log record of the run this one resumes, so its next record averages the same steps.
  window, pending, aborted = [{"loss": np.float32(x), "finite": True} for x in meta.get("log_window", [])], [], False
  stop = StopSignal().install()
  try:
    for step in range(start, total):
      state, step_metrics = step_fn(
        state, experiment.frozen, shd.put_batch(experiment.batches(step), mesh, leading=1), hyper
      )
      done = step + 1
      pending.append((done, step_metrics))
      if done == cut_at:
        state = cut.truncate_state(experiment, state)
      stop_now = stop.agreed()
      checkpoints.check()  # a checkpoint write that failed in the background stops the run here
      train = config.train
      log_now = done % train.log_every == 0 or done == total
      eval_now = done % train.eval_every == 0 or done == total
      save_now = done % train.save_every == 0 or done == total or stop_now
      abort_now = train.abort_at_step is not None and done == train.abort_at_step
      if log_now or eval_now or save_now or abort_now:
        # The finite flags of the steps since the last check, before anything is evaluated or saved.
        fetched, bad = _drain(pending, checkpoints, config)
        pending, progress.skipped = [], progress.skipped + bad
        window.extend(fetched)
      if log_now:
        progress.log_train(done, window)
        window = []
      if progress.bar is not None:
        progress.bar.update(1)
      if eval_now:
        progress.evaluate(done, state, checkpoints, window)
      if save_now:
        checkpoints.save(done, state, progress.meta(done, window))
      if stop_now:
        checkpoints.wait()
        raise Preempted(stop.name, done, str(checkpoints.latest.directory))
      if abort_now and done < total:
        aborted = True
        break
  finally:
    stop.restore()
    checkpoints.wait()
    checkpoints.close()
    progress.close()
  if progress.skipped:
    print(
      f"{progress.skipped} of {total} steps had a non-finite loss or gradient and were skipped (train.on_nonfinite=skip)"
    )
  return FitOutcome(
    state.params,
    int(state.step),
    progress.best,
    progress.history,
    aborted,
    time.time() - started,
    output_dir,
    skipped_steps=progress.skipped,
  )


def _check_resume_config(meta: dict, config: RunConfig, checkpoints: Checkpoints) -> None:
  """Refuses to resume a checkpoint written with other values of the keys that shape training
  (`train.settings.setting_changes`; `train.config.RESUMABLE_KEYS` may change)."""
  if "config" not in meta:  # written before checkpoints carried their config: nothing to compare
    return
  changes = setting_changes(meta["config"], config)
  if changes:
    raise CheckpointError(
      f"resume=true with a changed config: {'; '.join(changes)}; the checkpoint in {checkpoints.latest.directory}"
      " was trained with the first values; resume with them, or start afresh with overwrite=true or another "
      "output_dir"
    )


def _nonfinite_error(bad: tuple, checkpoints: Checkpoints, config: RunConfig) -> NonFiniteError:
  step, metrics = bad
  checkpoints.wait()
  last = checkpoints.last_finite_step()
  where = (
    f"the last good checkpoint is step {last} in {checkpoints.latest.directory} (resume=true restarts there)"
    if last is not None
    else "no checkpoint was saved yet"
  )
  return NonFiniteError(
    f"step {step}: loss {float(metrics['loss']):.4g}, gradient norm {float(metrics['grad_norm']):.4g}: the loss, "
    f"gradients or updated params are not finite; stopped without saving this state; {where}; lower "
    f"optim.learning_rate (now {config.optim.learning_rate:g}) or set train.on_nonfinite=skip"
  )


def run(config: RunConfig, after_fit: Optional[Callable[[Experiment, FitOutcome], None]] = None) -> Optional[dict]:
  """build, fit, (restore_best), `after_fit(experiment, outcome)` if given, finish; None when the run was aborted
  (`train.abort_at_step`).

  The output directory is locked for the run and checked first (`train.rundir.claim`: another live run, or a new
  run into another run's directory, is refused).
  """
  from train import rundir

  lock = rundir.claim(config.output_dir, config.resume, config.overwrite)
  try:
    experiment = build(config)
    outcome = fit(experiment)
    if outcome.aborted:
      print(f"aborted after step {outcome.step} (train.abort_at_step); continue with resume=true")
      return None
    if config.train.final_params == "best":
      outcome = restore_best(experiment, outcome)
    if after_fit is not None:
      after_fit(experiment, outcome)
    return finish(experiment, outcome)
  finally:
    rundir.release(lock)
