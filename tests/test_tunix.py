"""SoRA on Tunix's Qwen3 and Llama3 (NNX models, attention weights shaped for einsums such as (d, n, h)) through
the qwix path: `sora_jax.apply_sora` with a `sora_jax.SoraProvider` on the attention and MLP projections.

The models are tiny and random-weight (2 layers, embed 64, 4 query heads of 24, 2 key/value heads, MLP 96), so every
weight axis has its own length and no shape can be read two ways. Tunix initialises the MLP kernels to zeros; with
LoRA's B also zero every MLP adapter would start with zero gradients, so the tests draw those kernels at random.
References: qwix's own LoRA for the forward with gates at one, qwix's own PTQ model for a quantized base (int8, nf4),
the untouched variables before training for the frozen weights, the 1-device step for the 8-device mesh. Training runs
through `nnx.Optimizer(..., wrt=nnx.LoRAParam)` and through Tunix's `PeftTrainer`. The mesh check runs in a subprocess
(`python tests/test_tunix.py --mesh`), because XLA's host device count must be set before JAX starts.

Tunix has no scanned-layer (`nnx.scan`) variant of these models; SoRA under `nnx.scan` is tested on a pure NNX stack
in `tests/test_qwix_provider.py`.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import qwix  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.models.llama3 import model as llama3  # noqa: E402
from tunix.models.qwen3 import model as qwen3  # noqa: E402

import sora_jax  # noqa: E402
from conftest import tiny_tunix_config  # noqa: E402

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
RANK, ALPHA = 4, 8.0
BATCH, SEQ = 4, 12
FAMILIES = {"qwen3": (qwen3.ModelConfig, qwen3.Qwen3), "llama3": (llama3.ModelConfig, llama3.Llama3)}
# Each projection's base weight and its (fan-in axes, fan-out axes) in Tunix's layout.
WEIGHTS = {
  "q_proj": ("w", "DNH"),
  "k_proj": ("w", "DKH"),
  "v_proj": ("w", "DKH"),
  "o_proj": ("w", "NHD"),
  "gate_proj": ("kernel", "DF"),
  "up_proj": ("kernel", "DF"),
  "down_proj": ("kernel", "FD"),
}


def tiny_model(family: str, seed: int = 0, vocab: int = 128) -> nnx.Module:
  """A 2-layer random-weight Tunix model; MLP kernels drawn N(0, 1/fan_in) instead of Tunix's zeros."""
  model = FAMILIES[family][1](tiny_tunix_config(family, vocab_size=vocab), rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 1)
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx.Linear):
      key, sub = jax.random.split(key)
      fan_in = module.kernel.shape[0]
      module.kernel.set_value(jax.random.normal(sub, module.kernel.shape) / np.sqrt(fan_in))
  return model


def lm_inputs(seed: int = 0, batch: int = BATCH, seq: int = SEQ, vocab: int = 128) -> dict:
  """Tunix's causal-LM call arguments: tokens (B, T), positions (B, T), cache None, causal mask (B, T, T)."""
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)
  return {
    "input_tokens": jnp.asarray(tokens),
    "positions": jnp.broadcast_to(jnp.arange(seq), (batch, seq)),
    "cache": None,
    "attention_mask": jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq)),
  }


def logits(model: nnx.Module, inputs: dict) -> jax.Array:
  return model(**inputs)[0]


def lm_loss(model: nnx.Module, inputs: dict) -> jax.Array:
  """Next-token cross-entropy over every position."""
  out = logits(model, inputs)
  return optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], inputs["input_tokens"][:, 1:]).mean()


def sora_provider(**rule) -> sora_jax.SoraProvider:
  return sora_jax.SoraProvider(module_path=TARGETS, rank=RANK, alpha=ALPHA, **rule)


def with_sora(model: nnx.Module, provider: sora_jax.SoraProvider | None = None, seed: int = 1) -> nnx.Module:
  return sora_jax.apply_sora(model, provider or sora_provider(), **lm_inputs(batch=1, seq=4), rngs=nnx.Rngs(seed))


def flat_arrays(model: nnx.Module, *filters) -> dict[str, np.ndarray]:
  """{'/'-joined path: array} of the model's variables (filtered as `nnx.state`)."""
  return {
    "/".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model, *filters))
  }


def set_arrays(model: nnx.Module, arrays: dict[str, np.ndarray]) -> None:
  """Overwrites the named variables, each keeping its dtype and sharding."""
  state = nnx.state(model)
  for path, var in nnx.to_flat_state(state):
    name = "/".join(map(str, path))
    if name in arrays:
      old = var.get_value()
      var.set_value(jax.device_put(np.asarray(arrays[name], old.dtype), old.sharding))
  nnx.update(model, state)


def randomize_b(model: nnx.Module, seed: int, scale: float = 0.2) -> None:
  """B starts at zero (LoRA's init); draw it so that the adapters change the output."""
  rng = np.random.default_rng(seed)
  set_arrays(
    model,
    {
      k: scale * rng.standard_normal(v.shape).astype(np.float32)
      for k, v in flat_arrays(model, nnx.LoRAParam).items()
      if k.endswith("_lora_b")
    },
  )


def sora_optimizer(model: nnx.Module, lr: float, lam: float) -> nnx.Optimizer:
  not_gate = sora_jax.not_gate_mask
  tx = optax.chain(optax.adamw(lr, weight_decay=0.01, mask=not_gate), sora_jax.sora_proximal(lam, learning_rate=lr))
  return nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, inputs: dict) -> jax.Array:
  loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, inputs)
  optimizer.update(model, grads)
  return loss


# --- (a) the adapter tree and the forward --------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_leaves_sit_beside_each_projection_in_qwix_shapes(family):
  model = with_sora(tiny_model(family))
  shapes = {k: v.shape for k, v in flat_arrays(model, nnx.LoRAParam).items()}
  sizes = {"D": 64, "N": 4, "K": 2, "H": 24, "F": 96}
  expected = {}
  for layer in range(2):
    for proj, (weight, axes) in WEIGHTS.items():
      module = f"layers/{layer}/{'mlp' if weight == 'kernel' else 'attn'}/{proj}/{weight}"
      fan_in = axes[:1] if proj != "o_proj" else axes[:2]
      fan_out = axes[len(fan_in) :]
      if weight == "kernel":  # nnx.Linear: lax.dot_general, A (in, r), B (r, out)
        expected[module + "_lora_a"] = (sizes[fan_in], RANK)
        expected[module + "_lora_b"] = (RANK, sizes[fan_out])
      else:  # Tunix Einsum: A keeps the contracted axes, B the free ones
        expected[module + "_lora_a"] = (*(sizes[c] for c in fan_in), RANK)
        expected[module + "_lora_b"] = (RANK, *(sizes[c] for c in fan_out))
      expected[module + "_lora_gate"] = (RANK,)
  assert shapes == expected
  gates = nnx.state(model, sora_jax.SoraGate)
  assert len(jax.tree.leaves(gates)) == 14 and all(np.all(np.asarray(g) == 1.0) for g in jax.tree.leaves(gates))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gates_at_one_equal_qwix_lora_with_the_same_factors(family):
  base = tiny_model(family)
  inputs = lm_inputs(seed=3)
  sora = with_sora(base)
  randomize_b(sora, seed=4)
  lora = qwix.apply_lora_to_model(
    base, qwix.LoraProvider(module_path=TARGETS, rank=RANK, alpha=ALPHA), **lm_inputs(batch=1, seq=4), rngs=nnx.Rngs(7)
  )
  factors = {k: v for k, v in flat_arrays(sora, nnx.LoRAParam).items() if not k.endswith("_lora_gate")}
  assert set(factors) == set(flat_arrays(lora, nnx.LoRAParam))
  set_arrays(lora, factors)
  want, got = np.asarray(logits(lora, inputs)), np.asarray(logits(sora, inputs))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  assert np.abs(got - np.asarray(logits(base, inputs))).max() > 1e-2  # the adapters do change the output


# --- (b) training drives gates to exact zeros, base frozen ---------------------------------------------------------


def _train(family: str, steps: int, lam: float, lr: float = 2e-2):
  base, provider = tiny_model(family), sora_provider()
  model = with_sora(base, provider)
  before = flat_arrays(model)
  optimizer = sora_optimizer(model, lr, lam)
  inputs = lm_inputs(seed=5)
  losses = [float(train_step(model, optimizer, inputs)) for _ in range(steps)]
  return base, provider, model, before, losses


@pytest.fixture(scope="module")
def trained():
  """`trained(family)`: (base, provider, SoRA model, its variables before training, losses) after 30 steps at lam 2,
  computed once per family for the tests below (which do not modify it)."""
  runs = {}

  def get(family: str):
    if family not in runs:
      runs[family] = _train(family, steps=30, lam=2.0)
    return runs[family]

  return get


def _check_trained(model, before, losses):
  after = flat_arrays(model)
  frozen = [k for k in before if k.rsplit("/", 1)[-1].split("_lora_")[-1] not in ("a", "b", "gate")]
  assert frozen and all(np.array_equal(before[k], after[k]) for k in frozen)  # bitwise
  gates = np.concatenate([after[k].ravel() for k in after if k.endswith("_lora_gate")])
  assert (gates == 0.0).sum() >= 1, gates
  for suffix in ("_lora_a", "_lora_b"):
    changed = [not np.array_equal(before[k], after[k]) for k in after if k.endswith(suffix)]
    assert any(changed), suffix
  assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_proximal_steps_zero_gates_train_factors_and_leave_base_bitwise(family, trained):
  _, _, model, before, losses = trained(family)
  _check_trained(model, before, losses)


@pytest.mark.slow
def test_tunix_peft_trainer_trains_sora_gates_to_zero():
  from tunix.sft import peft_trainer

  model = with_sora(tiny_model("qwen3"))
  before = flat_arrays(model)
  lr, lam, steps = 2e-2, 2.0, 30
  not_gate = sora_jax.not_gate_mask
  tx = optax.chain(optax.adamw(lr, weight_decay=0.01, mask=not_gate), sora_jax.sora_proximal(lam, learning_rate=lr))
  trainer = peft_trainer.PeftTrainer(
    model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**6, max_steps=steps, pbar_description=None)
  )
  inputs = lm_inputs(seed=5)
  batch = {
    "input_tokens": inputs["input_tokens"],
    "input_mask": jnp.ones((BATCH, SEQ), bool),
    "positions": inputs["positions"],
    "attention_mask": inputs["attention_mask"],
  }
  first = float(lm_loss(model, inputs))
  trainer.train([batch] * steps)  # Tunix's own loss, jitted step and nnx.Optimizer(wrt=nnx.LoRAParam)
  assert trainer.train_steps == steps
  _check_trained(model, before, [first, float(lm_loss(model, inputs))])


# --- (c) prune and merge keep the logits ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_and_merge_give_the_trained_logits(family, trained):
  base, provider, model, _, _ = trained(family)
  inputs = lm_inputs(seed=6)
  want = np.asarray(logits(model, inputs))
  state = nnx.state(model)
  gates = {k: v for k, v in flat_arrays(model).items() if k.endswith("_lora_gate")}
  pruned = sora_jax.prune(state, provider)
  flat = {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(pruned)}
  for gate_path, gate in gates.items():  # rank = number of nonzero gates; the folded gate reads 1
    a = flat[gate_path.replace("_lora_gate", "_lora_a")]
    assert a.shape[-1] == (gate != 0).sum() and np.all(flat[gate_path] == 1.0), gate_path
  assert sum(a.shape[-1] for k, a in flat.items() if k.endswith("_lora_a")) < 14 * RANK
  np.testing.assert_allclose(
    np.asarray(logits(nnx.merge(nnx.graphdef(model), pruned), inputs)), want, atol=1e-5, rtol=1e-5
  )
  merged = sora_jax.merge(state, provider)
  assert not any("_lora_" in "/".join(map(str, k)) for k, _ in nnx.to_flat_state(merged))
  plain = nnx.clone(base)
  nnx.update(plain, merged)
  np.testing.assert_allclose(np.asarray(logits(plain, inputs)), want, atol=1e-5, rtol=1e-5)


# --- SoRA on a quantized base (qwix's QLoRA) ------------------------------------------------------------------------

MLP, ATTENTION = r".*/mlp/(gate_proj|up_proj|down_proj)", r".*/attn/(q_proj|k_proj|v_proj|o_proj)"
# (family, qtype) -> rules as (module_path, quantized). Tunix's Qwen3 Einsum casts its weight with jnp.astype, which
# fails on qwix's quantized weight (TypeError: astype requires ndarray or scalar arguments, got <class
# 'qwix._src.providers.ptq.WithAux'>), so on Qwen3 only the MLP (nnx.Linear) is quantized; Llama3's Einsum does not
# cast, so all seven of its projections are.
QUANTIZED = {
  ("qwen3", "int8"): [(MLP, True), (ATTENTION, False)],
  ("qwen3", "nf4"): [(MLP, True), (ATTENTION, False)],
  ("llama3", "int8"): [(TARGETS, True)],
}


def base_weight_bytes(model: nnx.Module, module_path: str) -> int:
  """Bytes of the base weights of the projections that `module_path` matches, as stored (quantized: values and
  scales; JAX counts a 4-bit value as one byte)."""
  total = 0
  for key, value in flat_arrays(model).items():
    parts = key.split("/")
    for i, part in enumerate(parts):
      weight_here = part in WEIGHTS and parts[i + 1 : i + 2] == [WEIGHTS[part][0]]
      if weight_here and re.fullmatch(module_path, "/".join(parts[: i + 1])):
        total += value.nbytes
  return total


@pytest.mark.parametrize("family,qtype", sorted(QUANTIZED))
def test_sora_on_a_quantized_base_trains_zeroes_gates_and_prunes(family, qtype):
  rules = [
    sora_jax.SoraRule(module_path=path, rank=RANK, alpha=ALPHA, weight_qtype=qtype if quantized else None)
    for path, quantized in QUANTIZED[family, qtype]
  ]
  provider = sora_jax.SoraProvider(rules)
  base = tiny_model(family)
  model = with_sora(base, provider)
  stored = {k: v.dtype for k, v in flat_arrays(model).items() if k.endswith("/qvalue")}
  want_dtype = {"int8": jnp.int8, "nf4": jnp.uint4}[qtype]
  assert len(stored) == 2 * sum(len(path.split("|")) for path, q in QUANTIZED[family, qtype] if q) and all(
    dtype == want_dtype for dtype in stored.values()
  ), stored
  for path, quantized in QUANTIZED[family, qtype]:  # int8 values and float32 scales: ~0.27 of float32
    assert (base_weight_bytes(model, path) < 0.3 * base_weight_bytes(base, path)) == quantized, path
  inputs = lm_inputs(seed=5)
  # gates at one and B = 0: the quantized model is qwix's own quantized base (PTQ) to the last bit
  ptq = qwix.quantize_model(
    base,
    qwix.PtqProvider(
      [qwix.QuantizationRule(module_path=path, weight_qtype=qtype) for path, q in QUANTIZED[family, qtype] if q]
    ),
    **lm_inputs(batch=1, seq=4),
  )
  np.testing.assert_array_equal(np.asarray(logits(model, inputs)), np.asarray(logits(ptq, inputs)))
  before = flat_arrays(model)
  optimizer = sora_optimizer(model, 2e-2, 2.0)
  losses = [float(train_step(model, optimizer, inputs)) for _ in range(30)]
  _check_trained(model, before, losses)  # quantized values and scales bitwise unchanged
  want = np.asarray(logits(model, inputs))
  pruned = nnx.merge(nnx.graphdef(model), sora_jax.prune(nnx.state(model), provider))
  np.testing.assert_allclose(np.asarray(logits(pruned, inputs)), want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="quantized"):
    sora_jax.merge(nnx.state(model), provider)


# --- (d) 8-device mesh, Tunix's fsdp x tp sharding -----------------------------------------------------------------


def _expected_spec(leaf: str, weight_spec: tuple, proj: str) -> tuple:
  """The adapter leaf's PartitionSpec from its weight's: A keeps the mesh axes of the weight's fan-in axes, B those of
  its fan-out axes, the rank axis and the gate are replicated (Tunix's Einsum / nnx.Linear layouts, WEIGHTS)."""
  _, axes = WEIGHTS[proj]
  n_in = 2 if proj == "o_proj" else 1
  if leaf == "a":
    return (*weight_spec[:n_in], None)
  if leaf == "b":
    return (None, *weight_spec[n_in : len(axes)])
  return (None,)


def _padded(spec, ndim: int) -> tuple:
  return tuple(spec) + (None,) * (ndim - len(spec))


def _mesh_check(families: list[str]) -> dict:
  """Runs in a process with 8 host devices: for each family, SoRA on a model sharded by Tunix's default
  ShardingConfig over a (fsdp 4, tp 2) mesh; returns the leaves whose sharding differs from the expected one, and the
  largest differences of a jitted train step (batch sharded over fsdp) from the same step on one device."""
  assert jax.device_count() == 8, jax.devices()
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)  # as Tunix makes it
  report = {}
  for family in families:
    single = tiny_model(family)
    sharded = tiny_model(family)
    state = nnx.state(sharded)
    nnx.update(sharded, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    single, sharded = with_sora(single), with_sora(sharded)
    randomize_b(single, seed=4)
    randomize_b(sharded, seed=4)
    wrong = []
    flat = dict(nnx.to_flat_state(nnx.state(sharded)))
    for path, var in flat.items():
      name = str(path[-1])
      if "_lora_" not in name:
        continue
      weight, leaf = name.split("_lora_")
      base = flat[path[:-1] + (weight,)].get_value()
      got = _padded(var.get_value().sharding.spec, var.get_value().ndim)
      want = _padded(_expected_spec(leaf, _padded(base.sharding.spec, base.ndim), str(path[-2])), var.get_value().ndim)
      if got != want:
        wrong.append(f"{'/'.join(map(str, path))}: {got} (weight {base.sharding.spec}), expected {want}")
    inputs = lm_inputs(seed=5, batch=8)
    sharded_inputs = dict(
      inputs,
      **{
        k: jax.device_put(inputs[k], jax.NamedSharding(mesh, jax.P("fsdp")))
        for k in ("input_tokens", "positions", "attention_mask")
      },
    )
    opt_single, opt_sharded = sora_optimizer(single, 2e-2, 1.0), sora_optimizer(sharded, 2e-2, 1.0)
    # One step each: a second one would compile again (the optimizer's step counter comes back with a new sharding).
    losses = [(float(train_step(single, opt_single, inputs)), float(train_step(sharded, opt_sharded, sharded_inputs)))]
    a, b = flat_arrays(single, nnx.LoRAParam), flat_arrays(sharded, nnx.LoRAParam)
    after = [
      f"{'/'.join(map(str, path))}: {var.get_value().sharding.spec}"
      for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.LoRAParam))
      if not isinstance(var.get_value().sharding, jax.NamedSharding)
    ]
    report[family] = {
      "wrong_sharding": wrong,
      "lost_sharding_after_step": after,
      "adapter_leaves": len(a),
      "sharded_leaves": sum(
        1
        for _, var in nnx.to_flat_state(nnx.state(sharded, nnx.LoRAParam))
        if any(s is not None for s in var.get_value().sharding.spec)
      ),
      "loss_diff": max(abs(x - y) for x, y in losses),
      "adapter_diff": max(float(np.abs(a[k] - b[k]).max()) for k in a),
      "gate_zeros": int(sum((v == 0).sum() for k, v in b.items() if k.endswith("_lora_gate"))),
    }
  return report


@pytest.mark.slow
def test_fsdp_tp_mesh_shards_adapters_like_their_weights_and_matches_one_device():
  # Qwen3 only: Llama3 has the same ShardingConfig and weight layouts, and each family costs ~40 s here.
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")]
    ),
  )
  out = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--mesh", "qwen3"], env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  for family, r in report.items():
    assert r["wrong_sharding"] == [] and r["lost_sharding_after_step"] == [], (family, r)
    assert r["adapter_leaves"] == 42 and r["sharded_leaves"] == 28, (family, r)  # A and B sharded, gates replicated
    assert r["loss_diff"] <= 1e-5 and r["adapter_diff"] <= 1e-5, (family, r)


# --- (e) nnx.jit (nnx.scan: tests/test_qwix_provider.py) ---------------------------------------------------------


def test_jitted_forward_equals_eager_and_the_train_step_traces_once():
  model = with_sora(tiny_model("qwen3"))
  randomize_b(model, seed=4)
  inputs = lm_inputs(seed=8)
  np.testing.assert_allclose(
    np.asarray(nnx.jit(logits)(model, inputs)), np.asarray(logits(model, inputs)), atol=1e-5, rtol=1e-5
  )
  traces = []

  @nnx.jit
  def step(model, optimizer, inputs):
    traces.append(1)
    loss, grads = nnx.value_and_grad(lm_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, inputs)
    optimizer.update(model, grads)
    return loss

  optimizer = sora_optimizer(model, 1e-2, 0.5)
  for _ in range(3):
    step(model, optimizer, inputs)
  assert len(traces) == 1


# --- the example ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_example_nnx_qwen3_sora_runs_as_written(tmp_path, capsys):
  import importlib.util

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "nnx_qwen3_sora.py")
  spec = importlib.util.spec_from_file_location("nnx_qwen3_sora", path)
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  result = example.main(["--output_dir", str(tmp_path)])
  printed = capsys.readouterr().out
  zero = int(re.search(r"gates exactly zero: (\d+) of 112", printed).group(1))
  assert 0 < zero < 112 and zero == result["gates_zero"], printed
  assert "all within atol = rtol = 1e-5: True" in printed and result["equal"], printed
  losses = [float(x) for x in re.findall(r"validation loss ([0-9.]+)", printed)]
  assert len(losses) == 7 and losses[-1] < losses[0] - 1.0, printed
  assert "total:" in printed and sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]


if __name__ == "__main__":
  if sys.argv[1:2] == ["--mesh"]:
    print(json.dumps(_mesh_check(sys.argv[2:] or sorted(FAMILIES))))
