"""The tree functions on the three kinds of tree: nnx.State (Variables, or arrays as nnx.Optimizer passes them),
the pure dict of nnx.to_pure_dict, and linen params; both leaf layouts. Each returns the kind it was given."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sora_jax
from sora_jax import leaves

from conftest import tiny_adapted_nnx


@pytest.fixture(scope="module")
def adapted():
  return tiny_adapted_nnx()


def _kinds(model):
  state = nnx.state(model)
  return {"state": state, "arrays": nnx.as_pure(state), "pure": nnx.to_pure_dict(state)}


def _flat_values(tree):
  flat, _ = leaves.flatten(tree)
  return {p: leaves.value(v) for p, v in flat.items()}


def test_masks_and_labels_keep_the_kind(adapted):
  model, _ = adapted
  for kind, tree in _kinds(model).items():
    gates = sora_jax.gate_mask(tree)
    assert type(gates) is type(tree), kind
    flat = _flat_values(gates)
    assert {p for p, v in flat.items() if v} == {("layers", 0, "kernel_lora_gate"), ("layers", 1, "kernel_lora_gate")}
    adapters = _flat_values(sora_jax.adapter_mask(tree))
    assert sum(bool(v) for v in adapters.values()) == 6
    labels = _flat_values(sora_jax.param_labels(tree, trainable=(r"layers/1/bias",)))
    assert labels[("layers", 0, "kernel_lora_a")] == "adapter" and labels[("layers", 0, "kernel")] == "frozen"
    assert labels[("layers", 1, "bias")] == "trainable" and labels[("layers", 1, "kernel_lora_gate")] == "gate"
  # Variables keep their type (a gate mask of a State of Variables is SoraGate(True)).
  typed = dict(nnx.to_flat_state(sora_jax.gate_mask(nnx.state(model))))
  assert type(typed[("layers", 0, "kernel_lora_gate")]) is sora_jax.SoraGate
  assert type(typed[("layers", 0, "kernel_lora_a")]) is nnx.LoRAParam


def test_split_combine_round_trip(adapted):
  model, _ = adapted
  for kind, tree in _kinds(model).items():
    trainable, frozen = sora_jax.split(tree)
    assert type(trainable) is type(tree) and type(frozen) is type(tree), kind
    assert set(_flat_values(trainable)) == {("layers", i, f"kernel_lora_{n}") for i in (0, 1) for n in "ab"} | {
      ("layers", i, "kernel_lora_gate") for i in (0, 1)
    }
    back = sora_jax.combine(trainable, frozen)
    jax.tree.map(np.testing.assert_array_equal, _flat_values(back), _flat_values(tree))
  graphdef, state = nnx.split(model)
  trainable, frozen = sora_jax.split(state)
  x = jnp.ones((2, 4))
  np.testing.assert_array_equal(nnx.merge(graphdef, sora_jax.combine(trainable, frozen))(x), model(x))


def test_proximal_default_mask_on_every_kind(adapted):
  model, _ = adapted
  tx = sora_jax.sora_proximal(0.3)
  for kind, tree in _kinds(model).items():
    updates = jax.tree.map(jnp.zeros_like, tree)
    new, _ = tx.update(updates, tx.init(tree), tree)
    flat = _flat_values(new)
    for path, u in flat.items():
      if path[-1] == "kernel_lora_gate":
        np.testing.assert_allclose(u, -0.3 * np.ones(2), atol=1e-7, err_msg=kind)  # S_0.3(1) - 1
      else:
        np.testing.assert_array_equal(u, np.zeros_like(u))
  # By type alone: a SoraGate under any name is a gate.
  odd = nnx.State({"g": sora_jax.SoraGate(jnp.ones(2)), "w": nnx.Param(jnp.ones(2))})
  new, _ = tx.update(jax.tree.map(jnp.zeros_like, odd), tx.init(odd), odd)
  np.testing.assert_allclose(leaves.value(new["g"]), [-0.3, -0.3], atol=1e-7)
  np.testing.assert_array_equal(leaves.value(new["w"]), [0.0, 0.0])


def test_gate_l1_penalty_every_kind(adapted):
  model, _ = adapted
  for tree in _kinds(model).values():
    np.testing.assert_allclose(sora_jax.gate_l1_penalty(tree), 1.0)


def test_linen_layout_unchanged_beside_qwix_layout():
  """One tree holding both layouts: each function treats each adapter by its own layout."""
  params = {
    "dense": {
      "kernel": jnp.ones((4, 3)),
      "sora_a": jnp.ones((4, 2)),
      "sora_b": jnp.ones((2, 3)),
      "sora_gate": jnp.asarray([0.0, 2.0]),
    },
    "proj": {
      "w": jnp.ones((4, 5)),
      "w_lora_a": jnp.ones((4, 2)),
      "w_lora_b": jnp.ones((2, 5)),
      "w_lora_gate": jnp.asarray([3.0, 0.0]),
    },
  }
  records = leaves.find_adapters(leaves.flatten(params)[0])
  assert [(r.layout, r.weight) for r in records] == [("linen", ("dense", "kernel")), ("qwix", ("proj", "w"))]
  pruned = sora_jax.prune(params)
  assert "sora_gate" not in pruned["dense"] and pruned["dense"]["sora_a"].shape == (4, 1)
  assert pruned["proj"]["w_lora_a"].shape == (4, 1) and pruned["proj"]["w_lora_gate"].tolist() == [1.0]
  config = sora_jax.SoraConfig(rank=2, alpha=2.0, targets=(r"dense/kernel",))
  merged = sora_jax.merge(params, config)
  np.testing.assert_allclose(merged["dense"]["kernel"], 1.0 + 2.0)  # s = 1: 1 + sum_r a_r g_r b_r = 1 + (0 + 2)
  np.testing.assert_allclose(merged["proj"]["w"], 1.0 + 3.0)
  np.testing.assert_allclose(sora_jax.merge(pruned, config)["proj"]["w"], merged["proj"]["w"])
  assert set(merged["proj"]) == {"w"}


def test_plain_qwix_lora_tree_reads_as_gate_of_ones():
  params = {"proj": {"w": jnp.zeros((4, 5)), "w_lora_a": jnp.ones((4, 2)), "w_lora_b": jnp.ones((2, 5))}}
  np.testing.assert_allclose(sora_jax.merge(params, sora_jax.SoraRule(rank=2, alpha=4.0))["proj"]["w"], 2.0 * 2)
  assert sora_jax.prune(params)["proj"]["w_lora_a"].shape == (4, 2)  # nothing to cut without a gate
  assert [r.rank for r in sora_jax.rank_report(params, sora_jax.SoraRule(rank=2, alpha=4.0)).rows] == [2]
  with pytest.raises(ValueError, match="no gate"):
    tx = sora_jax.sora_proximal(0.1)
    tx.update(params, tx.init(params), params)


def test_merge_needs_a_matching_rule():
  params = {"proj": {"w": jnp.zeros((4, 5)), "w_lora_a": jnp.ones((4, 2)), "w_lora_b": jnp.ones((2, 5))}}
  with pytest.raises(ValueError, match="module_path matches 'proj'"):
    sora_jax.merge(params, [sora_jax.SoraRule(module_path="attn.*", rank=2, alpha=4.0)])


def test_adamw_mask_from_gate_mask_under_nnx_optimizer(adapted):
  """What nnx.Optimizer hands the transformation (a State of arrays) works with a callable gate mask."""
  model, _ = adapted
  model = nnx.clone(model)
  not_gate = sora_jax.not_gate_mask
  seen = []

  def spy(updates, state, params=None):
    seen.append(type(params))
    return updates, state

  tx = optax.chain(
    optax.adamw(0.1, mask=not_gate),
    optax.GradientTransformation(lambda p: optax.EmptyState(), spy),
    sora_jax.sora_proximal(0.5, learning_rate=0.1),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  assert seen == [nnx.State]
  # B starts at zero, so the gates' gradient is zero: only the proximal step moves them, S_0.05(1) = 0.95 exactly;
  # adamw's default weight decay (1e-4) would have moved them by 1e-5 had the mask not excluded them.
  for layer in model.layers:
    np.testing.assert_allclose(layer.kernel_lora_gate[...], [0.95, 0.95], rtol=0, atol=1e-7)


@pytest.mark.parametrize("layout_name", ["linen", "qwix"])
def test_bf16_merge_and_prune_round_once(layout_name):
  """merge and prune compute in float32 and cast once: each bf16 result is the float64 answer rounded once."""
  rng = np.random.default_rng(0)
  w, a, b = rng.normal(size=(16, 12)), rng.normal(size=(16, 4)), rng.normal(size=(4, 12))
  gate = np.asarray([1.3, 0.0, -0.7, 0.2])
  names = (
    ("kernel", "sora_a", "sora_b", "sora_gate")
    if layout_name == "linen"
    else ("kernel", "kernel_lora_a", "kernel_lora_b", "kernel_lora_gate")
  )
  bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  params = {"m": {n: bf16(v) for n, v in zip(names, (w, a, b, gate))}}
  f64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  w, a, b, gate = (f64(params["m"][n]) for n in names)
  config = (
    sora_jax.SoraConfig(rank=4, alpha=2.0, targets=(r"m/kernel",))
    if layout_name == "linen"
    else (sora_jax.SoraRule(rank=4, alpha=2.0))
  )
  exact = w + 0.5 * (a * gate) @ b
  merged = f64(sora_jax.merge(params, config)["m"]["kernel"])
  assert np.max(np.abs(merged - exact) / np.abs(exact)) <= 2.0**-8
  pruned = sora_jax.prune(params)["m"]
  folded = (gate[:, None] * b)[gate != 0]
  np.testing.assert_array_equal(f64(pruned[names[1]]), a[:, gate != 0])
  assert np.max(np.abs(f64(pruned[names[2]]) - folded) / np.abs(folded)) <= 2.0**-8
