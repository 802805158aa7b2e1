"""Finishing a run: the final evaluation, the rank report, the pruned-and-merged model checked against the unpruned
one, the budget's cut, the PEFT export and results.json; and `restore_best`, the best evaluation's params.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import numpy as np

from sora_jax import adapters
from sora_jax import sharding as shd
from train.build import HUB_NAMES, Experiment
from train.checkpoint import Checkpoints
from train.config import to_dict
from train.evaluate import evaluate, score_key
from train.jsonio import write_json
from train.optimizer import budget_params
from train.step import NonFiniteError


@dataclasses.dataclass
class FitOutcome:
  """What `train.loop.fit` returns: the final trainable params and the run's record."""

  params: Any  # final trainable params
  step: int
  best: dict  # {"step", "score", "metrics"}
  history: list  # train log records
  aborted: bool
  wall_time_s: float
  output_dir: str
  params_step: Optional[int] = None  # the step `params` come from, when not the last (`restore_best`)
  skipped_steps: int = 0  # steps whose update was dropped as non-finite (train.on_nonfinite=skip)


def _max_abs_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def gather(tree):
  """Host numpy copy of a tree whose leaves may be sharded across hosts."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _pruned_merged(experiment: Experiment, params, final: dict, logits: dict, splits) -> tuple[dict, Any]:
  """The rank report's entries of results.json and the pruned+merged model's check against the unpruned one
  (`final`, `logits`); and the pruned host params (for the PEFT export)."""
  config = experiment.config
  host_params = gather(params)
  report = adapters.rank_report(host_params, experiment.sora)
  pruned = adapters.prune(host_params)
  merged = adapters.merge(pruned, experiment.sora)
  merged = jax.device_put(
    merged, shd.named(shd.param_specs(merged, experiment.mesh, config.mesh.fsdp_min_size), experiment.mesh)
  )
  merged_metrics, merged_logits = evaluate(experiment, merged, splits, adapted=False, return_logits=True)
  diff = _max_abs_diff(logits, merged_logits)
  tolerance = 5e-2 if config.model.bf16 else 1e-3
  finite = bool(np.isfinite(diff))  # a NaN difference is a failed check, never a pass
  results = {
    "retained_params": report.retained_params,
    "max_params": report.max_params,
    "retained_fraction": report.fraction,
    "base_params": report.base_params,
    "ranks": {(r.path if r.layer is None else f"{r.path}[{r.layer}]"): r.rank for r in report.rows},
    "rank_max": experiment.sora.rank,
    "pruned_merged": {
      "metrics": merged_metrics,
      "max_abs_logit_diff": diff,
      "metrics_equal": finite and merged_metrics == final,
      "logits_close": finite and diff <= tolerance,
    },
  }
  print(report)
  if not (results["pruned_merged"]["metrics_equal"] and results["pruned_merged"]["logits_close"]):
    print(
      f"WARNING: pruned+merged model differs from the unpruned one: max |logit diff| {diff:.3g}, "
      f"metrics {merged_metrics} vs {final}"
    )
  return results, pruned


def finish(experiment: Experiment, outcome: FitOutcome, *, write: bool = True) -> dict:
  """Final evaluation, rank report, pruned+merged evaluation (checked equal) and `results.json`."""
  config = experiment.config
  trainable, budget = _meet_budget(experiment, outcome.params)
  params = adapters.combine(trainable, experiment.frozen)
  splits = experiment.eval_splits + experiment.test_splits
  final, logits = evaluate(experiment, params, splits, return_logits=True)
  broken = [split for split, values in logits.items() if not np.isfinite(values).all()]
  if broken:
    raise NonFiniteError(
      f"the final model's logits on {broken} are not finite (step {outcome.step}); the "
      "parameters are broken, so no rank report, pruning or export; lower optim.learning_rate"
    )
  results = {
    "task": experiment.spec.name,
    "method": config.adapter.method,
    "model": config.model.name,
    "steps": outcome.step,
    "metrics": final,
    "best": outcome.best,
    "params_step": outcome.step if outcome.params_step is None else outcome.params_step,
    "train_wall_time_s": outcome.wall_time_s,
  }
  pruned = None
  if experiment.sora is not None:
    ranks, pruned = _pruned_merged(experiment, params, final, logits, splits)
    results.update(ranks)
  else:
    results["retained_params"] = sum(int(np.size(x)) for x in jax.tree.leaves(outcome.params))
  trace = [
    {k: r[k] for k in ("step", "lambda", "active_fraction", "target_fraction") if k in r}
    for r in outcome.history
    if "lambda" in r
  ]
  if trace:
    results["sparsity_trace"] = trace  # per logged step: lambda, retained fraction (and the budget's target)
    results["lambda_final"] = trace[-1]["lambda"]
  if budget is not None:
    results["budget"] = budget
  results["skipped_steps"] = outcome.skipped_steps
  results["config"] = to_dict(config)
  print("final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
  if experiment.sora is not None:
    print(
      f"pruned+merged equals unpruned: metrics {results['pruned_merged']['metrics_equal']}, "
      f"max |logit diff| {results['pruned_merged']['max_abs_logit_diff']:.2e}"
    )
  if write and jax.process_index() == 0 and experiment.sora is not None and config.export_peft:
    results["peft"] = _export_peft(experiment, pruned, outcome.output_dir)
  if write and jax.process_index() == 0:
    write_json(os.path.join(outcome.output_dir, "results.json"), results)
  return results


def _meet_budget(experiment: Experiment, trainable) -> tuple[Any, Optional[dict]]:
  """Budget mode: `trainable` with the smallest-|gate| ranks above the budget cut (`sora_jax.cut_to_budget`), and
  the record for results.json; otherwise `trainable` unchanged and None."""
  budget = budget_params(experiment)
  if budget is None:
    return trainable, None
  from sora_jax.budget import cut_to_budget

  cut_params, cut = cut_to_budget(gather(trainable), budget)
  trainable = jax.device_put(cut_params, shd.named(experiment.trainable_specs, experiment.mesh))
  record = {
    "target_params": cut.budget_params,
    "target_fraction": cut.budget_params / cut.max_params,
    "max_params": cut.max_params,
    "retained_before_cut": cut.retained_before,
    "retained_params": cut.retained_after,
    "cut_ranks": cut.cut_ranks,
    "within_2_percent": cut.retained_after <= cut.budget_params
    and cut.budget_params - cut.retained_after <= 0.02 * cut.max_params,
  }
  print(
    f"budget {cut.budget_params} of {cut.max_params} adapter params: {cut.retained_before} retained at the "
    f"end of training, {cut.cut_ranks} ranks of smallest |gate| cut, {cut.retained_after} kept"
  )
  if not record["within_2_percent"]:
    print(
      f"WARNING: {cut.retained_after} retained adapter params is more than 2% of {cut.max_params} below the "
      f"budget {cut.budget_params}: the L1 step zeroed more ranks than the budget cuts (lower "
      "adapter.sparse_lambda), or one rank holds more than 2% of the parameters (raise adapter.rank)"
    )
  return trainable, record


def _export_peft(experiment: Experiment, pruned, output_dir: str) -> dict:
  """Writes the pruned adapters and the head as a PEFT LoRA adapter (per-module ranks) to <output_dir>/peft."""
  from sora_jax.models import EncoderNaming
  from sora_jax.peft import save_peft

  config = experiment.config
  if config.adapter.train_layernorm:
    print("WARNING: the trained LayerNorms are not part of the PEFT export (adapters and head only)")
  directory = os.path.join(output_dir, "peft")
  base = HUB_NAMES.get(config.model.name.lower(), config.model.name)
  ranks = save_peft(
    directory, pruned, experiment.sora, naming=EncoderNaming(experiment.model_config), base_model_name_or_path=base
  )
  print(
    f"PEFT LoRA adapter ({len(ranks)} modules, ranks {min(ranks.values(), default=0)}-"
    f"{max(ranks.values(), default=0)}) written to {directory}"
  )
  return {"directory": directory, "ranks": ranks}


def restore_best(experiment: Experiment, outcome: FitOutcome) -> FitOutcome:
  """`outcome` with the trainable params of its best evaluation, read back from the kept-best checkpoint; unchanged
  when the best evaluation was the last step's (or there was none)."""
  best_step = outcome.best.get("step")
  if best_step is None or best_step == outcome.step:
    return outcome
  checkpoints = Checkpoints(os.path.join(outcome.output_dir, "checkpoints"), experiment.config.train.keep_checkpoints)
  try:
    params, meta = checkpoints.restore_best(outcome.params)
  finally:
    checkpoints.close()
  if int(meta["step"]) != best_step:
    raise RuntimeError(
      f"the kept-best checkpoint in {outcome.output_dir}/checkpoints/best is from step "
      f"{meta['step']}, but the run's best evaluation was at step {best_step}; rerun, or set "
      "final_params=last to use the final step's parameters"
    )
  print(
    f"final evaluation with the parameters of step {best_step}, the best {score_key(experiment)} "
    f"({outcome.best['score']:.4f}); final_params=last uses those of step {outcome.step}"
  )
  return dataclasses.replace(outcome, params=params, params_step=best_step)
