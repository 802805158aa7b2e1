"""One train step of an abstract model, compiled ahead of time on a mesh: never executed, nothing allocated.

  sora     gradients w.r.t. A, B and gates (`nnx.LoRAParam`), `sora_jax.sora_optimizer`: adamw on A and B, the gates' own
           proximal step
  lora     qwix LoRA: gradients w.r.t. A and B, adamw
  full     gradients w.r.t. every `nnx.Param`, adamw
  forward  the loss alone (no gradients, no optimizer)

The step is `(trainable, opt_state, frozen, batch) -> (trainable, opt_state, loss)`, jitted with the parameters'
shardings as in_shardings (Tunix's specs, adapters on their weight's axes; optimizer moments with their parameter's
spec) and the batch over 'fsdp', trainable and optimizer state donated; the out_shardings are left to XLA, so
`CompiledStep.outputs_match_inputs` tells whether a loop would run the program again without resharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

from bench import scale_model


def sora_optimizer(learning_rate: float, lam: float) -> Any:
  """SoRA's optimizer as the trainer builds it (`sora_jax.sora_optimizer`): adamw on A and B, the gates' own
  proximal step."""
  import optax  # pylint: disable=import-outside-toplevel

  import sora_jax  # pylint: disable=import-outside-toplevel

  return sora_jax.sora_optimizer(learning_rate, lam, optax.adamw(learning_rate))


def optimizer(method: str, learning_rate: float = 1e-4, lam: float = 0.1) -> Any:
  """The optimizer of `method`: `sora_optimizer` for 'sora', adamw otherwise."""
  import optax  # pylint: disable=import-outside-toplevel

  return sora_optimizer(learning_rate, lam) if method == "sora" else optax.adamw(learning_rate)


@dataclasses.dataclass
class CompiledStep:
  """A compiled step and what it was built from.

  Attributes:
    compiled: the `jax.stages.Compiled`.
    arguments: the abstract arguments (`jax.ShapeDtypeStruct`s with shardings): (trainable, opt_state, frozen, batch).
    trainable_specs: {'/'-joined path: PartitionSpec} of the trainable leaves.
    opt_specs: {'/'-joined path within the optimizer state: PartitionSpec} of its array leaves.
    attach_s, lower_s, compile_s: wall seconds of the abstract build (with adapters), lowering, compiling.
  """

  compiled: Any
  arguments: tuple[Any, ...]
  trainable_specs: dict[str, Any]
  opt_specs: dict[str, Any]
  attach_s: float
  lower_s: float
  compile_s: float

  @property
  def outputs_match_inputs(self) -> bool:
    """Whether the compiled step returns trainable params and optimizer state with the shardings it takes."""
    ins, outs = self.compiled.input_shardings[0], self.compiled.output_shardings
    import jax  # pylint: disable=import-outside-toplevel

    pairs = zip(jax.tree.leaves(self.arguments[:2]), jax.tree.leaves(ins[:2]), jax.tree.leaves(outs[:2]), strict=True)
    return all(a.is_equivalent_to(b, x.ndim) for x, a, b in pairs)


def _path(keys) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys) if keys else ""


def compile_step(
  model_name: str,
  method: str,
  mesh: Any,
  *,
  layers: int | None,
  batch: int,
  seq: int,
  dtype: str = "float32",
  rank: int = 8,
  alpha: float = 16.0,
  activation_constraints: bool = True,
) -> CompiledStep:
  """Compiles `method`'s step of `model_name` (bench.scale_model.MODELS) with `layers` layers on `mesh` (axes
  'fsdp', 'tp') for `batch` sequences of `seq` tokens."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel

  family = scale_model.MODELS[model_name][0]
  config = scale_model.model_config(model_name, layers=layers, dtype=dtype)
  start = time.perf_counter()
  model = scale_model.abstract_model(config, family, method, mesh, rank=rank, alpha=alpha, dtype=dtype)
  attach_s = time.perf_counter() - start

  wrt = nnx.Param if method == "full" else nnx.LoRAParam
  if method == "forward":
    graphdef, frozen = nnx.split(model)
    trainable = nnx.State({})
  else:
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)
  named = lambda spec: NamedSharding(mesh, spec)
  is_spec = lambda x: isinstance(x, P)
  trainable_sh = jax.tree.map(named, nnx.get_partition_spec(trainable), is_leaf=is_spec)
  frozen_sh = jax.tree.map(named, nnx.get_partition_spec(frozen), is_leaf=is_spec)
  tx = None if method == "forward" else optimizer(method)
  if tx is None:
    opt_state, opt_sh = (), ()
  else:
    opt_state = jax.eval_shape(tx.init, trainable)
    # A masked transform (AdamW without the gates) holds MaskedNode where a gate is: it stays, with no sharding.
    opt_sh = optax.tree_map_params(
      tx,
      lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding,
      opt_state,
      trainable_sh,
      transform_non_params=lambda _: named(P()),
      is_leaf=lambda x: isinstance(x, (NamedSharding, optax.MaskedNode)),
    )
  batch_sh = named(P("fsdp"))
  abstract = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  inputs = {
    "input_tokens": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sh),
    "positions": jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sh),
    "attention_mask": jax.ShapeDtypeStruct((batch, seq, seq), jnp.bool_, sharding=batch_sh),
  }
  arguments = (abstract(trainable, trainable_sh), abstract(opt_state, opt_sh), abstract(frozen, frozen_sh), inputs)

  def loss_fn(trainable, frozen, inputs):
    logits, _ = nnx.merge(graphdef, trainable, frozen)(
      inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"]
    )
    labels = inputs["input_tokens"][:, 1:]
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), labels).mean()

  def step(trainable, opt_state, frozen, inputs):
    if tx is None:
      return trainable, opt_state, loss_fn(trainable, frozen, inputs)
    loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, inputs)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  jitted = jax.jit(
    step,
    in_shardings=(trainable_sh, opt_sh, frozen_sh, jax.tree.map(lambda _: batch_sh, inputs)),
    donate_argnums=(0, 1),
  )
  start = time.perf_counter()
  with scale_model.activation_sharding(mesh) if activation_constraints else contextlib.nullcontext():
    lowered = jitted.lower(*arguments)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  spec_of = lambda tree: {
    _path(p): s.spec
    for p, s in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, NamedSharding))[0]
  }
  return CompiledStep(compiled, arguments, spec_of(trainable_sh), spec_of(opt_sh), attach_s, lower_s, compile_s)
