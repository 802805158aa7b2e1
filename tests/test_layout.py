"""Self-describing adapters: every tree function reads an adapter from the tree plus the rules.

Shape contract per op (qwix's LoRA layout, our gate), the convention and its recorded exceptions, and NNX models
beyond a stack of Linears (an attention block, LinearGeneral with several feature axes and with a batch axis, Conv +
Linear under mixed rules, nnx.List / nnx.Dict, a weight contracted on its last axis), each checked against qwix's own
LoRA and run through every tree function with a provider built afresh.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

import sora_jax
from sora_jax import layout
from sora_jax import sharding

RANK, ALPHA = 2, 4.0


@pytest.mark.parametrize(
  "roles, w_shape, a, b, gate, recorded",
  [
    # nnx.Linear (in, out): 'x @ W'
    (layout.dot_roles((((1,), (0,)), ((), ())), 2), (6, 5), (6, 2), (2, 5), (2,), False),
    # the same square kernel contracted on its last axis: 'x @ W.T' needs the record
    (layout.dot_roles((((1,), (1,)), ((), ())), 2), (4, 4), (4, 2), (2, 4), (2,), True),
    # LinearGeneral (2, 3) -> (7,): two contracting axes flattened in A
    (layout.dot_roles((((1, 2), (0, 1)), ((), ())), 3), (2, 3, 7), (6, 2), (2, 7), (2,), False),
    # LinearGeneral with a batch axis: kernel (n, in, out)
    (layout.dot_roles((((2,), (1,)), ((1,), (0,))), 3), (3, 4, 5), (3, 4, 2), (3, 2, 5), (3, 2), False),
    # einsum 'bnd,ndh->bnh': n batch, d contracting, h remaining
    (layout.einsum_roles("bnd", "ndh", "bnh"), (3, 7, 4), (3, 7, 2), (2, 4), (3, 2), False),
    # einsum '...d,vd->...v' with v = d (a tied output embedding)
    (layout.einsum_roles("bd", "vd", "bv"), (5, 5), (5, 2), (2, 5), (2,), True),
    # qwix's conv LoRA on a (width, in, out) kernel
    (layout.conv_roles(3), (3, 2, 8), (3, 2, 2), (2, 8), (2,), False),
  ],
)
def test_shape_contract_and_record(roles, w_shape, a, b, gate, recorded):
  assert roles.shapes(w_shape, RANK) == (a, b, gate)
  assert layout.needs_record(roles, w_shape, RANK, gated=True) == recorded
  read = layout.read_roles("w", w_shape, a, b, gate, layout.encode(roles) if recorded else None)
  assert read.canonical(w_shape, True) == roles.canonical(w_shape, True)
  assert layout.decode(layout.encode(roles)) == roles


# --- models beyond a stack of Linears -------------------------------------------------------------------------------


class Attention(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)

  def __call__(self, x):
    return self.attn(x)


class Features(nnx.Module):
  """LinearGeneral over two input axes to two output axes, then one with a batch axis n: kernel (n, in, out)."""

  def __init__(self, rngs):
    self.multi = nnx.LinearGeneral((2, 4), (3, 5), axis=(-2, -1), rngs=rngs)
    self.batched = nnx.LinearGeneral(5, 6, axis=-1, batch_axis={0: 2}, rngs=rngs)

  def __call__(self, x):
    return self.batched(self.multi(x))


class ConvLinear(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 8, kernel_size=(3,), rngs=rngs)
    self.lin = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return self.lin(self.conv(x))


class Containers(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 6, rngs=rngs)])
    self.heads = nnx.Dict({"first": nnx.Linear(6, 4, rngs=rngs), "second": nnx.Linear(6, 4, rngs=rngs)})

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return self.heads["first"](x) * self.heads["second"](x)


class Tied(nnx.Module):
  """A square weight used as W (in, out) and as W.T: the second use contracts W's last axis (a recorded exception)."""

  def __init__(self, rngs):
    self.proj = nnx.Linear(8, 8, rngs=rngs)
    self.unembed = nnx.Param(jax.random.normal(rngs.params(), (8, 8)) / 3)

  def __call__(self, x):
    return jnp.einsum("bd,vd->bv", jnp.tanh(self.proj(x)), self.unembed[...])


def _waves(phase):
  """A deterministic initializer made on host: no random-bit kernels to compile per leaf shape (keeps tests fast)."""
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(
    0.5 * np.sin(np.arange(int(np.prod(shape))) * 1.7 + phase).reshape(shape), dtype
  )


def _rules(sora_path, lora_path=None):
  inits = dict(lora_a_initializer=_waves(0.0), lora_b_initializer=_waves(1.0))
  rules = [sora_jax.SoraRule(module_path=sora_path, rank=RANK, alpha=ALPHA, **inits)]
  if lora_path:
    rules.append(qwix.LoraRule(module_path=lora_path, rank=RANK, alpha=ALPHA, **inits))
  return rules


MODELS = {
  "attention": (Attention, (2, 5, 8), _rules(".*")),
  "features": (Features, (2, 3, 2, 4), _rules(".*")),
  "conv+linear": (ConvLinear, (2, 6, 2), _rules("lin", "conv")),
  "containers": (Containers, (3, 8), _rules(".*")),
  "tied": (Tied, (3, 8), _rules(".*")),
}


def _adapted(name):
  cls, shape, rules = MODELS[name]
  x = jax.random.normal(jax.random.key(3), shape)
  model = sora_jax.apply_sora(cls(nnx.Rngs(0)), sora_jax.SoraProvider(rules), x, rngs=nnx.Rngs(1))
  return cls, x, model, rules


def _check_equals_qwix_lora(cls, x, model, rules):
  """At gates one the adapted model equals qwix's own LoRA with the same rngs (same A and B)."""
  lora_rules = [
    qwix.LoraRule(
      module_path=r.module_path,
      rank=r.rank,
      alpha=r.alpha,
      lora_a_initializer=r.lora_a_initializer,
      lora_b_initializer=r.lora_b_initializer,
    )
    for r in rules
  ]
  lora = qwix.apply_lora_to_model(cls(nnx.Rngs(0)), qwix.LoraProvider(lora_rules), x, rngs=nnx.Rngs(1))
  factors = lambda m: {
    p: v for p, v in nnx.to_flat_state(nnx.state(m, nnx.LoRAParam)) if not isinstance(v, sora_jax.SoraGate)
  }
  assert jax.tree.map(jnp.shape, factors(model)) == jax.tree.map(jnp.shape, factors(lora))
  np.testing.assert_allclose(model(x), lora(x), rtol=1e-5, atol=1e-5)


def _set_gates(model, seed=5):
  """Random gates with about half the entries exactly zero."""
  gates = dict(nnx.to_flat_state(nnx.state(model, sora_jax.SoraGate)))
  rng = np.random.default_rng(seed)
  for gate in gates.values():
    value = rng.normal(size=gate.shape) * (rng.uniform(size=gate.shape) < 0.5)
    value.reshape(-1, gate.shape[-1])[:, 0] = 1.5  # per entry: the first rank on, the last off
    value.reshape(-1, gate.shape[-1])[:, -1] = 0.0
    gate.set_value(jnp.asarray(value, jnp.float32))
  nnx.update(model, nnx.from_flat_state(gates))


def _load(model, pure):
  """`model` with the arrays of a pure dict (e.g. restored from a checkpoint) put in."""
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_equals_qwix_lora_and_tree_functions_with_a_fresh_provider(name):
  cls, x, model, rules = _adapted(name)
  _check_equals_qwix_lora(cls, x, model, rules)
  _set_gates(model)
  y = model(x)
  state = nnx.to_pure_dict(nnx.state(model))  # no metadata, no provider memory: only the tree
  fresh = sora_jax.SoraProvider(_rules(*[r.module_path for r in rules]))
  report = sora_jax.rank_report(state, fresh)
  assert report.rows and report.retained_params < report.max_params
  pruned = sora_jax.prune(state, fresh)
  np.testing.assert_allclose(_load(nnx.clone(model), pruned)(x), y, rtol=1e-4, atol=1e-4)
  assert sora_jax.rank_report(pruned, fresh).retained_params == report.retained_params
  merged = sora_jax.merge(state, fresh)
  np.testing.assert_allclose(_load(cls(nnx.Rngs(0)), merged)(x), y, rtol=1e-4, atol=1e-4)
  restored = sora_jax.unmerge(merged, state, fresh)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4), restored, state)
  specs = sharding.param_specs(state, jax.make_mesh((1, 1, 1), sharding.AXES), min_size=0)
  assert len(jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))) == len(
    jax.tree.leaves(state)
  )


def test_tied_weight_is_recorded_and_survives_a_pure_dict():
  _, x, model, _ = _adapted("tied")
  state = nnx.state(model)
  assert isinstance(state["unembed_lora_axes"], sora_jax.SoraAxes)
  assert "kernel_lora_axes" not in state["proj"]  # the convention reads nnx.Linear
  assert not any(isinstance(v, sora_jax.SoraAxes) for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  pure = nnx.to_pure_dict(state)
  roles = layout.decode(pure["unembed_lora_axes"])
  assert (roles.contract, roles.remain) == ((1,), (0,))
  # Without the record the convention reads the weight as (in, out): a different (wrong) delta.
  rule = sora_jax.SoraRule(rank=RANK, alpha=ALPHA)
  without = {k: v for k, v in pure.items() if k != "unembed_lora_axes"}
  assert not np.allclose(sora_jax.merge(pure, rule)["unembed"], sora_jax.merge(without, rule)["unembed"])


# --- train, checkpoint with orbax, read back in a new process with a provider built afresh --------------------------


class Square(nnx.Module):
  """Square kernels: (in, out) or (out, in) cannot be told from the shapes, so the convention decides."""

  def __init__(self, rngs):
    self.up, self.down = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


class Naming:
  """The least a qwix-layout `save_peft` needs: module names and input axes of the weights."""

  model_type = "square"

  def module_name(self, weight):
    return f"model.{weight[0]}" if weight[-1] == "kernel" else None

  def in_axes(self, weight):
    return 1


def tree_results(tree, provider, directory):
  """What the tree functions say about `tree`: rank report, merged and pruned arrays, the PEFT file."""
  from safetensors.numpy import load_file

  report = sora_jax.rank_report(tree, provider)
  merged = sora_jax.merge(tree, provider)
  pruned = sora_jax.prune(tree, provider)
  ranks = sora_jax.save_peft(directory, tree, provider, naming=Naming())
  # An orbax dict without a target keeps its 'value' level in the results: compare without it.
  flat = lambda t: {
    jax.tree_util.keystr(k, simple=True, separator="/").removesuffix("/value"): np.asarray(v)
    for k, v in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(t) if isinstance(t, nnx.State) else t)[0]
  }
  return (
    str(report),
    flat(merged),
    flat(pruned),
    ranks,
    {k: np.asarray(v) for k, v in load_file(f"{directory}/adapter_model.safetensors").items()},
  )


_RESTORE_SCRIPT = r"""
import json, sys
import numpy as np, orbax.checkpoint as ocp, qwix
sys.path.insert(0, sys.argv[3])
import sora_jax
from test_layout import tree_results
restored = ocp.StandardCheckpointer().restore(sys.argv[1])    # no target: a plain dict with 'value' levels
provider = sora_jax.SoraProvider(module_path="up|down", rank=2, alpha=4.0)
report, merged, pruned, ranks, peft = tree_results(restored, provider, sys.argv[2] + "/peft")
np.savez(sys.argv[2] + "/out.npz", **{"merged/" + k: v for k, v in merged.items()},
         **{"pruned/" + k: v for k, v in pruned.items()}, **{"peft/" + k: v for k, v in peft.items()})
json.dump({"report": report, "ranks": ranks}, open(sys.argv[2] + "/out.json", "w"))
"""


@pytest.mark.slow
def test_orbax_checkpoint_read_in_a_new_process_with_a_fresh_provider(tmp_path):
  import json
  import os
  import subprocess
  import sys

  import optax
  import orbax.checkpoint as ocp

  x = jax.random.normal(jax.random.key(0), (32, 8))
  y = jnp.sin(x)
  provider = sora_jax.SoraProvider(module_path="up|down", rank=2, alpha=4.0)
  model = sora_jax.apply_sora(Square(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
  not_gate = sora_jax.not_gate_mask
  tx = optax.chain(optax.adamw(5e-2, mask=not_gate), sora_jax.sora_proximal(0.5, learning_rate=5e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: ((m(x) - y) ** 2).mean(), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)

  for _ in range(8):
    step(model, optimizer)
  model.up.kernel_lora_gate[...] = model.up.kernel_lora_gate[...].at[0].set(0.0)  # one rank switched off
  state = nnx.state(model)
  gates = np.concatenate([np.ravel(g[...]) for _, g in nnx.to_flat_state(nnx.state(model, sora_jax.SoraGate))])
  assert (gates == 0).any() and (gates != 0).any()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  report, merged, pruned, ranks, peft = tree_results(state, provider, str(tmp_path / "peft_here"))

  env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  subprocess.run(
    [sys.executable, "-c", _RESTORE_SCRIPT, str(tmp_path / "ckpt"), str(tmp_path), tests_dir],
    check=True,
    env=env,
    timeout=300,
  )
  other = json.load(open(tmp_path / "out.json"))
  arrays = np.load(tmp_path / "out.npz")
  assert other["report"] == report and other["ranks"] == ranks
  for prefix, mine in (("merged/", merged), ("pruned/", pruned), ("peft/", peft)):
    theirs = {k[len(prefix) :]: arrays[k] for k in arrays.files if k.startswith(prefix)}
    assert set(theirs) == set(mine), prefix
    for k in mine:
      np.testing.assert_array_equal(theirs[k], mine[k], err_msg=prefix + k)
