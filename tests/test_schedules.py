"""Lambda schedules against the official formulas, written out in NumPy (src/sparse_optimizer.py of TsinghuaC3I/SoRA)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import schedules


def _reference(shape, start, max_lambda, num):
  # The official construction, literally: linspace in lambda, in exp(lambda), or in log(lambda).
  if shape == "linear":
    return np.linspace(start, max_lambda, num)
  if shape == "log_linear":
    return np.log(np.linspace(np.exp(start), np.exp(max_lambda), num))
  return np.exp(np.linspace(np.log(start), np.log(max_lambda), num))


CASES = [
  (0.0, 7e-4, 7),
  (1e-4, 1e-2, 5),
  (0.5, 10.0, 10),
  (2.0, 0.1, 4),
  (3e-4, 3e-4, 3),
  (0.1, 1.0, 1),
  (1e-5, 1e-3, 2),
]


@pytest.mark.parametrize("shape", schedules.LAMBDA_SHAPES)
@pytest.mark.parametrize("start,max_lambda,num", CASES)
def test_stages_match_official_formula(shape, start, max_lambda, num):
  if shape == "exp_linear" and start == 0:
    pytest.skip("undefined; covered by test_exp_linear_rejects_zero")
  got = schedules.lambda_stages(shape, start, max_lambda, num)
  assert got.shape == (num,) and got.dtype == np.float64
  np.testing.assert_allclose(got, _reference(shape, start, max_lambda, num), rtol=1e-12, atol=1e-15)
  assert got[0] == start and (num == 1 or got[-1] == max_lambda)


def test_official_reference_values():
  # The official RTE script: linear from 0 to 7e-4 in 7 values.
  np.testing.assert_allclose(schedules.lambda_stages("linear", 0.0, 7e-4, 7), np.arange(7) * 1e-4 * 7 / 6, rtol=1e-12)
  np.testing.assert_allclose(
    schedules.lambda_stages("exp_linear", 1e-5, 1e-1, 5), [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], rtol=1e-12
  )


@pytest.mark.parametrize("start,max_lambda", [(0.0, 1e-3), (1e-3, 0.0), (0.0, 0.0)])
def test_exp_linear_rejects_zero(start, max_lambda):
  with np.errstate(all="ignore"):  # the official formula gives NaN / -inf here; we must not
    assert not np.all(np.isfinite(_reference("exp_linear", start, max_lambda, 4)))
  with pytest.raises(ValueError, match="exp_linear.*undefined at 0"):
    schedules.lambda_stages("exp_linear", start, max_lambda, 4)
  with pytest.raises(ValueError, match="exp_linear"):
    schedules.lambda_schedule("exp_linear", start, max_lambda, 4, steps_per_stage=10)


def test_zero_start_is_fine_for_linear_and_log_linear():
  for shape in ("linear", "log_linear"):
    values = schedules.lambda_stages(shape, 0.0, 1e-3, 4)
    assert np.all(np.isfinite(values)) and values[0] == 0.0


def test_log_linear_no_overflow():
  # exp(800) overflows float64 in the literal formula; the log1p form stays finite and exact at the ends.
  values = schedules.lambda_stages("log_linear", 790.0, 800.0, 3)
  middle = 800.0 + np.log(0.5 * np.exp(-10.0) + 0.5)  # log((e^790 + e^800) / 2), factored by hand
  np.testing.assert_allclose(values, [790.0, middle, 800.0], rtol=1e-12)


@pytest.mark.parametrize(
  "bad",
  [dict(shape="cosine"), dict(lambda_num=0), dict(lambda_num=2.5), dict(start=-1.0), dict(max_lambda=float("nan"))],
)
def test_bad_arguments(bad):
  kwargs = dict(shape="linear", start=0.0, max_lambda=1e-3, lambda_num=4) | bad
  with pytest.raises(ValueError):
    schedules.lambda_stages(**kwargs)


@pytest.mark.parametrize("shape", schedules.LAMBDA_SHAPES)
def test_staircase_schedule(shape):
  start, max_lambda, num, steps = 1e-4, 1e-2, 5, 7
  schedule = schedules.lambda_schedule(shape, start, max_lambda, num, steps_per_stage=steps)
  reference = _reference(shape, start, max_lambda, num)
  counts = np.arange(0, steps * (num + 2))
  expected = reference[np.minimum(counts // steps, num - 1)]
  np.testing.assert_allclose([float(schedule(c)) for c in counts[:9]], expected[:9], rtol=1e-6)
  got = jax.jit(jax.vmap(schedule))(jnp.asarray(counts))  # traceable inside a jitted step
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)


@pytest.mark.parametrize("shape", schedules.LAMBDA_SHAPES)
def test_continuous_schedule(shape):
  start, max_lambda, num, steps = 1e-4, 1e-2, 5, 10
  schedule = jax.jit(schedules.lambda_schedule(shape, start, max_lambda, num, steps_per_stage=steps, staircase=False))
  total = (num - 1) * steps
  counts = np.arange(0, total + 15)
  # The official shape with a dense grid: lambda at step c is the shape at t = c / total.
  dense = _reference(shape, start, max_lambda, total + 1)
  expected = dense[np.minimum(counts, total)]
  np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(jnp.asarray(counts))), expected, rtol=2e-5)
  # Agrees with the staircase at every stage boundary.
  stairs = schedules.lambda_stages(shape, start, max_lambda, num)
  np.testing.assert_allclose([float(schedule(k * steps)) for k in range(num)], stairs, rtol=2e-5)


def test_single_stage_schedule_is_constant():
  for staircase in (True, False):
    schedule = schedules.lambda_schedule("linear", 3e-4, 1.0, 1, steps_per_stage=5, staircase=staircase)
    np.testing.assert_allclose([float(schedule(c)) for c in (0, 4, 5, 100)], 3e-4, rtol=1e-6)


def test_schedule_drives_sora_proximal_inside_one_run():
  # As the threshold of the proximal gate step: with zero updates, gate magnitudes fall by lambda_t at step t.
  import optax
  from sora_jax.optim import sora_proximal

  stages = schedules.lambda_stages("linear", 0.0, 0.03, 4)
  tx = sora_proximal(schedules.lambda_schedule("linear", 0.0, 0.03, 4, steps_per_stage=2))
  params = {"dense": {"sora_gate": jnp.array([1.0, -0.5, 0.05, 0.2])}}
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p))
  for _ in range(10):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  shrink = 2 * stages.sum() + 2 * stages[-1]  # steps 0..7 walk the stages, steps 8, 9 hold max_lambda
  gate = np.array([1.0, -0.5, 0.05, 0.2])
  np.testing.assert_allclose(
    params["dense"]["sora_gate"], np.sign(gate) * np.maximum(np.abs(gate) - shrink, 0), rtol=1e-5, atol=1e-6
  )
