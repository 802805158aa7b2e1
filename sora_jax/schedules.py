"""Lambda (gate threshold) schedules of SoRA's sparsifying scheduler.

The official code (`src/sparse_optimizer.py`, `SparseAdamW._build_lambda_list`) builds `lambda_num` values from a start
value `xi_0` to `max_lambda` in one of three shapes, with t_k = k / (lambda_num - 1):

  linear:      lambda_k = xi_0 + t_k (max - xi_0)                        (np.linspace)
  log_linear:  lambda_k = log(exp(xi_0) + t_k (exp(max) - exp(xi_0)))    (linear in exp(lambda))
  exp_linear:  lambda_k = exp(log(xi_0) + t_k (log(max) - log(xi_0)))     (linear in log(lambda), geometric)

`exp_linear` needs xi_0 > 0 and max > 0 (log of 0 is -inf and the official formula yields NaN); we raise a ValueError
instead. `log_linear` is evaluated as `xi_0 + log1p(t expm1(max - xi_0))`, which is the same value without overflow
in exp and without losing small lambdas against exp(0) = 1 in float32.

Two ways to use them:
  lambda_stages(...)   -> np.ndarray of the stage values (the staged run: one training stage per value).
  lambda_schedule(...) -> optax.Schedule for one run: a staircase holding stage k for `steps_per_stage` steps, or
                          (staircase=False) the shape evaluated continuously over `lambda_num - 1` stages' worth of
                          steps; both hold max_lambda afterwards.
"""

from typing import Literal

import jax.numpy as jnp
import numpy as np
import optax

LAMBDA_SHAPES = ("linear", "log_linear", "exp_linear")
LambdaShape = Literal["linear", "log_linear", "exp_linear"]


def _check(shape: str, start: float, max_lambda: float, lambda_num: int) -> None:
  if shape not in LAMBDA_SHAPES:
    raise ValueError(f"unknown lambda shape {shape!r}; expected one of {LAMBDA_SHAPES}")
  if int(lambda_num) != lambda_num or lambda_num < 1:
    raise ValueError(f"lambda_num must be a positive integer, got {lambda_num!r}")
  if not (np.isfinite(start) and np.isfinite(max_lambda)):
    raise ValueError(f"start and max_lambda must be finite, got start={start}, max_lambda={max_lambda}")
  if start < 0 or max_lambda < 0:
    # A threshold is a magnitude: S_tau with tau < 0 would grow gates, not sparsify them.
    raise ValueError(f"lambdas are thresholds and must be >= 0, got start={start}, max_lambda={max_lambda}")
  if shape == "exp_linear" and (start <= 0 or max_lambda <= 0):
    raise ValueError(
      f"exp_linear interpolates log(lambda), which is undefined at 0 (got start={start}, max_lambda={max_lambda}); "
      "use a positive start (e.g. 1e-5), or the linear / log_linear shape, which accept 0"
    )


def _shape_at(shape: str, start, max_lambda, t, xp):
  """The shape at fraction t in [0, 1] (array); xp is numpy or jax.numpy."""
  if shape == "linear":
    return start + t * (max_lambda - start)
  if shape == "log_linear":
    return start + xp.log1p(t * xp.expm1(max_lambda - start))
  return xp.exp(xp.log(start) + t * (xp.log(max_lambda) - xp.log(start)))


def lambda_stages(shape: LambdaShape, start: float, max_lambda: float, lambda_num: int) -> np.ndarray:
  """The official sparsifying scheduler's lambda values, one per stage.

  Args:
    shape: "linear", "log_linear" or "exp_linear" (the official `lambda_schedule`).
    start: the first value (the official `sparse_lambda_2`, xi_0); stage 0 trains at it. Must be > 0 for exp_linear.
    max_lambda: the last value.
    lambda_num: how many values (stages), >= 1.

  Returns:
    float64 array `(lambda_num,)`; the first entry is `start` and the last `max_lambda` exactly.

  Example:
    >>> lambda_stages("linear", 0.0, 7e-4, 7)   # the official schedule script for RTE
  """
  _check(shape, start, max_lambda, lambda_num)
  if lambda_num == 1:
    return np.array([start], np.float64)
  t = np.linspace(0.0, 1.0, int(lambda_num))
  values = _shape_at(shape, np.float64(start), np.float64(max_lambda), t, np)
  values[0], values[-1] = start, max_lambda  # exact end points, as np.linspace gives them
  return values


def lambda_schedule(
  shape: LambdaShape, start: float, max_lambda: float, lambda_num: int, steps_per_stage: int, *, staircase: bool = True
) -> optax.Schedule:
  """The sparsifying scheduler inside one run, as an Optax schedule `count -> lambda`.

  Args:
    shape, start, max_lambda, lambda_num: as `lambda_stages`.
    steps_per_stage: optimizer steps per lambda value (> 0).
    staircase: True holds `lambda_stages(...)[k]` for steps `[k * steps_per_stage, (k + 1) * steps_per_stage)`, the
      official stage values within one run. False evaluates the shape continuously, reaching `max_lambda` at step
      `(lambda_num - 1) * steps_per_stage` (the start of the last stage), so that it agrees with the staircase at
      every stage boundary.

  Returns:
    A function of the step count (int or traced array) that returns a float32 lambda; `max_lambda` after the end.

  Example:
    >>> lam = lambda_schedule("exp_linear", 1e-5, 1e-3, 5, steps_per_stage=100)
    >>> tx = optax.chain(optax.adamw(1e-3), sora_jax.sora_proximal(lam, learning_rate=1e-3))
  """
  stages = lambda_stages(shape, start, max_lambda, lambda_num)
  if int(steps_per_stage) != steps_per_stage or steps_per_stage < 1:
    raise ValueError(f"steps_per_stage must be a positive integer, got {steps_per_stage!r}")
  values = jnp.asarray(stages, jnp.float32)
  last = len(stages) - 1

  def staircase_fn(count):
    index = jnp.clip(jnp.asarray(count) // steps_per_stage, 0, last)
    return values[index]

  def continuous_fn(count):
    if last == 0:
      return jnp.full(jnp.shape(count), values[0])
    t = jnp.clip(jnp.asarray(count, jnp.float32) / (last * steps_per_stage), 0.0, 1.0)
    return _shape_at(shape, jnp.float32(start), jnp.float32(max_lambda), t, jnp).astype(jnp.float32)

  return staircase_fn if staircase else continuous_fn
