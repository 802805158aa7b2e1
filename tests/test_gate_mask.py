"""The one gate walker: `sora_jax.gate_mask` / `not_gate_mask` give, for every kind of params (linen dicts, a
FrozenDict, an `nnx.State` of Variables or of arrays, a pure dict, a tuple of trees, an optax state, the params with
`optax.MaskedNode`s that `optax.masked` hands its inner transform), a bool tree of that kind and structure, the two
are complements, and the gate steps read the same mask on each kind."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import sora_jax

from conftest import tiny_adapted_nnx


class Dense2(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.Dense(5, name="hidden")(x))


def _linen():
  x = jnp.ones((1, 4))
  config = sora_jax.SoraConfig(rank=2, alpha=2.0, targets=(r".*/kernel",))
  return sora_jax.init(jax.random.key(1), Dense2().init(jax.random.key(0), x)["params"], config)


def _nnx_model():
  return tiny_adapted_nnx()[0]


@functools.cache
def _kinds():
  """name -> (params, number of gate leaves)."""
  linen = _linen()
  state = nnx.state(_nnx_model())
  pure = nnx.to_pure_dict(state)
  seen = []  # what optax.masked hands its inner transform: the params with MaskedNodes at the leaves left out
  spy = optax.GradientTransformation(lambda p: seen.append(p) or optax.EmptyState(), lambda u, s, p=None: (u, s))
  optax.masked(spy, sora_jax.adapter_mask).init(linen)
  return {
    "linen": (linen, 2),
    "frozen": (FrozenDict(linen), 2),
    "state": (state, 2),
    "arrays": (nnx.as_pure(state), 2),
    "pure": (pure, 2),
    "tuple": ((linen, pure), 4),
    "adam_state": (optax.adam(0.1).init(linen)[0], 4),  # ScaleByAdamState(count, mu, nu): mu and nu are trees
    "seen_by_masked": (seen[0], 2),
  }


@pytest.mark.parametrize("kind", list(_kinds()))
def test_masks_have_the_kind_of_params_and_are_complements(kind):
  params, n_gates = _kinds()[kind]
  gates, others = sora_jax.gate_mask(params), sora_jax.not_gate_mask(params)
  for mask in (gates, others):
    assert type(mask) is type(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)  # Variables stay Variables, MaskedNodes stay
    assert all(isinstance(v, bool) for v in jax.tree.leaves(mask))
  # by name: True exactly at the gates, and the complement everywhere
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  flags, complement = jax.tree.leaves(gates), jax.tree.leaves(others)
  assert [p for p, g in zip(paths, flags) if g] == [p for p in paths if "sora_gate" in p or "lora_gate" in p]
  assert sum(flags) == n_gates and [not g for g in flags] == complement


def test_variables_keep_their_type_in_the_mask():
  state = nnx.state(_nnx_model())
  for mask in (sora_jax.gate_mask(state), sora_jax.not_gate_mask(state)):
    flat = dict(nnx.to_flat_state(mask))
    assert type(flat[("layers", 0, "kernel_lora_gate")]) is sora_jax.SoraGate
    assert type(flat[("layers", 1, "kernel")]) is nnx.Param


def test_the_gate_steps_read_a_tuple_of_trees():
  """sora_proximal, retained_fraction and gate_l1_penalty on (linen params, pure dict): each tree's gates found."""
  linen, pure = _linen(), nnx.to_pure_dict(nnx.state(_nnx_model()))
  linen["hidden"]["sora_gate"] = jnp.array([0.0, 2.0])
  params = (linen, pure)
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = sora_jax.sora_proximal(0.5, learning_rate=0.2)
  new = jax.jit(lambda p: optax.apply_updates(p, tx.update(grads, tx.init(p), p)[0]))(params)
  np.testing.assert_allclose(new[0]["hidden"]["sora_gate"], [0.0, 1.9])
  np.testing.assert_allclose(new[1]["layers"][1]["kernel_lora_gate"], [0.9, 0.9])
  np.testing.assert_array_equal(new[0]["hidden"]["sora_a"], linen["hidden"]["sora_a"])
  # costs per gate entry: hidden 4 + 5, out 5 + 3, layers/0 4 + 3, layers/1 3 + 2; one entry of hidden is off
  total = 2 * (9 + 8 + 7 + 5)
  fraction, penalty = jax.jit(lambda p: (sora_jax.retained_fraction(p), sora_jax.gate_l1_penalty(p)))(params)
  np.testing.assert_allclose(float(fraction), (total - 9) / total, rtol=1e-6)
  np.testing.assert_allclose(float(penalty), (2 + 2 + 4) / 8, rtol=1e-6)


def test_the_recipe_under_nnx_optimizer_keeps_adamw_off_the_gates():
  """sora_optimizer (optax.masked with the complement of the walker's mask) under nnx.Optimizer: init sees a State of
  Variables, update a State of arrays; AdamW holds no moments for the gates and its weight decay never moves them."""
  model = _nnx_model()
  tx = sora_jax.sora_optimizer(0.1, lam=0.5, optimizer=optax.adamw(0.1, weight_decay=0.5))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  adam = optimizer.opt_state.optimizer.inner_state[0]
  moments = {path[-1]: len(jax.tree.leaves(v)) for path, v in nnx.to_flat_state(nnx.state(adam.mu))}
  assert moments == {"kernel_lora_a": 1, "kernel_lora_b": 1, "kernel_lora_gate": 0}  # the gates': a MaskedNode

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  # B starts at zero, so the gates' gradient is zero: the gate step alone moves them, S_{0.05}(1) = 0.95.
  for layer in model.layers:
    np.testing.assert_allclose(layer.kernel_lora_gate[...], [0.95, 0.95], rtol=0, atol=1e-7)
