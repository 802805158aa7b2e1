"""The JAX side of the benchmarks: our linen encoders (random weights) trained with SoRA, LoRA, or fully, and the
cost floor.

Run one case per process (the bench scripts do this through `bench.measure.run_case`):
  python -m bench.jax_cases '{"kind": "train", "model": "bert", "method": "sora", "batch": 8, "seq": 128}'
It prints one JSON object: seconds per step (median) and peak resident memory above the imported-framework baseline.

Methods of a train step (all jitted, the trainable state donated to the step):
  sora   factored forward (`sora_jax.factored`), gradients w.r.t. adapters and classifier only,
         `sora_jax.sora_optimizer(lr, lam, adamw(lr))` (the trainer's recipe: AdamW on A, B and classifier, the
         gates' own proximal step on their raw gradient)
  lora   the same forward with the gates frozen at one: gradients w.r.t. A, B and classifier, plain AdamW
  merge  SoRA merge-then-apply: `merge(combine(trainable, frozen))` inside the differentiated function
  full   every parameter trained with AdamW (no adapters)
  floor  forward plus backward to the embedding output only: every parameter a constant, no optimizer
"""

import functools
import json
import sys

from bench import measure

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.model_configs import ALPHA, LEARNING_RATE, RANK, SORA_LAMBDA, hf_config  # noqa: E402

HEAD = (r"classifier/.*",)  # trained with the adapters, as PEFT's SEQ_CLS task type trains `classifier`


def family(model_name: str):
  from sora_jax.models import bert, deberta_v2

  return {"bert": bert, "deberta": deberta_v2}[model_name]


def build(model_name: str, config, *, batch: int, seq: int):
  """Returns (module, params, inputs, labels) for the model with random weights."""
  module = family(model_name).build(config, dtype=jnp.float32, param_dtype=jnp.float32)
  rng = jax.random.key(0)
  input_ids = jax.random.randint(jax.random.fold_in(rng, 1), (batch, seq), 0, config.vocab_size)
  inputs = {"input_ids": input_ids, "attention_mask": jnp.ones((batch, seq), jnp.int32)}
  labels = jax.random.randint(jax.random.fold_in(rng, 2), (batch,), 0, config.num_labels)
  shapes = jax.eval_shape(module.init, rng, inputs["input_ids"][:1], inputs["attention_mask"][:1])["params"]
  return module, random_params(shapes), inputs, labels


def random_params(shapes, seed: int = 0):
  """N(0, 0.02) weights, unit LayerNorm scales, zero biases, drawn with NumPy: random init through `model.init` costs
  tens of CPU seconds per process at base size (threefry bits for 10^8 values plus its compile), NumPy a second."""
  gen = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "bias":
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "scale":
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray((0.02 * gen.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def sora_config(model_name: str):
  import sora_jax

  return sora_jax.SoraConfig(rank=RANK, alpha=ALPHA, targets=family(model_name).TARGETS)


def _loss(logits, labels):
  import optax

  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_step(model_name: str, method: str, module, params, inputs, labels):
  """Returns (a no-argument callable that runs one jitted step and blocks, the trainable parameter count)."""
  import optax
  import sora_jax
  from flax import traverse_util

  config = sora_config(model_name)

  def logits_of(params, factored: bool):
    if factored:
      with sora_jax.factored(config):
        return module.apply({"params": params}, inputs["input_ids"], inputs["attention_mask"])
    return module.apply({"params": params}, inputs["input_ids"], inputs["attention_mask"])

  if method == "floor":
    return floor_step(module, params, inputs, labels), 0

  if method == "full":
    trainable, frozen = params, {}
    tx = optax.adamw(LEARNING_RATE)
    loss_fn = lambda t, f: _loss(logits_of(t, factored=False), labels)
  else:
    adapted = sora_jax.init(jax.random.key(1), params, config)
    trainable, frozen = sora_jax.split(adapted, trainable=HEAD)
    if method == "lora":  # gates stay frozen at their initial value, no proximal step
      flat = traverse_util.flatten_dict(trainable)
      gates = {p: v for p, v in flat.items() if p[-1] == "sora_gate"}
      trainable = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p not in gates})
      frozen = sora_jax.combine(frozen, traverse_util.unflatten_dict(gates))
      tx = optax.adamw(LEARNING_RATE)
    elif method in ("sora", "merge"):
      tx = sora_jax.sora_optimizer(LEARNING_RATE, SORA_LAMBDA, optax.adamw(LEARNING_RATE))  # the trainer's recipe
    else:
      raise ValueError(f"unknown method {method!r}")
    if method == "merge":
      loss_fn = lambda t, f: _loss(logits_of(sora_jax.merge(sora_jax.combine(t, f), config), factored=False), labels)
    else:
      loss_fn = lambda t, f: _loss(logits_of(sora_jax.combine(t, f), factored=True), labels)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(trainable, opt_state, frozen):
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  # The step donates its trainable state; a copy keeps the caller's arrays (shared with other methods' trees) alive.
  trainable = jax.tree.map(jnp.copy, trainable)
  state = [trainable, tx.init(trainable)]
  # Compiled here, ahead of the first call: a bench can build several cases at once and time their steps one by one.
  compiled = step.lower(state[0], state[1], frozen).compile()

  def call():
    state[0], state[1], loss = compiled(state[0], state[1], frozen)
    return jax.block_until_ready(loss)

  call.compiled = compiled

  count = sum(x.size for x in jax.tree.leaves(trainable))
  return call, count


def floor_step(module, params, inputs, labels):
  """Forward plus backward to the embeddings' output: a zero perturbation is added to the output of the embeddings
  module and the gradient is taken w.r.t. it alone, every parameter being a (non-differentiated) argument."""
  import flax.linen as nn

  def perturbed_loss(delta, params):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and type(context.module).__name__.endswith("Embeddings"):
        return out + delta
      return out

    with nn.intercept_methods(add_delta):
      logits = module.apply({"params": params}, inputs["input_ids"], inputs["attention_mask"])
    return _loss(logits, labels)

  hidden = jax.eval_shape(
    lambda p: module.apply({"params": p}, inputs["input_ids"], inputs["attention_mask"], method="encode"), params
  )
  delta = jnp.zeros(hidden.shape, hidden.dtype)
  grad = jax.jit(jax.grad(perturbed_loss))
  compiled = grad.lower(delta, params).compile()

  def call():
    return jax.block_until_ready(compiled(delta, params))

  call.compiled = compiled
  return call


def inference_calls(model_name: str, module, params, inputs) -> dict:
  """Forward-only callables: base model, SoRA merged into the kernels (same function as base), factored adapters."""
  import sora_jax

  config = sora_config(model_name)
  adapted = sora_jax.init(jax.random.key(1), params, config)
  # Non-zero B so that merged and factored really compute something different from the base model.
  adapted = jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.full_like(x, 0.01) if path[-1].key == "sora_b" else x, adapted
  )
  merged = jax.jit(sora_jax.merge, static_argnums=1)(adapted, config)

  @jax.jit
  def plain(params):
    return module.apply({"params": params}, inputs["input_ids"], inputs["attention_mask"])

  @jax.jit
  def factored(params):
    with sora_jax.factored(config):
      return module.apply({"params": params}, inputs["input_ids"], inputs["attention_mask"])

  # Merged parameters have the base tree's structure and shapes: one executable serves both.
  plain, factored = plain.lower(params).compile(), factored.lower(adapted).compile()
  return {
    "base": lambda: jax.block_until_ready(plain(params)),
    "sora_merged": lambda: jax.block_until_ready(plain(merged)),
    "sora_factored": lambda: jax.block_until_ready(factored(adapted)),
  }


def _setup(spec: dict):
  """Import what every case holds, start the runtime, then build the spec's model: (baseline MiB, module, params,
  inputs, labels), the baseline being the resident size before the model exists."""
  import flax  # noqa: F401  (part of the baseline, like jax)
  import optax  # noqa: F401
  import transformers  # noqa: F401  (the configs)
  import sora_jax  # noqa: F401

  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(())))  # the runtime and its thread pools exist now
  baseline = measure.rss_mib()
  config = hf_config(spec["model"], **spec.get("shape", {}))
  return (baseline, *build(spec["model"], config, batch=spec["batch"], seq=spec["seq"]))


def main(spec: dict) -> dict:
  baseline, module, params, inputs, labels = _setup(spec)
  warmup, repeats = spec.get("warmup", 1), spec.get("repeats", 3)
  result = {"framework": "jax", "jax": jax.__version__, "backend": jax.default_backend()}
  if spec["kind"] == "train":
    step, trainable = train_step(spec["model"], spec["method"], module, params, inputs, labels)
    del params
    result.update(measure.measure_step(step, baseline_mib=baseline, warmup=warmup, repeats=repeats))
    result["trainable"] = trainable
  elif spec["kind"] == "train_interleaved":
    # Every method's step in this one process, timed in turn each round: ratios that survive a loaded machine.
    steps = {method: train_step(spec["model"], method, module, params, inputs, labels)[0] for method in spec["methods"]}
    timings = measure.time_interleaved(steps, warmup=warmup, repeats=repeats)
    result["time_s"] = {name: t.median_s for name, t in timings.items()}
  elif spec["kind"] == "cost":
    # XLA's own count of each compiled step's work: independent of machine load.
    result["cost"] = {}
    for method in spec["methods"]:
      cost = train_step(spec["model"], method, module, params, inputs, labels)[0].compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      result["cost"][method] = {"gflop": cost.get("flops", 0.0) / 1e9, "gbytes": cost.get("bytes accessed", 0.0) / 1e9}
  elif spec["kind"] == "inference":
    timings = measure.time_interleaved(
      inference_calls(spec["model"], module, params, inputs), warmup=warmup, repeats=repeats
    )
    result["time_s"] = {name: t.median_s for name, t in timings.items()}
  else:
    raise ValueError(f"unknown kind {spec['kind']!r}")
  return result


def serve(spec: dict) -> None:
  """`python -m bench.jax_cases --serve '<spec>'`: build the case, then time it on request (`bench.measure.serve`).

  Kinds: `train` (one callable, the method's step) and `inference` (base, merged and factored forwards, timed in
  turn forwards and backwards within each request, so that the merged / base ratio is resolved within the process).
  """
  baseline, module, params, inputs, labels = _setup(spec)
  info = {"framework": "jax", "jax": jax.__version__, "backend": jax.default_backend()}
  if spec["kind"] == "train":
    step, info["trainable"] = train_step(spec["model"], spec["method"], module, params, inputs, labels)
    del params
    calls, palindrome = {"step": step}, False
  elif spec["kind"] == "inference":
    calls, palindrome = inference_calls(spec["model"], module, params, inputs), True
  else:
    raise ValueError(f"unknown kind {spec['kind']!r} for --serve; choose train or inference")
  measure.serve(calls, baseline_mib=baseline, warmup=spec.get("warmup", 1), palindrome=palindrome, info=info)


if __name__ == "__main__":
  if sys.argv[1] == "--serve":
    serve(json.loads(sys.argv[2]))
  else:
    print(json.dumps(main(json.loads(sys.argv[1]))))
