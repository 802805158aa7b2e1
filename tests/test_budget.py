"""Budget mode: `sora_budget` lands on its budget (linen and NNX models), `cut_to_budget` against a NumPy greedy cut,
and the trainer's `adapter.target_fraction` / `target_params` end to end on the tiny BERT of conftest.py."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sora_jax
from sora_jax.budget import budget_schedule, cut_to_budget, retained_fraction, sora_budget
from train.config import ConfigError, load_config

from conftest import tiny_run_args


def test_schedule_holds_one_then_falls_cubically_to_the_target():
  schedule = budget_schedule(0.25, 100, start=0.1, reach=0.7)
  values = np.array([float(schedule(t)) for t in range(101)])
  assert values[0] == values[10] == 1.0 and values[70] == values[100] == 0.25
  assert np.all(np.diff(values) <= 1e-7)
  u = (40 - 10) / 60
  np.testing.assert_allclose(values[40], 0.25 + 0.75 * (1 - u) ** 3, rtol=1e-6)


def _linen_tree(seed=0):
  """Two modules of costs 4 + 6 = 10 and 6 + 2 = 8 per rank, rank 3 each, in the linen layout."""
  rng = np.random.default_rng(seed)
  tree = {
    "l0": {
      "kernel": np.zeros((4, 6)),
      "sora_a": rng.normal(size=(4, 3)),
      "sora_b": rng.normal(size=(3, 6)),
      "sora_gate": rng.normal(size=(3,)),
    },
    "l1": {
      "kernel": np.zeros((6, 2)),
      "sora_a": rng.normal(size=(6, 3)),
      "sora_b": rng.normal(size=(3, 2)),
      "sora_gate": rng.normal(size=(3,)),
    },
  }
  return jax.tree.map(lambda v: v.astype(np.float32), tree)


@pytest.mark.parametrize("budget", [0, 17, 30, 40, 54])
def test_cut_to_budget_is_the_greedy_cut_of_smallest_gates(budget):
  tree = _linen_tree()
  tree["l1"]["sora_gate"][1] = 0.0  # already off
  config = sora_jax.SoraConfig(rank=3, alpha=3.0, targets=(r"l\d/kernel",))
  cut, report = cut_to_budget(tree, budget)
  # NumPy reference: drop entries by ascending |gate| while the retained parameters exceed the budget.
  entries = [
    (abs(g), m, i, c) for m, c in (("l0", 10), ("l1", 8)) for i, g in enumerate(tree[m]["sora_gate"]) if g != 0
  ]
  retained = sum(e[3] for e in entries)
  expected = {m: np.array(tree[m]["sora_gate"]) for m in ("l0", "l1")}
  dropped = 0
  for _, m, i, c in sorted(entries):
    if retained <= budget:
      break
    expected[m][i], retained, dropped = 0.0, retained - c, dropped + 1
  for m in ("l0", "l1"):
    np.testing.assert_array_equal(cut[m]["sora_gate"], expected[m])
  assert (report.cut_ranks, report.retained_before, report.retained_after, report.max_params) == (
    dropped,
    10 * 3 + 8 * 2,
    retained,
    54,
  )
  assert sora_jax.rank_report(cut, config).retained_params == report.retained_after <= max(budget, 0)


def test_cut_to_budget_refuses_a_nan_gate():
  tree = _linen_tree()
  tree["l0"]["sora_gate"][0] = np.nan
  with pytest.raises(ValueError, match="not finite"):
    cut_to_budget(tree, 10)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="dense_0")(x))
    x = nn.relu(nn.Dense(24, name="dense_1")(x))
    return nn.Dense(3, name="head")(x)


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_linen_run_lands_on_its_budget_and_the_state_reports_it(target):
  model = MLP()
  x = jax.random.normal(jax.random.key(1), (128, 16))
  y = jnp.argmax(x[:, :3], axis=-1)
  config = sora_jax.SoraConfig(rank=8, alpha=16.0, targets=(r"dense_\d+/kernel",))
  params = sora_jax.init(jax.random.key(2), model.init(jax.random.key(0), x)["params"], config)
  trainable, frozen = sora_jax.split(params, trainable=(r"head/.*",))
  lr, steps = 1e-2, 120
  not_gate = sora_jax.not_gate_mask(trainable)
  tx = optax.chain(optax.adamw(lr, mask=not_gate), sora_budget(target, steps, lam_init=0.5, learning_rate=lr))
  opt_state = tx.init(trainable)

  def loss_fn(trainable):
    with sora_jax.factored(config):
      logits = model.apply({"params": sora_jax.combine(trainable, frozen)}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(trainable, opt_state):
    grads = jax.grad(loss_fn)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state

  lams = []
  for _ in range(steps):
    trainable, opt_state = step(trainable, opt_state)
    lams.append(float(optax.tree_utils.tree_get(opt_state, "lam")))
  report = sora_jax.rank_report(sora_jax.combine(trainable, frozen), config)
  budget = target * report.max_params
  rank_cost = max(16 + 32, 32 + 24)
  assert budget - rank_cost <= report.retained_params <= budget  # within one rank, never above
  assert report.retained_params > 0 and set(lams) == {0.5}  # lambda is the L1 strength, held
  measured = float(optax.tree_utils.tree_get(opt_state, "active_fraction"))
  np.testing.assert_allclose(measured, report.fraction, rtol=1e-6)
  np.testing.assert_allclose(float(retained_fraction(trainable)), report.fraction, rtol=1e-6)


class Stack(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l0 = nnx.Linear(12, 20, rngs=rngs)
    self.l1 = nnx.Linear(20, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(jax.nn.relu(self.l0(x)))))


def test_nnx_optimizer_with_sora_budget_lands_on_its_budget():
  x = jax.random.normal(jax.random.key(3), (64, 12))
  target = jax.random.normal(jax.random.key(4), (64, 4))
  provider = sora_jax.SoraProvider(module_path=".*", rank=6, alpha=6.0)
  model = sora_jax.apply_sora(Stack(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
  lr, steps = 2e-2, 100
  not_gate = sora_jax.not_gate_mask
  tx = optax.chain(optax.adamw(lr, mask=not_gate), sora_budget(0.5, steps, lam_init=0.5, learning_rate=lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  for _ in range(steps):
    step(model, optimizer)
  report = sora_jax.rank_report(nnx.state(model), provider)
  assert 0.5 * report.max_params - (20 + 16) <= report.retained_params <= 0.5 * report.max_params
  pruned = sora_jax.prune(nnx.state(model), provider)
  assert sora_jax.rank_report(pruned, provider).retained_params == report.retained_params


# ---------------------------------------------------------------------------------------------------------------
# the trainer


def _trainer_args(tiny, output_dir, *extra):
  return [
    *tiny_run_args(tiny, output_dir),
    "train.max_steps=30",
    "train.eval_every=10",
    "train.save_every=30",
    "train.log_every=1",
    "train.progress=false",
    "optim.learning_rate=1e-2",
    "adapter.rank=8",
    "export_peft=false",
    *extra,
  ]


@pytest.mark.slow
def test_trainer_budget_mode_meets_the_budget_and_logs_lambda(tiny, tmp_path):
  from train.loop import run

  results = run(load_config(None, _trainer_args(tiny, tmp_path, "adapter.target_fraction=0.4")))
  budget = results["budget"]
  assert budget["target_params"] == int(0.4 * results["max_params"])
  assert budget["target_params"] - 0.02 * results["max_params"] <= results["retained_params"] <= budget["target_params"]
  assert budget["within_2_percent"] and budget["retained_params"] == results["retained_params"]
  assert results["pruned_merged"]["metrics_equal"]
  assert results["best"]["step"] == 30  # only evaluations on budget (after the cut at step 21) count
  trace = results["sparsity_trace"]
  assert (
    len(trace) == 30
    and trace[0]["target_fraction"] == 1.0
    and trace[-1]["target_fraction"] == pytest.approx(budget["target_params"] / results["max_params"])
  )
  rank_cost = (32 + 48) / results["max_params"]  # the largest rank of the tiny BERT
  assert all(0 < t["active_fraction"] <= t["target_fraction"] + 1e-6 for t in trace)  # never all off, never above
  assert all(t["active_fraction"] >= t["target_fraction"] - rank_cost for t in trace)  # within one rank
  logged = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert {"train/lambda", "train/active_fraction"} <= set(logged[0])


@pytest.mark.slow
def test_trainer_cuts_smallest_gates_when_the_run_ends_above_budget(tiny, tmp_path):
  from train.loop import run

  # The schedule starts to fall at step 27 and reaches the budget only at the end (reach = 1): the last step's
  # params are a little above it, and the end-of-run cut takes them down.
  results = run(
    load_config(
      None,
      _trainer_args(
        tiny,
        tmp_path,
        "adapter.target_params=2000",
        "sparse_lambda=1e-9",
        "adapter.budget_start=0.9",
        "adapter.budget_reach=1.0",
      ),
    )
  )
  budget = results["budget"]
  assert budget["retained_before_cut"] > 2000 and budget["cut_ranks"] > 0
  assert budget["retained_before_cut"] - budget["cut_ranks"] * 96 <= 2000  # each cut rank is worth at most 32 + 64
  assert 2000 - 96 < results["retained_params"] <= 2000 and budget["within_2_percent"]


@pytest.mark.parametrize(
  "overrides, words",
  [
    (["adapter.method=lora", "adapter.target_fraction=0.5"], ["method must be sora", "lora"]),
    (["adapter.target_fraction=0.5", "adapter.target_params=100"], ["one budget"]),
    (["adapter.target_fraction=0"], ["keeps no adapter"]),
    (["adapter.target_fraction=0.5", "sparse_lambda=0"], ["positive sparse_lambda"]),
    (["adapter.target_fraction=1.5"], ["target_fraction", "[0, 1]"]),
  ],
)
def test_budget_settings_that_cannot_work_are_one_clear_error(overrides, words):
  with pytest.raises(ConfigError) as error:
    load_config(None, overrides)
  assert all(w in str(error.value) for w in words) and "\n" not in str(error.value)


def test_staged_run_refuses_a_budget():
  from train import sparsify

  config, settings = sparsify.load_configs(None, ["adapter.target_fraction=0.5"])
  with pytest.raises(ValueError, match="parameter budget"):
    sparsify.check(config, settings)
