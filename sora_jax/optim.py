"""Proximal gate step for SoRA as an Optax transformation.

The gate g of each SoRA module is updated with a proximal step for the L1 penalty lam * ||g||_1
(Ding et al. 2023, eq. 6):

  g <- S_tau(g + u),   S_tau(z) = sign(z) * max(|z| - tau, 0),   tau = eta_t * lam_t

As an update this is `S_tau(p + u) - p`, so that `optax.apply_updates` lands on the thresholded value. With
`optimizer=`, u = -(eta_t / rms_t) dL/dg is the gates' raw-gradient step (rms_t: one running RMS of all gate
gradients, `sora_jax.gate_step`) and the optimizer updates every other leaf: the proximal-gradient method, which keeps
exactly the ranks whose gradient outweighs lambda * rms_t. Without
it, u is whatever the preceding transformation of a chain produced (e.g. AdamW's normalised step, as the official code).

The official code (`SparseAdamW.step`) uses tau = lam unscaled by the learning rate, and applies three sequential
masked writes; the third also zeroes values that the first two moved into (0, tau). Ours is the exact operator.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

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


class SoraProximalState(NamedTuple):
  """State of `sora_proximal`: the number of steps taken."""

  count: jax.Array


def sora_proximal(
  lam: optax.ScalarOrSchedule,
  learning_rate: optax.ScalarOrSchedule | None = None,
  mask: GateMask = None,
  *,
  optimizer: optax.GradientTransformation | None = None,
  refit_from: int | jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Proximal L1 step on SoRA gates.

  The recipe (the gates take the proximal-gradient step on their raw gradient; `optimizer` trains the rest; built
  also by `sora_jax.sora_optimizer(gate_lr, lam, optimizer)`):

    tx = sora_jax.sora_proximal(lam, learning_rate=gate_lr, optimizer=optax.adamw(lr, weight_decay=0.01))

  gives g <- S_{eta lam}(g - (eta / rms) dL/dg) with eta = `learning_rate` and rms a running root mean square of all
  gate gradients (one number): a gate ends at zero unless |dL/dg| > lam * rms, so lam is relative to the typical gate
  gradient and the ranks kept are those the loss pays for. The official code's behaviour
  (the gates take AdamW's normalised step, then the threshold; lam in the units of that step) is the chain form
  without `optimizer`:

    tx = optax.chain(optax.adamw(lr, mask=sora_jax.not_gate_mask), sora_jax.sora_proximal(lam))  # tau = lam

  (`learning_rate=lr` there gives the paper's tau = lr * lam.) docs/rank_learning.md measures both on planted
  low-rank problems.

  Args:
    lam: the sparsity strength lam_t >= 0, a float or an Optax schedule over steps.
    learning_rate: eta_t >= 0, a float or schedule; tau = eta_t * lam_t. With `optimizer` it is the gates' step
      size and required. Without it, the preceding optimizer's learning rate (paper), or None: tau = lam_t,
      unscaled, as the official code.
    mask: which leaves are gates: a bool pytree like params, or a callable params -> bool pytree (as in Optax).
      None: `sora_jax.gate_mask`, every gate leaf (named `sora_gate` or `<weight>_lora_gate`, or an NNX
      `sora_jax.SoraGate`) of any pytree of params (linen params, an `nnx.State` of Variables or of arrays as
      `nnx.Optimizer` passes it, a pure dict, or a container of them); finding none is an error.
    optimizer: the optimizer of every other leaf (A, B, a head). Given, the transform owns the gates' update
      (state `sora_jax.gate_step.OwnedGatesState`); None, it thresholds the update a preceding transform made.
    refit_from: the step from which the selection is over: a gate that is zero stays exactly zero and the others
      take their step u without the threshold (g <- g + u), so the ranks kept train free of L1's shrinkage for the
      rest of the run. None (default): the threshold acts at every step.

  Returns:
    A transformation whose update of a gate leaf is `S_tau(p + u) - p`; other leaves get `optimizer`'s update (or
    pass through unchanged). A gate whose thresholded value is zero becomes exactly 0.0 after
    `optax.apply_updates`, because `p + (0 - p)` is exact in floating point.

  Raises:
    ValueError: a concrete `lam` or `learning_rate` that is negative or not finite, or `optimizer` without
      `learning_rate`.
  """
  check_nonnegative("lam", lam, "sora_proximal")
  check_nonnegative("learning_rate", learning_rate, "sora_proximal")
  if optimizer is not None:
    step = sora_proximal(lam, learning_rate, mask, refit_from=refit_from)
    return own_gates(step, optimizer, learning_rate, mask, "sora_proximal")
  if refit_from is not None and not isinstance(refit_from, jax.Array) and refit_from < 0:
    raise ValueError(f"sora_proximal: refit_from must be a step >= 0 or None, got {refit_from!r}")

  def init_fn(params):
    del params
    return SoraProximalState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(f"sora_proximal {NO_PARAMS}")
    treedef, gates = resolve_gates(params, mask, "sora_proximal")
    tau = schedule_value(lam, state.count)
    if learning_rate is not None:
      tau = tau * schedule_value(learning_rate, state.count)
    refit = False if refit_from is None else state.count >= refit_from

    def step(is_gate, u, p):
      if not is_gate or u is None:
        return u
      u_value, p_value = leaves.value(u), leaves.value(p)
      z = p_value + u_value.astype(p_value.dtype)
      # refit: z where the gate is on, exactly 0 where it is off (p + (0 - p) = 0 in floating point).
      new = jnp.where(refit, jnp.where(p_value != 0, z, jnp.zeros_like(z)), soft_threshold(z, tau))
      return leaves.rewrap(u, (new - p_value).astype(u_value.dtype))

    flat = zip(gates, treedef.flatten_up_to(updates), treedef.flatten_up_to(params))
    new_updates = treedef.unflatten([step(is_gate, u, p) for is_gate, u, p in flat])
    return new_updates, SoraProximalState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gate_l1_penalty(params: PyTree) -> jax.Array:
  """mean |g| over every gate entry of every module: the official extra loss term is `lam * gate_l1_penalty(params)`.

  The official trainer adds lam * sum_modules sum |g| / (number of gate entries) to the loss; with the proximal step
  in place this term is optional.
  """
  treedef, flags = gate_flags(params)
  gates = [leaves.value(leaf) for leaf, is_gate in zip(treedef.flatten_up_to(params), flags) if is_gate]
  if not gates:
    return jnp.zeros([], jnp.float32)
  total = sum(jnp.sum(jnp.abs(g)) for g in gates)
  return total / sum(g.size for g in gates)
