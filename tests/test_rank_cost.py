"""One cost of a rank (`sora_jax.rank_cost`): `rank_report`, `adapter_params`, `retained_fraction`, `cut_to_budget`
and `truncate` count the same parameters on linen, stacked linen, qwix dot_general (with a batch axis) and qwix
batched-einsum adapters (B shared by the entries), and the shared-B count agrees with one spelled out in NumPy."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sora_jax
from sora_jax import leaves

R = 4


def _randomise(tree, seed=0):
  """B drawn N(0, 1) (every row nonzero), gates N(0, 1) with about a third of the entries exactly zero."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    value = np.asarray(leaves.value(leaf))
    if str(path[-1]).endswith(("sora_b", "_lora_b")):
      value = rng.normal(size=value.shape)
    elif str(path[-1]).endswith(("sora_gate", "_lora_gate")):
      value = np.where(rng.random(value.shape) < 0.35, 0.0, rng.normal(size=value.shape))
    return jnp.asarray(value, jnp.float32)

  return leaves.map_leaves(tree, draw)


def _linen(stacked: bool):
  config = sora_jax.SoraConfig(rank=R, alpha=8.0, targets=(r".*kernel",), stacked=r"stack/.*" if stacked else None)
  shapes = {"stack": (3, 6, 5), "q": (6, 5)} if stacked else {"q": (6, 5), "v": (9, 7)}
  params = {name: {"kernel": jnp.ones(shape)} for name, shape in shapes.items()}
  return _randomise(sora_jax.init(jax.random.key(0), params, config)), config


class Dot(nnx.Module):
  """Linear (8 -> 6) and LinearGeneral with batch axis 0 (kernel (2, 6, 5)): qwix's dot_general layout."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 6, rngs=rngs)
    self.batched = nnx.LinearGeneral(6, 5, axis=-1, batch_axis={0: 2}, rngs=rngs)

  def __call__(self, x):  # x (2, 3, 8)
    return self.batched(self.lin(x))


class Ein(nnx.Module):
  """einsum 'bnd,ndh->bnh', weight (n, d, h) = (3, 5, 4): A (3, 5, r), B (r, 4) shared by the 3 entries, gate (3, r)."""

  def __init__(self, rngs):
    self.ein = nnx.Einsum("bnd,ndh->bnh", (3, 5, 4), rngs=rngs)

  def __call__(self, x):  # x (2, 3, 5)
    return self.ein(x)


def _qwix(module, x):
  provider = sora_jax.SoraProvider(module_path=".*", rank=R, alpha=8.0)
  model = sora_jax.apply_sora(module(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
  return _randomise(nnx.state(model)), provider


@functools.cache
def _kinds():
  return {
    "linen": _linen(False),
    "stacked_linen": _linen(True),
    "qwix_dot": _qwix(Dot, jnp.ones((2, 3, 8))),
    "qwix_einsum": _qwix(Ein, jnp.ones((2, 3, 5))),
  }


@pytest.mark.parametrize("kind", ["linen", "stacked_linen", "qwix_dot", "qwix_einsum"])
def test_every_count_of_a_rank_agrees(kind):
  params, config = _kinds()[kind]
  report = sora_jax.rank_report(params, config)
  assert 0 < report.retained_params < report.max_params
  assert sora_jax.adapter_params(params) == report.max_params
  np.testing.assert_allclose(float(sora_jax.retained_fraction(params)), report.fraction, rtol=1e-6)
  np.testing.assert_allclose(float(jax.jit(sora_jax.retained_fraction)(params)), report.fraction, rtol=1e-6)
  # the optimised half alone (no base weights) counts the same
  trainable, _ = sora_jax.split(params)
  assert sora_jax.adapter_params(trainable) == report.max_params
  # cut_to_budget counts what rank_report counts, before and after the cut
  budget = report.max_params // 2
  cut, done = sora_jax.cut_to_budget(params, budget)
  assert (done.retained_before, done.max_params) == (report.retained_params, report.max_params)
  assert done.retained_after == pytest.approx(sora_jax.rank_report(cut, config).retained_params)
  assert done.retained_after <= budget
  # truncate's kept parameters are what rank_report reads off its result
  cut, kept = sora_jax.truncate(params, config, budget)
  assert kept.retained_params == pytest.approx(sora_jax.rank_report(cut, config).retained_params)
  assert kept.retained_params <= budget


def test_the_shared_b_count_spelled_out_in_numpy():
  """Einsum weight (n, d, h) = (3, 5, 4), rank 4: A (3, 5, 4) and B (4, 4) hold 3 * 5 * 4 + 4 * 4 = 76 parameters;
  one rank of one entry is d + h / n = 5 + 4/3 (its column of A and a third of B's row); a rank of the whole module,
  as truncate keeps it, n d + h = 19."""
  params, provider = _kinds()["qwix_einsum"]
  pure = nnx.to_pure_dict(params)["ein"]
  a, b, gate = (np.asarray(pure[f"kernel_lora_{x}"]) for x in ("a", "b", "gate"))
  n, d, h = 3, 5, 4
  assert a.shape == (n, d, R) and b.shape == (R, h) and gate.shape == (n, R)
  on = (gate != 0).sum(axis=1)  # active ranks per entry (every row of B is nonzero)
  assert 0 < on.sum() < n * R
  by_hand = {"max": n * d * R + R * h, "retained": on.sum() * (d + h / n), "rows": [k * (d + h / n) for k in on]}
  report = sora_jax.rank_report(params, provider)
  assert by_hand["max"] == 76 == report.max_params == sora_jax.adapter_params(params)
  assert report.retained_params == pytest.approx(by_hand["retained"])
  assert [row.retained_params for row in report.rows] == pytest.approx(by_hand["rows"])
  assert [(row.fan_in, row.fan_out, row.rank) for row in report.rows] == [(d, h, k) for k in on]
  np.testing.assert_allclose(float(sora_jax.retained_fraction(params)), by_hand["retained"] / 76, rtol=1e-6)
  assert sora_jax.smallest_rank_params(params) == math.ceil(d + h / n) == 7
  cost = sora_jax.rank_cost(a.shape, b.shape, gate.shape[:-1])
  assert (cost.slice, cost.entries, cost.total, cost.per_entry) == (n * d + h, n, 76, pytest.approx(d + h / n))
  _, kept = sora_jax.truncate(params, provider, 40)
  assert kept.retained_params == 2 * (n * d + h) and kept.ranks == {"ein/kernel": 2}
