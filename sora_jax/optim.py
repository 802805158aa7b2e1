"""Proximal gate step for SoRA as an Optax transformation.

The gate g of each SoRA module is updated with a proximal step for the L1 penalty lam * ||g||_1
(Ding et al. 2023, eq. 6):

  g <- S_tau(g + u),   S_tau(z) = sign(z) * max(|z| - tau, 0),   tau = eta_t * lam_t

where u is the incoming update (e.g. AdamW's) and eta_t the learning rate. As an update this is
`S_tau(p + u) - p`, so that `optax.apply_updates` lands on the thresholded value.

The official code (`SparseAdamW.step`) uses tau = lam unscaled by the learning rate, and applies three sequential
masked writes; the third also zeroes values that the first two moved into (0, tau). Ours is the exact operator.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax._src import base as optax_base

from sora_jax.adapters import GATE

PyTree = Any
ScalarOrSchedule = float | jax.Array | optax.Schedule


class SoraProximalState(NamedTuple):
  """State of `sora_proximal`: the number of steps taken."""
  count: jax.Array


def soft_threshold(z: jax.Array, threshold: jax.Array | float) -> jax.Array:
  """S_tau(z) = sign(z) * max(|z| - tau, 0), with exact zeros (+0.0) where |z| <= tau; NaN stays NaN (a diverged
  gate must not look like a pruned one)."""
  threshold = jnp.asarray(threshold, z.dtype)
  return jnp.where(jnp.abs(z) <= threshold, jnp.zeros_like(z), z - jnp.sign(z) * threshold)


def _value(v: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return v(count) if callable(v) else jnp.asarray(v)


def _key_name(key) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _gate_leaves(params: PyTree) -> PyTree:
  return jax.tree_util.tree_map_with_path(lambda path, _: bool(path) and _key_name(path[-1]) == GATE, params)


def sora_proximal(
    lam: ScalarOrSchedule,
    learning_rate: ScalarOrSchedule | None = None,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Proximal L1 step on SoRA gates.

  Args:
    lam: the sparsity strength lam_t, a float or an Optax schedule over steps.
    learning_rate: eta_t, the same float or schedule as the preceding optimizer's; tau = eta_t * lam_t (paper).
      None: tau = lam_t, unscaled, as the official code.
    mask: which leaves are gates: a bool pytree like params, or a callable params -> bool pytree (as in Optax).
      None: every leaf named `sora_gate`.

  Returns:
    A transformation whose update of a gate leaf is `S_tau(p + u) - p`; other leaves pass through unchanged.
    A gate whose thresholded value is zero becomes exactly 0.0 after `optax.apply_updates`, because
    `p + (0 - p)` is exact in floating point.

  Example:
    not_gate = lambda p: jax.tree.map(lambda g: not g, sora_jax.gate_mask(p))
    opt = optax.chain(optax.adamw(lr, weight_decay=0.01, mask=not_gate), sora_jax.sora_proximal(lam, learning_rate=lr))
  """

  def init_fn(params):
    del params
    return SoraProximalState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(optax_base.NO_PARAMS_MSG)
    if mask is None:
      gates = _gate_leaves(params)
    elif callable(mask):
      gates = mask(params)
    else:
      gates = mask
    tau = _value(lam, state.count)
    if learning_rate is not None:
      tau = tau * _value(learning_rate, state.count)

    def step(is_gate, u, p):
      if not is_gate or u is None:
        return u
      z = p + u.astype(p.dtype)
      return (soft_threshold(z, tau) - p).astype(u.dtype)

    new_updates = jax.tree.map(step, gates, updates, params, is_leaf=lambda x: x is None)
    return new_updates, SoraProximalState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gate_l1_penalty(params: PyTree) -> jax.Array:
  """mean |g| over every gate entry of every module: the official extra loss term is `lam * gate_l1_penalty(params)`.

  The official trainer adds lam * sum_modules sum |g| / (number of gate entries) to the loss; with the proximal step
  in place this term is optional.
  """
  gates = [leaf for leaf, is_gate in zip(jax.tree.leaves(params), jax.tree.leaves(_gate_leaves(params))) if is_gate]
  if not gates:
    return jnp.zeros([], jnp.float32)
  total = sum(jnp.sum(jnp.abs(g)) for g in gates)
  return total / sum(g.size for g in gates)
