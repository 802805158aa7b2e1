"""Rank learning against planted ranks (train/planted.py): the teacher is the base plus known low-rank changes in some
modules only, so the right allocation is known. Linen through `sora_jax.init`/`factored`, NNX through `SoraProvider`."""

import jax
import numpy as np
import optax
import pytest

import sora_jax
from train import planted

STEPS = planted.STEPS


def _unplanted(plant):
  return [i for i, k in enumerate(plant.ranks) if k == 0]


@pytest.mark.parametrize("plant_name", ["two_of_six", "mixed"])
def test_budget_of_lora_r2_beats_lora_r2_and_gives_no_rank_to_unplanted_modules(plant_name):
  plant = planted.PLANTS[plant_name]
  problem = planted.planted_problem(plant, seed=0)
  lora = planted.run_linen(problem, planted.optimizer("lora", STEPS), STEPS, rank=2)
  sora = planted.run_linen(problem, planted.optimizer("gradient", STEPS, target=2 / planted.RANK_MAX), STEPS)
  assert sora.retained_params <= lora.retained_params
  assert sora.loss <= 0.5 * lora.loss, (sora, lora)
  assert all(sora.ranks[i] == 0 for i in _unplanted(plant)), sora.ranks


@pytest.mark.parametrize("plant_name", ["two_of_six", "mixed"])
def test_some_lambda_isolates_the_planted_modules(plant_name):
  """The recipe at lambda 0.3 zeroes every unplanted module and keeps each planted one at or above its rank."""
  plant = planted.PLANTS[plant_name]
  problem = planted.planted_problem(plant, seed=0)
  out = planted.run_linen(problem, planted.optimizer("gradient", STEPS, lam=0.3), STEPS)
  assert all(rank == 0 for rank, k in zip(out.ranks, plant.ranks) if k == 0), out.ranks
  assert all(rank >= k for rank, k in zip(out.ranks, plant.ranks) if k > 0), out.ranks


def test_refit_removes_the_shrinkage_on_the_kept_ranks():
  """lambda 1 leaves the kept gates shrunk; refitting from 70 % of the steps (zeros frozen, no threshold) keeps the
  unplanted modules at zero and at least halves the loss."""
  plant = planted.PLANTS["two_of_six"]
  problem = planted.planted_problem(plant, seed=0)
  outs = [
    planted.run_linen(
      problem,
      sora_jax.sora_proximal(1.0, learning_rate=planted.GATE_LR, optimizer=optax.adamw(planted.LR), refit_from=refit),
      STEPS,
    )
    for refit in (None, int(0.7 * STEPS))
  ]
  assert all(out.ranks[:4] == (0, 0, 0, 0) for out in outs), outs
  assert outs[1].loss <= 0.5 * outs[0].loss, outs


def test_nnx_provider_recipe_isolates_the_planted_modules():
  plant = planted.PLANTS["two_of_six"]
  problem = planted.planted_problem(plant, seed=1)
  tx = sora_jax.sora_proximal(0.3, learning_rate=planted.GATE_LR, optimizer=optax.adamw(planted.LR))
  out = planted.run_nnx(problem, tx, STEPS)
  assert out.ranks[:4] == (0, 0, 0, 0) and min(out.ranks[4:]) >= 6, out.ranks


@pytest.mark.parametrize("target, steps", [(0.125, 100), (0.5, 100), (0.125, 10_000)])
def test_budget_run_follows_its_schedule_and_lands_within_one_rank(target, steps):
  """100 steps as 10,000: never every gate at zero, the retained fraction at most the schedule at every step and within
  one rank of it unless the L1 step alone keeps fewer, but never fewer than the planted ranks (10 on `mixed`: the
  budget is an upper bound, the loss does not pay for more), and on the budget at the end."""
  import jax.numpy as jnp

  plant = planted.PLANTS["mixed"]
  problem = planted.planted_problem(plant, seed=2)
  width, total = planted.WIDTH, planted.RANK_MAX * len(planted.MODULES)
  tx = sora_jax.sora_budget(
    target, steps, lam_init=0.3, learning_rate=planted.GATE_LR, optimizer=optax.adamw(planted.LR)
  )
  config = sora_jax.SoraConfig(rank=planted.RANK_MAX, alpha=float(planted.RANK_MAX), targets=(r"m\d/kernel",))
  trainable, frozen = sora_jax.split(sora_jax.init(jax.random.key(0), problem.base, config))

  def loss_fn(t):
    with sora_jax.factored(config):
      return planted._loss(planted.Modules().apply({"params": sora_jax.combine(t, frozen)}, problem.xs), problem.ys)

  @jax.jit
  def train(t):
    def step(carry, _):
      t, state = carry
      updates, state = tx.update(jax.grad(loss_fn)(t), state, t)
      t = optax.apply_updates(t, updates)
      return (t, state), sum(jnp.sum(t[m]["sora_gate"] != 0) for m in planted.MODULES)

    (t, _), active = jax.lax.scan(step, (t, tx.init(t)), None, length=steps)
    return t, active

  trainable, active = train(trainable)
  active = np.asarray(active)
  scheduled = np.asarray(jax.vmap(sora_jax.budget_schedule(target, steps))(jnp.arange(steps))) * total
  # sora_budget rounds the budget to whole parameters (+ 0.5 of the 32 of a rank).
  low, high = np.minimum(scheduled - 1, sum(plant.ranks)) <= active, active <= scheduled + 0.5 / (2 * width)
  assert active.min() > 0 and low.all() and high.all(), np.flatnonzero(~(low & high))[:5]
  report = sora_jax.rank_report(sora_jax.combine(trainable, frozen), config)
  assert target * report.max_params - 2 * width <= report.retained_params <= target * report.max_params


def test_bad_hyperparameters_raise_one_clear_error():
  for kwargs in (
    {"lam": -1.0},
    {"lam": float("nan")},
    {"lam": 0.1, "learning_rate": float("inf")},
    {"lam": 0.1, "learning_rate": -1e-3},
  ):
    with pytest.raises(ValueError, match="finite number >= 0"):
      sora_jax.sora_proximal(**kwargs)
  with pytest.raises(ValueError, match="finite number >= 0"):
    sora_jax.sora_budget(0.5, 10, lam_init=-1.0)
  with pytest.raises(ValueError, match="needs learning_rate"):
    sora_jax.sora_proximal(0.1, optimizer=optax.adamw(1e-3))


def test_truncation_rows_exist_and_meet_the_budget(capsys):
  """The equal-budget table has both truncation rows at the budget of LoRA r = 1 (192 params), within it; truncating
  the r_max LoRA to its own full budget changes nothing."""
  assert planted.main(["--seeds", "0", "--steps", "30", "--budgets", "1", "--plants", "two_of_six", "--no-sweep"]) == 0
  out = capsys.readouterr().out
  for name in ("LoRA r_max 8 -> truncate to r=1 budget", "LoRA r_max 8, truncate at 70 % + train 30 %, r=1 budget"):
    row = next(line for line in out.splitlines() if line.startswith(f"| {name} |"))
    params = [int(p) for p in row.split("|")[3].strip().split("/")]
    assert 0 < max(params) <= planted.uniform_budget(1) == 192, row
  problem = planted.planted_problem(planted.PLANTS["two_of_six"], seed=0)
  full = planted.run_truncated(problem, [planted.uniform_budget(planted.RANK_MAX)], 30)[0]
  lora = planted.run_linen(problem, planted.optimizer("lora", 30), 30)
  assert full.ranks == (planted.RANK_MAX,) * 6 and abs(full.loss - lora.loss) <= 1e-5 * lora.loss, (full, lora)
