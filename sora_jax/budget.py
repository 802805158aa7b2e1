"""Budget mode: steer SoRA's proximal threshold so the retained adapter parameters land on a target.

SoRA's retained fraction is a side effect of lambda, the learning rate and the number of steps. `sora_budget` turns it
into the thing the user states. It is `sora_proximal` with lambda held in its state and moved by a controller that
reads the gates after every step, over a run of T steps:

  retained fraction  f_t = sum_g cost_g [g != 0] / sum_g cost_g     cost_g = (|A| + |B|) / |gate| of g's module,
                                                                     i.e. fan_in + fan_out, the parameters of a rank
  target             f*_t = 1 before `start * T`, then f* + (1 - f*) (1 - u)^3 with u going 0 -> 1 until `reach * T`
                     (the cubic budget schedule of AdaLoRA, Zhang et al. 2023), then f*
  descent            g <- S_tau(g + u),  tau = eta_t * lambda_t   (as `sora_proximal`), and
                     log lambda_{t+1} = clip(log lambda_t + gain * (f_t - f*_t), log lambda_min, log lambda_max)
  at `reach * T`     the gates are ranked by |g + u| (before the threshold) and the largest kept while their ranks fit
                     in the budget f* sum_g cost_g; the others become 0
  hold               g <- g + u for kept gates, 0 for the others: lambda is held and nothing more is switched off

The controller is integral in log lambda: while more parameters are active than the schedule allows, lambda grows
geometrically, and it shrinks while fewer are. During the descent a rank cut early can come back (its gate's AdamW
step can carry it over the threshold again), which is SoRA's own behaviour, and gates near zero flicker on and off, so
f_t follows the schedule within a few percent; it is the threshold that decides which ranks are small by the time the
budget is reached. Ranking by |g + u| at that step counts a flickering gate by the size it would have had, so the kept
ranks fill the budget to within one rank even when f_t dips below f* at that moment. The remaining steps train the
kept ranks, at the budget, without sparsity pressure.

`cut_to_budget` (host, after training) zeroes the gates of smallest |g| until the retained parameters are at or below
a budget: a no-op after `sora_budget`, and the tool to put any SoRA (or LoRA) adapter on a budget after the fact.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sora_jax import leaves
from sora_jax.optim import _gate_leaves, _is_variable, _key_name, _resolve_gates, _value, soft_threshold

PyTree = Any


class SoraBudgetState(NamedTuple):
  """State of `sora_budget`.

  count: steps taken.
  lam: lambda of the next step (the controller's output).
  active_fraction: retained fraction f_t of the adapter parameters after the last step.
  target_fraction: the scheduled target f*_t of the last step.
  """
  count: jax.Array
  lam: jax.Array
  active_fraction: jax.Array
  target_fraction: jax.Array


def budget_schedule(target_fraction: float | jax.Array, total_steps: int | jax.Array, *, start: float = 0.1,
                    reach: float = 0.7) -> optax.Schedule:
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


def budget_phases(total_steps: int | jax.Array, start: float = 0.1, reach: float = 0.7
                  ) -> tuple[jax.Array, jax.Array]:
  """(step where the schedule starts to fall, step count at which `sora_budget` cuts to the budget), float32.

  The cut comes at `ceil(reach * total_steps)`, at least one step after the start; the update at that count is the
  cut, so the params after `cut + 1` steps are on budget.
  """
  total = jnp.asarray(total_steps, jnp.float32)
  t0 = start * total
  return t0, jnp.maximum(jnp.ceil(reach * total), jnp.floor(t0) + 1.0)


def _rank_costs(params: PyTree, gates: PyTree) -> PyTree:
  """Per gate leaf the parameters of one of its ranks, (|A| + |B|) / |gate| (a Python float; None elsewhere)."""
  flat, _ = leaves.flatten(params)
  by_gate = {rec.gate: rec for rec in leaves.find_adapters(flat)}
  paths = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
  costs = []
  for (path, leaf), is_gate in zip(paths, jax.tree.leaves(gates)):
    if not is_gate:
      costs.append(None)
      continue
    key = tuple(_key_name(k) for k in path)
    rec = by_gate.get(key)
    if rec is None or rec.a not in flat or rec.b not in flat:
      raise ValueError(f"gate {leaves.path_str(key)} has no A and B beside it among the params the optimizer "
                       "sees; sora_budget counts a rank's parameters from their shapes, so optimise A, B and the "
                       "gate together")
    size = np.size(leaves.value(leaf))
    costs.append((np.size(leaves.value(flat[rec.a])) + np.size(leaves.value(flat[rec.b]))) / max(size, 1))
  return costs


def retained_fraction(params: PyTree, mask: PyTree | None = None) -> jax.Array:
  """Fraction of the adapter parameters whose gate is nonzero: sum_g cost_g [g != 0] / sum_g cost_g.

  Works inside `jax.jit`; the costs come from the shapes of A and B. Equals `rank_report(...).fraction` of the
  unpruned params (gates and B rows nonzero).
  """
  gates = _gate_leaves(params) if mask is None else mask
  costs = _rank_costs(params, gates)
  found = [(leaves.value(leaf), cost) for leaf, cost in zip(jax.tree.leaves(params, is_leaf=_is_variable), costs)
           if cost is not None]
  return _active_fraction([g for g, _ in found], [c for _, c in found])


def _active_fraction(gates: list[jax.Array], costs: list[float]) -> jax.Array:
  """sum_g cost_g [g != 0] / sum_g cost_g over the entries of `gates` (each leaf's entries cost its `costs` item)."""
  active = sum((c * jnp.sum(g != 0).astype(jnp.float32) for g, c in zip(gates, costs)), jnp.zeros([], jnp.float32))
  return active / max(sum(c * g.size for g, c in zip(gates, costs)), 1e-30)


def sora_budget(
    target_fraction: float | jax.Array,
    total_steps: int | jax.Array,
    *,
    lam_init: float | jax.Array = 1.0,
    learning_rate: optax.ScalarOrSchedule | None = None,
    gain: float = 1.0,
    start: float = 0.1,
    reach: float = 0.7,
    lam_range: tuple[float, float] = (1e-3, 1e3),
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """SoRA's proximal gate step with lambda steered to a retained-parameter budget.

  Args:
    target_fraction: the budget f*, retained adapter parameters / parameters at full rank, in (0, 1].
    total_steps: the optimizer steps of the run; the target is reached at `reach * total_steps`.
    lam_init: lambda of the first step (> 0), e.g. the lambda of a plain SoRA run on the task.
    learning_rate: eta_t as in `sora_proximal` (tau = eta_t * lambda_t); None: tau = lambda_t.
    gain: controller gain, the change of log lambda per step per unit of fraction error.
    start, reach: as `budget_schedule`; at step `ceil(reach * total_steps)` the gates are cut to the budget, and
      the ranks kept then train without threshold for the rest of the run.
    lam_range: lambda stays within [lam_init * lo, lam_init * hi].
    mask: which leaves are gates, as in `sora_proximal`; A and B must be in params beside each gate.

  Returns:
    A transformation like `sora_proximal` whose state (`SoraBudgetState`) holds lambda, the measured retained fraction
    and the target; read them with `optax.tree_utils.tree_get(opt_state, "lam")` etc.

  Example:
    not_gate = lambda p: jax.tree.map(lambda g: not g, sora_jax.gate_mask(p))
    tx = optax.chain(optax.adamw(lr, mask=not_gate),
                     sora_jax.sora_budget(0.5, total_steps, lam_init=6.0, learning_rate=lr))
  """
  if not (isinstance(target_fraction, jax.Array) or 0 < target_fraction <= 1):
    raise ValueError(f"target_fraction must be in (0, 1], got {target_fraction}")
  if not 0 <= start < reach <= 1:
    raise ValueError(f"need 0 <= start < reach <= 1, got start={start}, reach={reach}")
  if not (isinstance(lam_init, jax.Array) or lam_init > 0):
    raise ValueError(f"lam_init must be > 0 (the controller moves log lambda), got {lam_init}")
  schedule = budget_schedule(target_fraction, total_steps, start=start, reach=reach)
  log_lo, log_hi = math.log(lam_range[0]), math.log(lam_range[1])

  def init_fn(params):
    del params
    lam = jnp.asarray(lam_init, jnp.float32)
    return SoraBudgetState(jnp.zeros([], jnp.int32), lam, jnp.ones([], jnp.float32), jnp.ones([], jnp.float32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("sora_budget needs params: call update(updates, state, params)")
    gates = _resolve_gates(params, mask, "sora_budget")
    costs = _rank_costs(params, gates)
    treedef = jax.tree.structure(params, is_leaf=_is_variable)
    flat_updates = treedef.flatten_up_to(updates)
    flat_params = jax.tree.leaves(params, is_leaf=_is_variable)
    where = [i for i, (u, cost) in enumerate(zip(flat_updates, costs)) if cost is not None and u is not None]
    old = [leaves.value(flat_params[i]) for i in where]
    moved = [p + leaves.value(flat_updates[i]).astype(p.dtype) for i, p in zip(where, old)]

    _, hold_from = budget_phases(total_steps, start, reach)
    count = state.count.astype(jnp.float32)
    tau = state.lam if learning_rate is None else state.lam * _value(learning_rate, state.count)
    descent = [soft_threshold(z, tau.astype(z.dtype)) for z in moved]
    keep = _keep_within_budget(moved, [costs[i] for i in where], target_fraction)
    cut = [jnp.where(k, z, jnp.zeros_like(z)) for k, z in zip(keep, moved)]
    held = [jnp.where(p != 0, z, jnp.zeros_like(z)) for p, z in zip(old, moved)]
    phase = jnp.where(count < hold_from, 0, jnp.where(count == hold_from, 1, 2))
    new_gates = [jax.lax.select_n(phase, d, c, h) for d, c, h in zip(descent, cut, held)]

    new_updates = list(flat_updates)
    for i, p, gate in zip(where, old, new_gates):
      new_updates[i] = leaves.rewrap(flat_updates[i], (gate - p).astype(leaves.value(flat_updates[i]).dtype))
    fraction = _active_fraction(new_gates, [costs[i] for i in where])
    target = schedule(state.count)
    log_lam = jnp.log(state.lam) + jnp.where(count < hold_from, gain * (fraction - target), 0.0)
    log_lam = jnp.clip(log_lam, jnp.log(lam_init) + log_lo, jnp.log(lam_init) + log_hi)
    new_state = SoraBudgetState(optax.safe_increment(state.count), jnp.exp(log_lam).astype(jnp.float32),
                                fraction, target)
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
    out.append(keep[offset:offset + v.size].reshape(v.shape))
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
  return int(sum(np.size(leaves.value(flat[rec.a])) + np.size(leaves.value(flat[rec.b]))
                 for rec in leaves.find_adapters(flat) if rec.gate in flat))


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
    cost = (np.size(leaves.value(flat[rec.a])) + np.size(leaves.value(flat[rec.b]))) // max(gate.size, 1)
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
  report = BudgetCut(sum(len(v) for v in cut.values()), int(before), int(retained), int(budget_params),
                     int(max_params))
  return rebuild(out), report
