"""The truncation baseline of `train.pareto`: a trained adapter cut by singular values to parameter budgets, evaluated.

A LoRA (or SoRA) trained at rank r_max is cut to each budget with `sora_jax.truncate` (each module's best rank-k
approximation of s * B diag(g) A, one global singular-value threshold), merged into the base weights and evaluated
on the run's validation and test splits. No step is trained after the cut: this is the free conversion a PyTorch PEFT
user has for any trained LoRA, the baseline a learned allocation must beat.
"""

from __future__ import annotations

from typing import Sequence

import jax

from sora_jax import adapters
from sora_jax import sharding as shd
from sora_jax.truncate import truncate
from train.evaluate import evaluate
from train.finish import gather


def evaluate_truncations(experiment, trainable, fractions: Sequence[float]) -> dict:
  """{f"{fraction:g}": {"budget_params", "retained_params", "max_params", "ranks", "metrics"}} for each fraction of the
  adapter's parameters at its full rank; `trainable`: the run's trainable params (any sharding)."""
  full = adapters.combine(gather(trainable), gather(experiment.frozen))
  max_params = adapters.rank_report(full, experiment.sora).max_params
  splits = experiment.eval_splits + experiment.test_splits
  out = {}
  for fraction in fractions:
    budget = int(fraction * max_params)
    cut, report = truncate(full, experiment.sora, budget)
    merged = adapters.merge(cut, experiment.sora)
    config = experiment.config
    merged = jax.device_put(
      merged, shd.named(shd.param_specs(merged, experiment.mesh, config.mesh.fsdp_min_size), experiment.mesh)
    )
    metrics = evaluate(experiment, merged, splits, adapted=False)
    out[f"{fraction:g}"] = {
      "budget_params": budget,
      "retained_params": int(report.retained_params),
      "max_params": int(max_params),
      "ranks": {str(k): int(v) for k, v in dict(report.ranks).items()},
      "metrics": metrics,
    }
    print(f"truncated to {report.retained_params} of {max_params} adapter params: " + _metrics_line(metrics))
  return out


def _metrics_line(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
