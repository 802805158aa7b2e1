"""Truncate, then train: a LoRA cut to a parameter budget by singular values part-way through its run.

With `adapter.truncate_at=f` and `adapter.truncate_fraction=b` (method lora), the trainer trains LoRA at rank r for
the first `ceil(f * T)` of its T steps, then cuts the adapter to b of its parameters at rank r with
`sora_jax.truncate` (each module's best rank-k_m approximation of s B A, one global singular-value threshold), and
trains the kept factors for the remaining steps. The cut factors are written back into the rank-r leaves, padded:

  A' = [A_k, 0] (fan_in, r),  B' = [B_k; 0] (r, fan_out),  g' = [1, ..., 1, 0, ..., 0] (r)

A dropped rank has a zero column of A and a zero row of B, so both its gradients are zero (dL/dA_:,j = x^T (dy B_j,:)
and dL/dB_j,: = (x A_:,j)^T dy) and AdamW keeps it at zero; LoRA's gates are fixed, so g' = 0 marks it as cut for
the rank report. The shapes do not change, so the run keeps its compiled step. AdamW's moments and bias-correction
count restart at zero (the kept factors are a new basis, in which the old moments mean nothing); the learning-rate
schedule keeps its step.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import numpy as np
import optax

from sora_jax import adapters, leaves
from sora_jax.truncate import truncate
from train.build import Experiment
from train.config import RunConfig
from train.finish import gather

PyTree = Any


def cut_step(config: RunConfig, total_steps: int) -> Optional[int]:
  """The number of steps after which the adapter is cut (`ceil(truncate_at * total)`, at least 1); None without."""
  at = config.adapter.truncate_at
  return None if at is None else max(1, math.ceil(at * total_steps))


def _padded(old: np.ndarray, new: np.ndarray) -> np.ndarray:
  """`new` zero-padded at the end of the one axis where its shape falls short of `old`'s (a rank-0 `new` has
  zero-size factors: all zeros)."""
  out = np.zeros(np.shape(old), np.asarray(old).dtype)
  out[tuple(slice(0, n) for n in np.shape(new))] = new
  return out


def pad_to_rank(full: PyTree, cut: PyTree) -> PyTree:
  """`full`'s adapter leaves replaced by the truncated tree `cut`'s (linen layout), padded back to rank r: A and B
  with zero columns / rows, the gate one where B's row is nonzero and zero elsewhere. Other leaves are `full`'s."""
  flat, rebuild = leaves.flatten(full)
  cut_flat, _ = leaves.flatten(cut)
  out = dict(flat)
  for rec in leaves.find_adapters(flat):
    if rec.layout != "linen" or rec.gate not in flat:
      raise ValueError(f"truncate_at: {leaves.path_str(rec.module)} is not a gated linen adapter (sora_a/sora_b/gate)")
    a = _padded(np.asarray(flat[rec.a]), np.asarray(cut_flat[rec.a]))
    b = _padded(np.asarray(flat[rec.b]), np.asarray(cut_flat[rec.b]))
    gate = np.asarray(flat[rec.gate])
    rank_axis = gate.ndim - 1  # B is (*lead, r, *out): its rank axis follows the gate's leading axes
    nonzero = np.any(b != 0, axis=tuple(range(rank_axis + 1, b.ndim)))
    out[rec.a], out[rec.b], out[rec.gate] = a, b, nonzero.astype(gate.dtype)
  return rebuild(out)


def _fresh_adam(opt_state: PyTree) -> PyTree:
  """`opt_state` with every Adam state's count and moments at zero (the schedules' counts unchanged)."""

  def reset(node):
    if isinstance(node, optax.ScaleByAdamState):
      return optax.ScaleByAdamState(
        count=jax.numpy.zeros_like(node.count),
        mu=jax.tree.map(jax.numpy.zeros_like, node.mu),
        nu=jax.tree.map(jax.numpy.zeros_like, node.nu),
      )
    return node

  return jax.tree.map(reset, opt_state, is_leaf=lambda node: isinstance(node, optax.ScaleByAdamState))


def truncate_state(experiment: Experiment, state):
  """The train state with its adapter cut to `adapter.truncate_fraction` of its parameters at full rank and padded
  back to rank r (`pad_to_rank`), on the params' shardings, and AdamW restarted (`_fresh_adam`)."""
  trainable = gather(state.params)
  full = adapters.combine(trainable, gather(experiment.frozen))
  max_params = adapters.rank_report(full, experiment.sora).max_params
  budget = int(math.floor(experiment.config.adapter.truncate_fraction * max_params))
  cut, report = truncate(full, experiment.sora, budget)
  padded, _ = adapters.split(pad_to_rank(full, cut), experiment.config.adapter.trainable)
  print(
    f"truncated at step {int(state.step)}: {report.retained_params} of {max_params} adapter params kept "
    f"(budget {budget}); the kept ranks train on"
  )
  shardings = jax.tree.map(lambda x: x.sharding, state.params)
  params = jax.device_put(jax.tree.map(lambda like, x: np.asarray(x, like.dtype), trainable, padded), shardings)
  return state._replace(params=params, opt_state=_fresh_adam(state.opt_state))
