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

from flax import nnx

from sora_jax import leaves

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


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _gate_leaves(params: PyTree) -> PyTree:
  """Bool tree like `params` (an `nnx.Variable` counts as one leaf), True at gates: leaves named `sora_gate` or
  `<w>_lora_gate` (the naming module), or of NNX type `SoraGate`."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
  return jax.tree_util.tree_unflatten(
      treedef, [leaves.is_gate(tuple(_key_name(k) for k in path), leaf) for path, leaf in flat])


def _resolve_gates(params: PyTree, mask: PyTree | Callable[[PyTree], PyTree] | None, name: str) -> PyTree:
  """The bool gate tree of a gate step's `mask` argument: the given tree, `mask(params)`, or (None) every gate leaf
  of `params`, where finding none is an error."""
  if mask is not None:
    return mask(params) if callable(mask) else mask
  gates = _gate_leaves(params)
  if not any(jax.tree.leaves(gates)):
    raise ValueError(
        f"{name} found no gate in params (no leaf named 'sora_gate' or '<weight>_lora_gate', no "
        "sora_jax.SoraGate): was the model adapted (sora_jax.init / sora_jax.apply_sora), and are the gates "
        "among the optimised params (e.g. nnx.Optimizer(..., wrt=nnx.LoRAParam))? Or pass mask=...")
  return gates


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
      None: every gate leaf (named `sora_gate` or `<weight>_lora_gate`, or an NNX `sora_jax.SoraGate`) of linen
      params, an `nnx.State` (of Variables, or of arrays as `nnx.Optimizer` passes it) or a pure dict; finding
      none is an error.

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
    gates = _resolve_gates(params, mask, "sora_proximal")
    tau = _value(lam, state.count)
    if learning_rate is not None:
      tau = tau * _value(learning_rate, state.count)

    def step(is_gate, u, p):
      if not is_gate or u is None:
        return u
      u_value, p_value = leaves.value(u), leaves.value(p)
      z = p_value + u_value.astype(p_value.dtype)
      return leaves.rewrap(u, (soft_threshold(z, tau) - p_value).astype(u_value.dtype))

    new_updates = jax.tree.map(step, gates, updates, params, is_leaf=lambda x: x is None or _is_variable(x))
    return new_updates, SoraProximalState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gate_l1_penalty(params: PyTree) -> jax.Array:
  """mean |g| over every gate entry of every module: the official extra loss term is `lam * gate_l1_penalty(params)`.

  The official trainer adds lam * sum_modules sum |g| / (number of gate entries) to the loss; with the proximal step
  in place this term is optional.
  """
  gates = [leaves.value(leaf) for leaf, is_gate in zip(jax.tree.leaves(params, is_leaf=_is_variable),
                                                      jax.tree.leaves(_gate_leaves(params))) if is_gate]
  if not gates:
    return jnp.zeros([], jnp.float32)
  total = sum(jnp.sum(jnp.abs(g)) for g in gates)
  return total / sum(g.size for g in gates)
