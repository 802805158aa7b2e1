"""Budget mode: SoRA's gate step held to a schedule of retained adapter parameters that ends on a target.

SoRA's retained fraction is a side effect of lambda, the learning rate and the number of steps. `sora_budget` turns it
into the thing the user states. Over a run of T steps:

  retained fraction  f_t = sum_g cost_g [g != 0] / sum_g cost_g     cost_g = (|A| + |B|) / |gate| of g's module
                                                                     (`sora_jax.rank_cost`): fan_in + fan_out
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

import fractions
import math

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sora_jax import layout
from sora_jax import leaves
from sora_jax.gate_step import (
  GateMask,
  NO_PARAMS,
  check_nonnegative,
  gate_flags,
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


def module_cost(flat: leaves.Flat, rec: leaves.AdapterPaths) -> layout.RankCost:
  """The `layout.RankCost` of a gated adapter of a flat tree, from the shapes of its A, B and gate (no base weight
  needed: the trainable half of `split`, or what `nnx.Optimizer(wrt=nnx.LoRAParam)` optimises, is enough)."""
  shape = lambda path: np.shape(leaves.value(flat[path]))  # noqa: E731
  return layout.rank_cost(shape(rec.a), shape(rec.b), shape(rec.gate)[:-1])


def _gated(flat: leaves.Flat) -> list[leaves.AdapterPaths]:
  return [rec for rec in leaves.find_adapters(flat) if rec.gate in flat]


def _rank_costs(params: PyTree, flags: list[bool]) -> list[float | None]:
  """Per leaf of `params` (an `nnx.Variable` one leaf; `flags` from `gate_flags`) the parameters of one rank of one
  entry of its gate (`RankCost.per_entry`, a Python float), None where the leaf is not a gate."""
  paths, found, _ = leaves.walk(params)
  flat = dict(zip(paths, found))
  by_gate = {rec.gate: rec for rec in leaves.find_adapters(flat)}
  costs = []
  for path, is_gate in zip(paths, flags):
    rec = by_gate.get(path) if is_gate else None
    if is_gate and (rec is None or rec.b not in flat):
      raise ValueError(
        f"gate {leaves.path_str(path)} has no A and B beside it among the params the optimizer "
        "sees; sora_budget counts a rank's parameters from their shapes, so optimise A, B and the "
        "gate together"
      )
    costs.append(module_cost(flat, rec).per_entry if is_gate else None)
  return costs


def retained_fraction(params: PyTree, mask: PyTree | None = None) -> jax.Array:
  """Fraction of the adapter parameters whose gate is nonzero: sum_g cost_g [g != 0] / sum_g cost_g, cost_g the
  parameters of one rank of g's entry (`sora_jax.rank_cost`'s per_entry).

  Any pytree of params (`sora_jax.gate_mask`'s); works inside `jax.jit`, the costs coming from the shapes of A and
  B. Equals `rank_report(...).fraction` of the unpruned params (gates and B rows nonzero).
  """
  treedef, flags = gate_flags(params, mask)
  costs = _rank_costs(params, flags)
  found = [(leaves.value(leaf), cost) for leaf, cost in zip(treedef.flatten_up_to(params), costs) if cost is not None]
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
    treedef, gates = resolve_gates(params, mask, "sora_budget")
    costs = _rank_costs(params, gates)
    flat_updates = treedef.flatten_up_to(updates)
    flat_params = treedef.flatten_up_to(params)
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
  """What `cut_to_budget` did: ranks (gate entries) zeroed, and retained parameters before and after (ints, unless a
  batched einsum's shared B leaves a fraction of a row: then exact floats)."""

  cut_ranks: int
  retained_before: int | float
  retained_after: int | float
  budget_params: int
  max_params: int


def adapter_params(params: PyTree) -> int:
  """Adapter parameters at full rank: |A| + |B| summed over the gated modules (`sora_jax.rank_cost`'s total;
  `rank_report(...).max_params` of the unpruned params)."""
  flat, _ = leaves.flatten(params)
  return int(sum(module_cost(flat, rec).total for rec in _gated(flat)))


def smallest_rank_params(params: PyTree) -> int:
  """The adapter parameters of one rank of one gate entry (`sora_jax.rank_cost`'s per_entry) of the cheapest gated
  module, rounded up: the least a budget must allow to keep any rank (0 without gated modules)."""
  flat, _ = leaves.flatten(params)
  return int(math.ceil(min((module_cost(flat, rec).per_entry for rec in _gated(flat)), default=0)))


def cut_to_budget(params: PyTree, budget_params: int) -> tuple[PyTree, BudgetCut]:
  """Zeroes the gates of smallest |g| until at most `budget_params` adapter parameters remain (host, not jitted).

  A gate entry's rank costs `sora_jax.rank_cost`'s per_entry, as in `rank_report` and `sora_budget`. Returns the
  same kind of tree and a `BudgetCut` (its counts are ints unless a batched einsum's shared B leaves a fraction of a
  row); nothing changes when the params are already within the budget.
  """
  flat, rebuild = leaves.flatten(params)
  entries, retained, max_params = [], fractions.Fraction(0), 0
  for rec in _gated(flat):
    gate = np.asarray(leaves.value(flat[rec.gate]))
    if not np.isfinite(gate).all():
      raise ValueError(f"gate {leaves.path_str(rec.gate)} is not finite; the run diverged, nothing to cut")
    cost = module_cost(flat, rec)
    per_entry = fractions.Fraction(cost.slice, max(cost.entries, 1))  # exact: a shared B's share may be a fraction
    max_params += cost.total
    for index in zip(*np.nonzero(gate)):
      entries.append((abs(float(gate[index])), rec.gate, index, per_entry))
      retained += per_entry
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
  count = lambda x: int(x) if x.denominator == 1 else float(x)  # noqa: E731
  report = BudgetCut(sum(len(v) for v in cut.values()), count(before), count(retained), int(budget_params), max_params)
  return rebuild(out), report
