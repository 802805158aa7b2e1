"""Evaluation: the model's logits on a batch (through SoRA's factored forward or on merged weights), a split's
predictions and its task metrics.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np

from sora_jax import sharding as shd
from train import data as data_lib
from train import metrics as metrics_lib
from train.build import Experiment


def logits_fn(
  experiment: Experiment, params, batch, *, adapted: bool, deterministic: bool = True, rng: Optional[jax.Array] = None
):
  """Model logits (batch, num_labels) for a full param tree; `adapted`: through SoRA's factored forward."""
  apply = functools.partial(
    experiment.model.apply,
    {"params": params},
    batch["input_ids"],
    batch["attention_mask"],
    batch["token_type_ids"],
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
  )
  if adapted and experiment.sora is not None:
    from sora_jax.forward import factored

    with factored(experiment.sora, deterministic=deterministic):
      return apply()
  return apply()


def _predict_fn(experiment: Experiment, adapted: bool):
  if adapted not in experiment.jitted:
    experiment.jitted[adapted] = jax.jit(
      lambda params, batch: logits_fn(experiment, params, batch, adapted=adapted),
      out_shardings=shd.replicated(experiment.mesh),
    )
  return experiment.jitted[adapted]


def predict(experiment: Experiment, params, split: str, *, adapted: bool = True) -> np.ndarray:
  """Logits (n, num_labels) of a full param tree on one split."""
  fn = _predict_fn(experiment, adapted)
  out = []
  data = experiment.splits[split]
  for batch, valid in data_lib.eval_batches(data, experiment.config.data, experiment.config.train.eval_batch_size):
    batch = shd.put_batch({k: v for k, v in batch.items() if k != "labels"}, experiment.mesh)
    out.append(np.asarray(fn(params, batch))[:valid])
  return np.concatenate(out)


def evaluate(experiment: Experiment, params, splits=None, *, adapted: bool = True, return_logits: bool = False):
  """{"<split>/<metric>": value} for a full param tree (and the logits per split when asked)."""
  splits = experiment.eval_splits if splits is None else splits
  results, all_logits = {}, {}
  for split in splits:
    logits = predict(experiment, params, split, adapted=adapted)
    preds = metrics_lib.predictions(logits, experiment.spec.regression)
    labels = experiment.splits[split].labels
    for name, value in metrics_lib.compute(experiment.spec.name, preds, labels, experiment.spec.regression).items():
      results[f"{split}/{name}"] = value
    all_logits[split] = logits
  return (results, all_logits) if return_logits else results


def score_key(experiment: Experiment) -> str:
  return f"{experiment.eval_splits[0]}/{experiment.spec.main_metric}"
