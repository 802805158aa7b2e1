"""Truncate, then train (`adapter.truncate_at`, `train.cut`): the padded cut computes the truncated delta, dropped
ranks stay exactly zero through AdamW, a run ends within its budget, and bad settings are one clear error."""

import os
import sys

import jax
import numpy as np
import optax
import pytest

import sora_jax
from train import cut
from train.config import ConfigError, load_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_run_args  # noqa: E402


def _lora(rank=8, stacked=False):
  """A linen tree of two Dense kernels (one stacked over 3 layers when `stacked`) with trained-looking LoRA factors."""
  rng = np.random.default_rng(0)
  lead = (3,) if stacked else ()
  params = {"q": {"kernel": rng.standard_normal(lead + (12, 10)).astype(np.float32)}}
  params["o"] = {"kernel": rng.standard_normal((10, 9)).astype(np.float32)}
  config = sora_jax.SoraConfig(rank=rank, alpha=16.0, targets=(r".*/kernel",), stacked="q/kernel" if stacked else None)
  tree = sora_jax.init(jax.random.key(0), params, config)
  for module in ("q", "o"):
    b = tree[module]["sora_b"]
    tree[module]["sora_b"] = rng.standard_normal(b.shape).astype(np.float32)
    tree[module]["sora_gate"] = np.ones(tree[module]["sora_gate"].shape, np.float32)
  return tree, config


@pytest.mark.parametrize("stacked", [False, True])
def test_padded_cut_is_the_truncated_delta_at_rank_r(stacked):
  tree, config = _lora(stacked=stacked)
  max_params = sora_jax.rank_report(tree, config).max_params
  truncated, report = sora_jax.truncate(tree, config, max_params // 4)
  padded = cut.pad_to_rank(tree, truncated)
  for module in ("q", "o"):
    for leaf in ("sora_a", "sora_b", "sora_gate"):
      assert np.shape(padded[module][leaf]) == np.shape(tree[module][leaf])
  # s B diag(g) A of the padded tree, by hand, equals the merged truncated tree's delta.
  merged = sora_jax.merge(truncated, config)
  for module in ("q", "o"):
    p = padded[module]
    delta = np.einsum("...ir,...r,...ro->...io", p["sora_a"], p["sora_gate"], p["sora_b"]) * (16.0 / 8)
    np.testing.assert_allclose(tree[module]["kernel"] + delta, merged[module]["kernel"], rtol=1e-5, atol=1e-5)
  assert sora_jax.rank_report(padded, config).retained_params == report.retained_params


def test_dropped_ranks_stay_zero_under_adamw():
  tree, config = _lora()
  truncated, _ = sora_jax.truncate(tree, config, sora_jax.rank_report(tree, config).max_params // 4)
  padded = cut.pad_to_rank(tree, truncated)
  trainable, frozen = sora_jax.split(padded)
  tx = optax.adamw(1e-2, weight_decay=0.1)
  state = tx.init(trainable)
  x = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)

  def loss(t):
    params = sora_jax.combine(t, frozen)
    q = params["q"]
    h = x @ q["kernel"] + 2.0 * ((x @ q["sora_a"]) * q["sora_gate"]) @ q["sora_b"]
    return jax.numpy.sum(h**2)

  for _ in range(3):
    grads = jax.grad(loss)(trainable)
    grads = jax.tree.map(lambda g, m: g * m, grads, sora_jax.not_gate_mask(grads))  # LoRA's gates are fixed
    updates, state = tx.update(grads, state, trainable)
    trainable = optax.apply_updates(trainable, updates)
  dropped = np.asarray(trainable["q"]["sora_gate"]) == 0
  assert dropped.any()
  assert np.all(np.asarray(trainable["q"]["sora_a"])[:, dropped] == 0)
  assert np.all(np.asarray(trainable["q"]["sora_b"])[dropped] == 0)


def test_fresh_adam_zeroes_moments_and_count_and_keeps_the_schedule():
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
  params = {"w": np.ones(3, np.float32)}
  state = tx.init(params)
  for _ in range(4):
    _, state = tx.update({"w": np.ones(3, np.float32)}, state, params)
  fresh = cut._fresh_adam(state)
  adam = optax.tree_utils.tree_get(fresh, "mu")
  assert np.all(np.asarray(adam["w"]) == 0)
  counts = [int(np.asarray(c)) for _, c in optax.tree_utils.tree_get_all_with_path(fresh, "count")]
  assert sorted(counts) == [0, 4]  # Adam's count restarts, the schedule's does not


@pytest.mark.slow
def test_a_truncate_then_train_run_ends_within_its_budget(tiny, tmp_path, capsys):
  from train import loop

  run = ("adapter.method=lora", "adapter.rank=8", "adapter.truncate_at=0.5", "adapter.truncate_fraction=0.25")
  # Evaluated every step with the best evaluation kept: the best may only come from a step after the cut.
  steps = ("train.max_steps=6", "train.eval_every=1", "train.final_params=best")
  results = loop.run(load_config(None, [*tiny_run_args(tiny, tmp_path), "train.progress=false", *steps, *run]))
  assert "truncated at step 3" in capsys.readouterr().out
  assert results["best"]["step"] >= 3
  assert 0 < results["retained_params"] <= 0.25 * results["max_params"]


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["adapter.method=lora", "adapter.truncate_at=0.7"], "go together"),
    (["adapter.method=sora", "adapter.truncate_at=0.7", "adapter.truncate_fraction=0.25"], "use lora"),
    (["adapter.method=lora", "adapter.truncate_at=0.7", "adapter.truncate_fraction=1.0"], "strictly between"),
  ],
)
def test_bad_truncate_settings_are_one_clear_error(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load_config(None, overrides)
