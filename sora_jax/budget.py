"""Budget mode: SoRA's gate step held to a schedule of retained adapter parameters that ends on a target.

SoRA's retained fraction is a side effect of lambda, the learning rate and the number of steps. `sora_budget` turns it
into the thing the user states. Over a run of T steps:

  retained fraction  f_t = sum_g cost_g [g != 0] / sum_g cost_g     cost_g = (|A| + |B|) / |gate| of g's module,
                                                                     i.e. fan_in + fan_out, the parameters of a rank
  target             f*_t = 1 before `start * T`, then f* + (1 - f*) (1 - u)^3 with u going 0 -> 1 until `reach * T`
                     (the cubic budget schedule of AdaLoRA, Zhang et al. 2023), then f*
  descent            z = S_tau(g + u), tau = eta_t * lam (as `sora_proximal`; lam = 0 by default), then the entries
                     of z of largest |z| are kept while their ranks fit in f*_t sum_g cost_g, the others become 0
  hold (after reach) g <- g + u for kept gates, 0 for the others: the kept ranks train at the budget

The descent is a projected gradient step onto the scheduled budget (iterative hard thresholding): every step keeps
the ranks of largest gate, so f_t stays at most f*_t and within one rank of it (unless the L1 step itself zeroed more),
never depends on a controller's state, and is the same on 100 steps as on 10,000. A rank cut early comes back when
its gate's step makes it larger than a kept one. With `optimizer=` the gates' step u is -(eta_t / rms_t) dL/dg on
their raw gradient (`sora_jax.gate_step`), so after the L1 step |g| ranks by what the loss pays for each rank.

`cut_to_budget` (host, after training) zeroes the gates of smallest |g| until the retained parameters are at or below
a budget: a no-op after `sora_budget`, and the tool to put any SoRA (or LoRA) adapter on a budget after the fact.
"""

from __future__ import annotations

import math

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sora_jax import leaves
from sora_jax.gate_step import (
  GateMask,
  NO_PARAMS,
  check_nonnegative,
  gate_leaves,
  is_variable,
  key_name,
  own_gates,
  resolve_gates,
  schedule_value,
  soft_threshold,
)

PyTree = Any


class SoraBudgetState(NamedTuple):
  """State of `sora_budget`.

  count: steps taken.
  lam: the L1 strength lambda of the descent (constant).
  active_fraction: retained fraction f_t of the adapter parameters after the last step.
  target_fraction: the scheduled target f*_t of the last step.
  """

  count: jax.Array
  lam: jax.Array
  active_fraction: jax.Array
  target_fraction: jax.Array


def budget_schedule(
  target_fraction: float | jax.Array, total_steps: int | jax.Array, *, start: float = 0.1, reach: float = 0.7
) -> optax.Schedule:
  """The scheduled retained fraction f*_t: 1, then a cubic decrease to `target_fraction` at `reach * total_steps`,
  then constant.

  Args:
    target_fraction: f*, in (0, 1].
    total_steps: the steps of the run (int or array: a traced value does not recompile a jitted step).
    start, reach: fractions of `total_steps` where the decrease begins and ends, 0 <= start < reach <= 1.

  Returns:
    `count -> f*_count` (float32).
  """

  def schedule(count):
    t0, t1 = budget_phases(total_steps, start, reach)
    u = jnp.clip((jnp.asarray(count, jnp.float32) - t0) / (t1 - t0), 0.0, 1.0)
    target = jnp.asarray(target_fraction, jnp.float32)
    return target + (1.0 - target) * (1.0 - u) ** 3

  return schedule


def budget_phases(total_steps: int | jax.Array, start: float = 0.1, reach: float = 0.7) -> tuple[jax.Array, jax.Array]:
  """(step where the schedule starts to fall, step count at which `sora_budget` cuts to the budget), float32.

  The cut comes at `ceil(reach * total_steps)`, at least one step after the start; the update at that count is the
  cut, so the params after `cut + 1` steps are on budget.
  """
  total = jnp.asarray(total_steps, jnp.float32)
  t0 = start * total
  return t0, jnp.maximum(jnp.ceil(reach * total), jnp.floor(t0) + 1.0)


def rank_params(a_size: int, b_size: int, gate_size: int) -> float:
  """The adapter parameters of one rank of one gate entry, (|A| + |B|) / |gate|: fan_in + fan_out of its module (of
  one layer when stacked). The one cost of a rank that `sora_budget`, `cut_to_budget` and `sora_jax.truncate` count."""
  return (a_size + b_size) / max(gate_size, 1)


def _rank_costs(params: PyTree, gates: PyTree) -> PyTree:
  """Per gate leaf the parameters of one of its ranks, (|A| + |B|) / |gate| (a Python float; None elsewhere)."""
  flat, _ = leaves.flatten(params)
  by_gate = {rec.gate: rec for rec in leaves.find_adapters(flat)}
  paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)[0]
  costs = []
  for (path, leaf), is_gate in zip(paths, jax.tree.leaves(gates)):
    if not is_gate:
      costs.append(None)
      continue
    key = tuple(key_name(k) for k in path)
    rec = by_gate.get(key)
    if rec is None or rec.a not in flat or rec.b not in flat:
      raise ValueError(
        f"gate {leaves.path_str(key)} has no A and B beside it among the params the optimizer "
        "sees; sora_budget counts a rank's parameters from their shapes, so optimise A, B and the "
        "gate together"
      )
    costs.append(
      rank_params(np.size(leaves.value(flat[rec.a])), np.size(leaves.value(flat[rec.b])), np.size(leaves.value(leaf)))
    )
  return costs


def retained_fraction(params: PyTree, mask: PyTree | None = None) -> jax.Array:
  """Fraction of the adapter parameters whose gate is nonzero: sum_g cost_g [g != 0] / sum_g cost_g.

  Works inside `jax.jit`; the costs come from the shapes of A and B. Equals `rank_report(...).fraction` of the
  unpruned params (gates and B rows nonzero).
  """
  gates = gate_leaves(params) if mask is None else mask
  costs = _rank_costs(params, gates)
  found = [
    (leaves.value(leaf), cost)
    for leaf, cost in zip(jax.tree.leaves(params, is_leaf=is_variable), costs)
    if cost is not None
  ]
  return _active_fraction([g for g, _ in found], [c for _, c in found])


def _active_fraction(gates: list[jax.Array], costs: list[float]) -> jax.Array:
  """sum_g cost_g [g != 0] / sum_g cost_g over the entries of `gates` (each leaf's entries cost its `costs` item)."""
  active = sum((c * jnp.sum(g != 0).astype(jnp.float32) for g, c in zip(gates, costs)), jnp.zeros([], jnp.float32))
  return active / max(sum(c * g.size for g, c in zip(gates, costs)), 1e-30)


def sora_budget(
  target_fraction: float | jax.Array,
  total_steps: int | jax.Array,
  *,
  lam_init: optax.ScalarOrSchedule = 1.0,
  learning_rate: optax.ScalarOrSchedule | None = None,
  start: float = 0.1,
  reach: float = 0.7,
  mask: GateMask = None,
  optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SoRA's gate step held to a retained-parameter schedule that ends on a budget.

  The recipe (gates on their raw gradient, `optimizer` on the rest, as `sora_proximal`):

    tx = sora_jax.sora_budget(0.25, total_steps, learning_rate=gate_lr, optimizer=optax.adamw(lr))

  Args:
    target_fraction: the budget f*, retained adapter parameters / parameters at full rank, in (0, 1].
    total_steps: the optimizer steps of the run; the target is reached at `reach * total_steps`.
    lam_init: lambda >= 0 (float or schedule) of the L1 step before the selection (tau = eta_t * lambda, as
      `sora_proximal`, in the same units: relative to the gate-gradient RMS with `optimizer`). The L1 step makes |g|
      rank the ranks by use: with 0 the gates that never moved from their init outrank the ones the loss uses.
    learning_rate: eta_t >= 0, as in `sora_proximal`: the gates' step size with `optimizer` (required there);
      without it the preceding optimizer's learning rate, or None.
    start, reach: as `budget_schedule`; from step `ceil(reach * total_steps)` the kept ranks train without
      selection for the rest of the run.
    mask: which leaves are gates, as in `sora_proximal`; A and B must be in params beside each gate.
    optimizer: as in `sora_proximal`: given, the transform owns the gates' update and `optimizer` updates the rest;
      None, the transform acts on the update a preceding transform made (chain form, e.g. AdamW's on the gates).

  Returns:
    A transformation like `sora_proximal` whose state (`SoraBudgetState`) holds lambda, the measured retained fraction
    and the target; read them with `optax.tree_utils.tree_get(opt_state, "active_fraction")` etc.
  """
  if not (isinstance(target_fraction, jax.Array) or 0 < target_fraction <= 1):
    raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
  if not 0 <= start < reach <= 1:
    raise ValueError(f"need 0 <= start < reach <= 1, got start={start}, reach={reach}")
  check_nonnegative("lam_init", lam_init, "sora_budget")
  check_nonnegative("learning_rate", learning_rate, "sora_budget")
  if optimizer is not None:
    step = sora_budget(
      target_fraction, total_steps, lam_init=lam_init, learning_rate=learning_rate, start=start, reach=reach, mask=mask
    )
    return own_gates(step, optimizer, learning_rate, mask, "sora_budget")
  schedule = budget_schedule(target_fraction, total_steps, start=start, reach=reach)

  def init_fn(params):
    del params
    lam = jnp.asarray(schedule_value(lam_init, jnp.zeros([], jnp.int32)), jnp.float32)
    return SoraBudgetState(jnp.zeros([], jnp.int32), lam, jnp.ones([], jnp.float32), jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"sora_budget {NO_PARAMS}")
    gates = resolve_gates(params, mask, "sora_budget")
    costs = _rank_costs(params, gates)
    treedef = jax.tree.structure(params, is_leaf=is_variable)
    flat_updates = treedef.flatten_up_to(updates)
    flat_params = jax.tree.leaves(params, is_leaf=is_variable)
    where = [i for i, (u, cost) in enumerate(zip(flat_updates, costs)) if cost is not None and u is not None]
    where_costs = [costs[i] for i in where]
    old = [leaves.value(flat_params[i]) for i in where]
    moved = [p + leaves.value(flat_updates[i]).astype(p.dtype) for i, p in zip(where, old)]

    _, hold_from = budget_phases(total_steps, start, reach)
    count = state.count.astype(jnp.float32)
    lam = jnp.asarray(schedule_value(lam_init, state.count), jnp.float32)
    tau = lam if learning_rate is None else lam * schedule_value(learning_rate, state.count)
    target = schedule(state.count)
    shrunk = [soft_threshold(z, tau.astype(z.dtype)) for z in moved]
    keep = _keep_within_budget(shrunk, where_costs, target)
    descent = [jnp.where(k, z, jnp.zeros_like(z)) for k, z in zip(keep, shrunk)]
    held = [jnp.where(p != 0, z, jnp.zeros_like(z)) for p, z in zip(old, moved)]
    new_gates = [jnp.where(count <= hold_from, d, h) for d, h in zip(descent, held)]

    new_updates = list(flat_updates)
    for i, p, gate in zip(where, old, new_gates):
      new_updates[i] = leaves.rewrap(flat_updates[i], (gate - p).astype(leaves.value(flat_updates[i]).dtype))
    fraction = _active_fraction(new_gates, where_costs)
    new_state = SoraBudgetState(optax.safe_increment(state.count), lam, fraction, target)
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _keep_within_budget(values: list[jax.Array], costs: list[float], target_fraction) -> list[jax.Array]:
  """Bool arrays like `values`: the entries of largest |value| whose costs sum to at most target * total cost
  (zeros are never kept)."""
  magnitude = jnp.concatenate([jnp.abs(v).ravel().astype(jnp.float32) for v in values])
  cost = jnp.concatenate([jnp.full(v.size, c, jnp.float32) for v, c in zip(values, costs)])
  budget = jnp.asarray(target_fraction, jnp.float32) * jnp.sum(cost) + 0.5  # params are whole numbers
  order = jnp.argsort(-magnitude, stable=True)
  fits = jnp.cumsum(cost[order]) <= budget
  keep = jnp.zeros(magnitude.shape, bool).at[order].set(fits) & (magnitude > 0)
  out, offset = [], 0
  for v in values:
    out.append(keep[offset : offset + v.size].reshape(v.shape))
    offset += v.size
  return out


@dataclasses.dataclass(frozen=True)
class BudgetCut:
  """What `cut_to_budget` did: ranks (gate entries) zeroed, and retained parameters before and after."""

  cut_ranks: int
  retained_before: int
  retained_after: int
  budget_params: int
  max_params: int


def adapter_params(params: PyTree) -> int:
  """Adapter parameters at full rank: |A| + |B| summed over the gated modules (`rank_report(...).max_params` of the
  unpruned params)."""
  flat, _ = leaves.flatten(params)
  return int(
    sum(
      np.size(leaves.value(flat[rec.a])) + np.size(leaves.value(flat[rec.b]))
      for rec in leaves.find_adapters(flat)
      if rec.gate in flat
    )
  )


def smallest_rank_params(params: PyTree) -> int:
  """The adapter parameters of one rank (`rank_params`) of the smallest gated module: the least a budget must allow
  to keep any rank (0 without gated modules)."""
  flat, _ = leaves.flatten(params)
  costs = [
    rank_params(
      np.size(leaves.value(flat[rec.a])), np.size(leaves.value(flat[rec.b])), np.size(leaves.value(flat[rec.gate]))
    )
    for rec in leaves.find_adapters(flat)
    if rec.gate in flat
  ]
  return int(math.ceil(min(costs, default=0)))


def cut_to_budget(params: PyTree, budget_params: int) -> tuple[PyTree, BudgetCut]:
  """Zeroes the gates of smallest |g| until at most `budget_params` adapter parameters remain (host, not jitted).

  A rank's parameters are fan_in + fan_out of its module ((|A| + |B|) / |gate|), as in `rank_report`. Returns the
  same kind of tree and a `BudgetCut`; nothing changes when the params are already within the budget.
  """
  flat, rebuild = leaves.flatten(params)
  entries, retained, max_params = [], 0, 0
  for rec in leaves.find_adapters(flat):
    if rec.gate not in flat:
      continue
    gate = np.asarray(leaves.value(flat[rec.gate]))
    if not np.isfinite(gate).all():
      raise ValueError(f"gate {leaves.path_str(rec.gate)} is not finite; the run diverged, nothing to cut")
    cost = int(rank_params(np.size(leaves.value(flat[rec.a])), np.size(leaves.value(flat[rec.b])), gate.size))
    max_params += cost * gate.size
    for index in zip(*np.nonzero(gate)):
      entries.append((abs(float(gate[index])), rec.gate, index, cost))
      retained += cost
  before, cut = retained, {}
  for magnitude, path, index, cost in sorted(entries, key=lambda e: e[0]):
    if retained <= budget_params:
      break
    cut.setdefault(path, []).append(index)
    retained -= cost
  out = dict(flat)
  for path, indices in cut.items():
    gate = np.array(leaves.value(flat[path]))
    for index in indices:
      gate[index] = 0
    out[path] = leaves.rewrap(flat[path], jnp.asarray(gate, leaves.value(flat[path]).dtype))
  report = BudgetCut(sum(len(v) for v in cut.values()), int(before), int(retained), int(budget_params), int(max_params))
  return rebuild(out), report
