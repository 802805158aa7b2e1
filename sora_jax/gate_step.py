"""The gate's own update, and the gate selection shared by SoRA's Optax transforms.

SoRA selects ranks with an L1 penalty on the gates g. The proximal-gradient step on the raw gradient,

  g <- S_tau(g - (eta_t / rms_t) dL/dg),   S_tau(z) = sign(z) * max(|z| - tau, 0),   tau = eta_t * lam_t,
  rms_t^2 = EMA (decay 0.999, bias-corrected) of the mean of (dL/dg)^2 over every gate entry of the model,

stops exactly where |dL/dg| <= lam * rms: a gate is zero unless its loss gradient outweighs lambda times the typical
gate gradient (the lasso's optimality condition in a metric that is one number for all gates), so the ranks kept are
the ones the loss pays for, and lambda means the same on any loss scale. An optimizer that normalises each coordinate
(Adam) gives a tiny but consistent gradient the same step as a large one; after it the threshold compares the sign
consistency of the gradient to lambda, not its size. Dividing by one number for all gates keeps their relative sizes.

`own_gates` builds the transform that feeds the gates their raw gradient: the user's optimizer updates every other
leaf (it never sees the gates: no moments, no weight decay on them), and the gate step (`sora_proximal`'s or
`sora_budget`'s thresholding) receives u = -(eta_t / rms_t) dL/dg.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sora_jax import leaves
from sora_jax.leaves import is_variable

PyTree = Any
GateMask = PyTree | Callable[[PyTree], PyTree] | None
NO_PARAMS = "needs params: call update(updates, state, params)"
_NU_DECAY = 0.999  # Adam's beta2


class OwnedGatesState(NamedTuple):
  """State of a SoRA transform that owns the gates' update.

  count: steps taken (eta_t is read at it).
  optimizer: the state of the user's optimizer over the non-gate leaves.
  gate_step: the state of the gate step (`SoraProximalState` or `SoraBudgetState`).
  """

  count: jax.Array
  optimizer: optax.OptState
  gate_step: optax.OptState
  nu: jax.Array  # EMA of the mean squared gate gradient (one number over every gate entry)


def soft_threshold(z: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """S_tau(z) = sign(z) * max(|z| - tau, 0), with exact zeros (+0.0) where |z| <= tau; NaN stays NaN (a diverged
  gate must not look like a pruned one). `threshold` is a scalar or broadcasts against z."""
  threshold = jnp.asarray(threshold, z.dtype)
  return jnp.where(jnp.abs(z) <= threshold, jnp.zeros_like(z), z - jnp.sign(z) * threshold)


def schedule_value(v: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
  """The value of a float or an Optax schedule at step `count`."""
  return v(count) if callable(v) else jnp.asarray(v)


def check_nonnegative(name: str, value: Any, transform: str) -> None:
  """Raises one ValueError when a concrete `value` is negative or not finite (schedules and traced values pass)."""
  if value is None or callable(value) or isinstance(value, jax.core.Tracer):
    return
  try:
    number = float(value)
  except (TypeError, ValueError):
    return
  if not math.isfinite(number) or number < 0:
    raise ValueError(f"{transform}: {name} must be a finite number >= 0 (or an optax schedule), got {value!r}")


def gate_tree(params: PyTree, mask: GateMask) -> PyTree:
  """The bool gate tree of a gate step's `mask` argument: the given tree, `mask(params)`, or (None)
  `sora_jax.gate_mask(params)`."""
  if mask is None:
    return leaves.gate_mask(params)
  return mask(params) if callable(mask) else mask


def gate_flags(params: PyTree, mask: GateMask = None) -> tuple[Any, list[bool]]:
  """(treedef, flags): `params`' structure with each `nnx.Variable` one leaf, and one bool per such leaf (in the order
  of `treedef.flatten_up_to(params)`), True at gates. The mask tree may hold bools bare or in Variables."""
  treedef = jax.tree.structure(params, is_leaf=is_variable)
  return treedef, [bool(leaves.value(m)) for m in treedef.flatten_up_to(gate_tree(params, mask))]


def resolve_gates(params: PyTree, mask: GateMask, name: str) -> tuple[Any, list[bool]]:
  """`gate_flags` of a gate step; with `mask=None`, finding no gate in `params` is an error."""
  treedef, flags = gate_flags(params, mask)
  if mask is None and not any(flags):
    raise ValueError(
      f"{name} found no gate in params (no leaf named 'sora_gate' or '<weight>_lora_gate', no "
      "sora_jax.SoraGate): was the model adapted (sora_jax.init / sora_jax.apply_sora), and are the gates "
      "among the optimised params (e.g. nnx.Optimizer(..., wrt=nnx.LoRAParam))? Or pass mask=..."
    )
  return treedef, flags


def own_gates(
  gate_step: optax.GradientTransformationExtraArgs,
  optimizer: optax.GradientTransformation,
  learning_rate: optax.ScalarOrSchedule | None,
  mask: GateMask,
  name: str,
) -> optax.GradientTransformationExtraArgs:
  """`optimizer` on every leaf but the gates, and `gate_step` on the gates' raw-gradient step.

  Args:
    gate_step: a transformation that maps the gates' update u to the thresholded one (`sora_proximal` or
      `sora_budget` without `optimizer`).
    optimizer: the optimizer of the other leaves (A, B, a head), e.g. `optax.adamw(lr)`; it never sees the gates.
    learning_rate: the gates' eta_t: u = -(eta_t / rms_t) dL/dg.
    mask: which leaves are gates, as in `sora_proximal`.
    name: the caller's name, for error messages.

  Returns:
    A transformation with state `OwnedGatesState`.

  Raises:
    ValueError: `learning_rate` is None.
  """
  if learning_rate is None:
    raise ValueError(
      f"{name}(optimizer=...) needs learning_rate=, the gates' step size eta "
      "(g <- S_{eta lam}(g - eta dL/dg / rms)), e.g. the optimizer's own learning rate"
    )

  others = optax.masked(optimizer, lambda tree: leaves.complement(gate_tree(tree, mask)))

  def init_fn(params):
    return OwnedGatesState(
      jnp.zeros([], jnp.int32), others.init(params), gate_step.init(params), jnp.zeros([], jnp.float32)
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} {NO_PARAMS}")
    treedef, gates = resolve_gates(params, mask, name)
    # optax.masked leaves the gates' entries as they came in: the raw gradient.
    updates, optimizer_state = others.update(updates, state.optimizer, params, **extra_args)
    flat_updates = treedef.flatten_up_to(updates)
    grads = [
      leaves.value(u).astype(jnp.float32) for is_gate, u in zip(gates, flat_updates) if is_gate and u is not None
    ]
    mean_square = sum(jnp.sum(g * g) for g in grads) / max(sum(g.size for g in grads), 1)
    count = optax.safe_increment(state.count)
    nu = _NU_DECAY * state.nu + (1 - _NU_DECAY) * mean_square
    nu_hat = nu / (1 - _NU_DECAY ** count.astype(jnp.float32))
    eta = schedule_value(learning_rate, state.count)
    inverse_rms = jax.lax.rsqrt(nu_hat + 1e-30)

    def descend(is_gate, u):
      if not is_gate or u is None:
        return u
      # (u / rms) first: a zero gradient (every gate's at step 1, where B = 0) stays an exact zero step for any eta,
      # where eta / rms could overflow to inf and make inf * 0 = NaN.
      value = leaves.value(u)
      return leaves.rewrap(u, (-eta * (value * inverse_rms)).astype(value.dtype))

    updates = treedef.unflatten([descend(is_gate, u) for is_gate, u in zip(gates, flat_updates)])
    updates, gate_state = gate_step.update(updates, state.gate_step, params)
    return updates, OwnedGatesState(count, optimizer_state, gate_state, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
