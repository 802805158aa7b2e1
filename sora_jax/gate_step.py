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
from flax import nnx

from sora_jax import leaves

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


def is_variable(x: Any) -> bool:
  """True for an `nnx.Variable`, which the gate functions treat as one leaf."""
  return isinstance(x, nnx.Variable)


def key_name(key: Any) -> Any:
  """The plain name of a pytree path key (DictKey, GetAttrKey, SequenceKey or a bare key)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def gate_leaves(params: PyTree) -> PyTree:
  """Bool tree like `params` (an `nnx.Variable` counts as one leaf), True at gates: leaves named `sora_gate` or
  `<w>_lora_gate`, or of NNX type `SoraGate`."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_variable)
  return jax.tree_util.tree_unflatten(
    treedef, [leaves.is_gate(tuple(key_name(k) for k in path), leaf) for path, leaf in flat]
  )


def resolve_gates(params: PyTree, mask: GateMask, name: str) -> PyTree:
  """The bool gate tree of a gate step's `mask` argument: the given tree, `mask(params)`, or (None) every gate leaf
  of `params`, where finding none is an error."""
  if mask is not None:
    return mask(params) if callable(mask) else mask
  gates = gate_leaves(params)
  if not any(jax.tree.leaves(gates)):
    raise ValueError(
      f"{name} found no gate in params (no leaf named 'sora_gate' or '<weight>_lora_gate', no "
      "sora_jax.SoraGate): was the model adapted (sora_jax.init / sora_jax.apply_sora), and are the gates "
      "among the optimised params (e.g. nnx.Optimizer(..., wrt=nnx.LoRAParam))? Or pass mask=..."
    )
  return gates


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

  def gates_of(tree):
    return resolve_gates(tree, mask, name)

  not_gate = lambda tree: jax.tree.map(lambda g: not g, gates_of(tree))  # noqa: E731
  others = optax.masked(optimizer, not_gate)

  def init_fn(params):
    return OwnedGatesState(
      jnp.zeros([], jnp.int32), others.init(params), gate_step.init(params), jnp.zeros([], jnp.float32)
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(f"{name} {NO_PARAMS}")
    gates = gates_of(params)
    # optax.masked leaves the gates' entries as they came in: the raw gradient.
    updates, optimizer_state = others.update(updates, state.optimizer, params, **extra_args)
    is_leaf = lambda x: x is None or is_variable(x)  # noqa: E731
    grads = [
      leaves.value(u).astype(jnp.float32)
      for is_gate, u in zip(jax.tree.leaves(gates), jax.tree.leaves(updates, is_leaf=is_leaf))
      if is_gate and u is not None
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

    updates = jax.tree.map(descend, gates, updates, is_leaf=is_leaf)
    updates, gate_state = gate_step.update(updates, state.gate_step, params)
    return updates, OwnedGatesState(count, optimizer_state, gate_state, nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
