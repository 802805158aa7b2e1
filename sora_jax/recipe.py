"""SoRA's optimizer in one call: the gate step and the optimizer of every other leaf, as one Optax transformation.

The recipe (default, `gate_update="gradient"`): `optimizer` (AdamW) updates A, B and any head, and the gates take the
proximal-gradient step on their raw gradient,

  g <- S_{eta lam}(g - (eta / rms) dL/dg)                                    (`sora_jax.sora_proximal(optimizer=...)`)

or, with `target_fraction`, the same step held to a retained-parameter schedule (`sora_jax.sora_budget`). The official
code's form (`gate_update="adam"`) chains the optimizer over every leaf, gates included, and thresholds its step:

  optax.chain(optimizer, sora_jax.sora_proximal(lam, learning_rate=...))   # tau = lr * lam, or lam (official)

`sora_optimizer` builds either, so the trainer, the benches and the examples write SoRA's optimizer the same way.
"""

from __future__ import annotations

from typing import Any

import optax

from sora_jax import adapters
from sora_jax.budget import sora_budget
from sora_jax.gate_step import GateMask
from sora_jax.optim import sora_proximal

PyTree = Any
GATE_UPDATES = ("gradient", "adam")


def sora_optimizer(
  learning_rate: optax.ScalarOrSchedule,
  lam: optax.ScalarOrSchedule,
  optimizer: optax.GradientTransformation | None = None,
  *,
  gate_update: str = "gradient",
  threshold_by_lr: bool = True,
  gate_scale: float | Any | None = None,
  target_fraction: float | Any | None = None,
  total_steps: int | Any | None = None,
  start: float = 0.1,
  reach: float = 0.7,
  refit_from: int | Any | None = None,
  mask: GateMask = None,
) -> optax.GradientTransformationExtraArgs:
  """SoRA's optimizer: the gates' L1 proximal step and `optimizer` on the other leaves.

  Example (the recipe; AdamW on A and B, the gates' own step at the same rate):

    tx = sora_jax.sora_optimizer(1e-3, lam=0.1, optimizer=optax.adamw(1e-3, weight_decay=0.01))

  Args:
    learning_rate: eta_t, a float or schedule. "gradient": the gates' step size (g <- S_{eta lam}(g - eta dL/dg / rms)).
      "adam": the rate the threshold scales with, tau = eta_t * lam_t (`threshold_by_lr`).
    lam: the sparsity strength lam >= 0 (a float, a traced scalar or a schedule); with `target_fraction` the L1
      strength of the budget's descent (`sora_budget`'s `lam_init`).
    optimizer: the optimizer of A, B and any other trainable leaf. None: `optax.adamw(learning_rate)`, with no weight
      decay on the gates in the "adam" form.
    gate_update: "gradient" (the recipe: the gates never enter `optimizer`, state `sora_jax.gate_step.OwnedGatesState`)
      or "adam" (the official code: `optimizer` updates the gates too, then the threshold acts on its step).
    threshold_by_lr: "adam" only: tau = learning_rate * lam (paper), or False: tau = lam (official `SparseAdamW`).
    gate_scale: "adam" only: the gates' step times this factor (e.g. gate rate / learning rate); None: unscaled.
    target_fraction: hold the retained adapter parameters to a schedule ending at this fraction (`sora_budget`);
      needs `total_steps`. None: the proximal step at `lam` (`sora_proximal`).
    total_steps: the run's optimizer steps (budget only).
    start, reach: the budget schedule's phases, fractions of `total_steps` (`sora_jax.budget_schedule`).
    refit_from: the step from which kept gates train without the threshold and zero gates stay zero
      (`sora_proximal`); not with a budget, which holds its ranks itself.
    mask: which leaves are gates (a bool tree or a callable, as Optax); None: every gate leaf (`sora_jax.gate_mask`).

  Returns:
    One `optax.GradientTransformationExtraArgs`; `update` needs `params`.

  Raises:
    ValueError: an unknown `gate_update`, `gate_scale` or `threshold_by_lr=False` with "gradient", a budget without
      `total_steps` or with `refit_from`, or a negative or non-finite concrete `lam` / `learning_rate`.
  """
  if gate_update not in GATE_UPDATES:
    raise ValueError(f"sora_optimizer: gate_update must be one of {GATE_UPDATES}, got {gate_update!r}")
  gradient = gate_update == "gradient"
  if gradient and (gate_scale is not None or not threshold_by_lr):
    raise ValueError(
      "sora_optimizer: gate_scale and threshold_by_lr=False shape the gates' AdamW step; they need gate_update='adam'"
    )
  if target_fraction is not None and total_steps is None:
    raise ValueError("sora_optimizer: target_fraction needs total_steps, the run's optimizer steps")
  if target_fraction is not None and refit_from is not None:
    raise ValueError("sora_optimizer: refit_from is for the proximal step; a budget (target_fraction) holds its ranks")
  gates = adapters.gate_mask if mask is None else mask
  if optimizer is None:
    optimizer = optax.adamw(learning_rate) if gradient else optax.adamw(learning_rate, mask=adapters.not_gate_mask)
  # The gates' own step takes learning_rate; the chain form's threshold takes it only as tau's scale.
  rate = learning_rate if gradient or threshold_by_lr else None
  owner = optimizer if gradient else None
  if target_fraction is not None:
    gate_step = sora_budget(
      target_fraction,
      total_steps,
      lam_init=lam,
      learning_rate=rate,
      start=start,
      reach=reach,
      mask=mask,
      optimizer=owner,
    )
  else:
    gate_step = sora_proximal(lam, learning_rate=rate, mask=mask, optimizer=owner, refit_from=refit_from)
  if gradient:
    return gate_step
  chain = [optimizer]
  if gate_scale is not None:
    chain.append(optax.masked(optax.scale(gate_scale), gates))
  return optax.chain(*chain, gate_step)
