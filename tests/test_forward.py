"""Factored forward vs merge-then-apply on a small BERT-shaped linen encoder, unrolled and nn.scan-stacked."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sora_jax

HIDDEN, LAYERS, HEADS = 16, 2, 2
TARGETS = (r".*/(query|key|value|output|intermediate|ffn_out)/kernel",)


class Block(nn.Module):
  """One BERT layer: q/k/v/o attention and a two-layer FFN, post-LayerNorm."""

  @nn.compact
  def __call__(self, x, _=None):
    q = nn.Dense(HIDDEN, name="query")(x)
    k = nn.Dense(HIDDEN, name="key")(x)
    v = nn.Dense(HIDDEN, name="value")(x)
    split = lambda t: t.reshape(t.shape[:-1] + (HEADS, HIDDEN // HEADS))
    att = nn.dot_product_attention(split(q), split(k), split(v)).reshape(x.shape)
    x = nn.LayerNorm(name="attention_norm")(x + nn.Dense(HIDDEN, name="output")(att))
    h = nn.gelu(nn.Dense(2 * HIDDEN, name="intermediate")(x))
    return nn.LayerNorm(name="output_norm")(x + nn.Dense(HIDDEN, name="ffn_out")(h)), None


class Encoder(nn.Module):
  scan: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    block = nn.remat(Block) if self.remat else Block
    if self.scan:
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=LAYERS)
      x, _ = stack(name="layer")(x, None)
    else:
      for i in range(LAYERS):
        x, _ = block(name=f"layer_{i}")(x)
    return nn.Dense(3, name="classifier")(x[:, 0])


def _setup(scan, remat, gate_init="normal", dropout=0.0):
  model = Encoder(scan=scan, remat=remat)
  x = jax.random.normal(jax.random.key(0), (2, 5, HIDDEN))
  params = model.init(jax.random.key(1), x)["params"]
  config = sora_jax.SoraConfig(
    rank=4, alpha=8.0, targets=TARGETS, gate_init=gate_init, dropout=dropout, stacked=r"layer/.*" if scan else None
  )
  params = sora_jax.init(jax.random.key(2), params, config)
  # B starts at zero; give it values so the adapter path is exercised.
  params = jax.tree_util.tree_map_with_path(
    lambda path, v: 0.3 * jax.random.normal(jax.random.key(len(path)), v.shape) if path[-1].key == "sora_b" else v,
    params,
  )
  return model, x, params, config


@pytest.mark.parametrize("scan,remat", [(False, False), (True, False), (True, True)])
def test_factored_matches_merged_forward_and_grads(scan, remat):
  model, x, params, config = _setup(scan, remat)
  trainable, frozen = sora_jax.split(params)
  probe = jax.random.normal(jax.random.key(9), (2, 3))

  def loss_factored(t):
    with sora_jax.factored(config):
      out = model.apply({"params": sora_jax.combine(t, frozen)}, x)
    return jnp.sum(probe * out), out

  def loss_merged(t):
    out = model.apply({"params": sora_jax.merge(sora_jax.combine(t, frozen), config)}, x)
    return jnp.sum(probe * out), out

  (_, out_f), grad_f = jax.jit(jax.value_and_grad(loss_factored, has_aux=True))(trainable)
  (_, out_m), grad_m = jax.jit(jax.value_and_grad(loss_merged, has_aux=True))(trainable)
  assert float(jnp.abs(out_f - out_m).max()) <= 1e-5
  chex.assert_trees_all_close(grad_f, grad_m, atol=1e-5, rtol=1e-4)
  # The adapter leaves do receive gradient, and the gradient tree holds nothing but adapters.
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grad_f))
  assert set(p[-1].key for p, _ in jax.tree_util.tree_leaves_with_path(grad_f)) == {"sora_a", "sora_b", "sora_gate"}


def test_adapter_forward_matches_numpy():
  """One Dense layer: y = x W + b + s ((x A) * g) B."""
  model = nn.Dense(6)
  x = np.random.RandomState(0).randn(3, 5).astype(np.float32)
  params = model.init(jax.random.key(0), x)["params"]
  config = sora_jax.SoraConfig(rank=3, alpha=6.0, targets=("kernel",), gate_init="normal")
  params = sora_jax.init(jax.random.key(1), params, config)
  params["sora_b"] = jnp.asarray(np.random.RandomState(1).randn(3, 6), jnp.float32)
  p = jax.tree.map(np.asarray, params)
  want = x @ p["kernel"] + p["bias"] + 2.0 * ((x @ p["sora_a"]) * p["sora_gate"]) @ p["sora_b"]
  got = sora_jax.apply_factored(model, {"params": params}, x, config=config)
  np.testing.assert_allclose(got, want, atol=1e-5)
  with sora_jax.factored(config):  # nothing leaks outside the context
    pass
  np.testing.assert_allclose(model.apply({"params": params}, x), x @ p["kernel"] + p["bias"], atol=1e-5)


class Heads(nn.Module):
  """Multi-axis kernels: (hidden, heads, head_dim) in, (heads, head_dim, hidden) out."""

  @nn.compact
  def __call__(self, x):
    h = nn.DenseGeneral((HEADS, 4), name="qkv")(x)
    return nn.DenseGeneral(HIDDEN, axis=(-2, -1), name="out")(jnp.tanh(h))


def test_dense_general_multi_axis():
  model = Heads()
  x = jax.random.normal(jax.random.key(0), (2, 3, HIDDEN))
  params = model.init(jax.random.key(1), x)["params"]
  base = dict(params)
  config_q = sora_jax.SoraConfig(rank=2, targets=("qkv/kernel",), in_axes=1)
  config_o = sora_jax.SoraConfig(rank=2, targets=("out/kernel",), in_axes=2)
  params = sora_jax.init(jax.random.key(2), params, config_q)
  params = sora_jax.init(jax.random.key(3), params, config_o)
  assert params["qkv"]["sora_a"].shape == (HIDDEN, 2) and params["qkv"]["sora_b"].shape == (2, HEADS, 4)
  assert params["out"]["sora_a"].shape == (HEADS, 4, 2) and params["out"]["sora_b"].shape == (2, HIDDEN)
  params = jax.tree_util.tree_map_with_path(
    lambda path, v: jax.random.normal(jax.random.key(7), v.shape) if path[-1].key == "sora_b" else v, params
  )
  with sora_jax.factored(config_q):  # both configs share the scale alpha / rank
    out_f = model.apply({"params": params}, x)
  out_m = model.apply({"params": sora_jax.merge(params, config_q)}, x)
  assert float(jnp.abs(out_f - out_m).max()) <= 1e-5
  assert float(jnp.abs(out_f - model.apply({"params": base}, x)).max()) > 1e-3


def test_dropout_draws_from_dropout_stream():
  model, x, params, _ = _setup(scan=True, remat=False)
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=TARGETS, dropout=0.5, stacked=r"layer/.*")

  @functools.partial(jax.jit, static_argnums=0)
  def apply(det, key):
    return sora_jax.apply_factored(
      model, {"params": params}, x, config=config, adapter_deterministic=det, rngs={"dropout": key}
    )

  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(apply(True, k1), apply(True, k2))
  np.testing.assert_array_equal(apply(False, k1), apply(False, k1))
  assert float(jnp.abs(apply(False, k1) - apply(False, k2)).max()) > 0
  with pytest.raises(Exception, match="dropout"):  # no 'dropout' rng given
    jax.eval_shape(
      lambda: sora_jax.apply_factored(model, {"params": params}, x, config=config, adapter_deterministic=False)
    )


def test_pruned_tree_runs_factored_and_merged():
  model, x, params, config = _setup(scan=True, remat=False)
  gate = params["layer"]["query"]["sora_gate"]
  params["layer"]["query"]["sora_gate"] = gate.at[0, :3].set(0.0).at[1, 1].set(0.0)
  params["layer"]["key"]["sora_gate"] = jnp.zeros_like(params["layer"]["key"]["sora_gate"])
  pruned = sora_jax.prune(params)
  assert pruned["layer"]["query"]["sora_a"].shape == (LAYERS, HIDDEN, 3)
  assert pruned["layer"]["key"]["sora_a"].shape == (LAYERS, HIDDEN, 0)  # rank 0: zero-size factors, a zero update
  apply = jax.jit(lambda p: sora_jax.apply_factored(model, {"params": p}, x, config=config))
  out, out_pruned = apply(params), apply(pruned)
  assert float(jnp.abs(out - out_pruned).max()) <= 1e-5
  out_merged = jax.jit(model.apply)({"params": sora_jax.merge(pruned, config)}, x)
  assert float(jnp.abs(out - out_merged).max()) <= 1e-5
  # Training on from the pruned tree: the rank-0 module's zero-size factors get zero-size gradients.
  grads = jax.jit(jax.grad(lambda p: jnp.sum(sora_jax.apply_factored(model, {"params": p}, x, config=config))))(pruned)
  assert grads["layer"]["key"]["sora_a"].shape == (LAYERS, HIDDEN, 0)
  assert float(jnp.abs(grads["layer"]["query"]["sora_a"]).max()) > 0


def test_low_rank_product_grads_match_numpy():
  """The hand-written VJP of ((x a) * g) b against the calculus written out in NumPy, for 3-D x."""
  rng = np.random.RandomState(0)
  x, a, g, b = (rng.randn(*s).astype(np.float32) for s in [(2, 5, 6), (6, 3), (3,), (3, 4)])
  dy = rng.randn(2, 5, 4).astype(np.float32)
  y, vjp = jax.vjp(sora_jax.low_rank_product, x, a, g, b)
  dx, da, dg, db = vjp(jnp.asarray(dy))
  h = x @ a
  np.testing.assert_allclose(y, (h * g) @ b, rtol=1e-5, atol=1e-5)
  dz = dy @ b.T
  np.testing.assert_allclose(dx, (dz * g) @ a.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(da, np.einsum("bti,btr->ir", x, dz * g), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dg, np.einsum("btr,btr->r", dz, h), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, np.einsum("btr,bto->ro", h * g, dy), rtol=1e-5, atol=1e-5)


class Transposed(nn.Module):
  """A DenseGeneral contracting a middle axis: x (batch, hidden, seq) -> (batch, seq, out)."""

  @nn.compact
  def __call__(self, x):
    return nn.DenseGeneral((HEADS, 3), axis=1, name="mid")(x)


@pytest.mark.parametrize(
  "model,x_shape,target,in_axes",
  [
    (Heads(), (2, 3, HIDDEN), "qkv/kernel", 1),
    (Heads(), (2, 3, HIDDEN), "out/kernel", 2),
    (Transposed(), (2, HIDDEN, 3), "mid/kernel", 1),
  ],
)
def test_dense_general_grads_match_merged(model, x_shape, target, in_axes):
  x = jax.random.normal(jax.random.key(0), x_shape)
  params = model.init(jax.random.key(1), x)["params"]
  config = sora_jax.SoraConfig(rank=2, targets=(target,), in_axes=in_axes, gate_init="normal")
  params = sora_jax.init(jax.random.key(2), params, config)
  params = jax.tree_util.tree_map_with_path(
    lambda path, v: jax.random.normal(jax.random.key(7), v.shape) if path[-1].key == "sora_b" else v, params
  )
  trainable, frozen = sora_jax.split(params)
  probe = jax.random.normal(jax.random.key(9), jax.eval_shape(lambda: model.apply({"params": params}, x)).shape)

  def loss_factored(t):
    with sora_jax.factored(config):
      return jnp.sum(probe * model.apply({"params": sora_jax.combine(t, frozen)}, x))

  def loss_merged(t):
    return jnp.sum(probe * model.apply({"params": sora_jax.merge(sora_jax.combine(t, frozen), config)}, x))

  np.testing.assert_allclose(loss_factored(trainable), loss_merged(trainable), rtol=1e-5)
  chex.assert_trees_all_close(
    jax.grad(loss_factored)(trainable), jax.grad(loss_merged)(trainable), atol=1e-4, rtol=1e-4
  )
