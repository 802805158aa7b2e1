"""`python -m train.glue ... train.compile_only=true`: the configured train step compiled on the configured mesh, its
per-device cost printed, nothing trained.

The run is built as for training (`loop.build`: model, adapters, data, mesh, shardings), the step programs are the
trainer's own (`loop.step_programs`), and the train step is lowered for the first batch's shapes and compiled; the
table is `train.aot`'s (argument / temporary / peak memory, FLOPs, collectives by kind and mesh axes, device
memories it fits). Fake CPU devices give a mesh of any size on one host:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m train.glue mesh.fsdp=8 train.compile_only=true
"""

from __future__ import annotations

import time
from typing import Any

from train.config import RunConfig


def compile_train_step(config: RunConfig) -> tuple[Any, Any, Any, float]:
  """(compiled train step, its mesh, its abstract arguments, compile seconds) of the run `config` describes."""
  import jax
  import numpy as np

  from sora_jax import sharding as shd
  from train import loop

  experiment = loop.build(config)
  hyper = loop.hyper_for(config, experiment.total_steps, None, loop.target_fraction(experiment))
  programs = loop.step_programs(experiment, experiment.trainable, hyper)
  hyper = jax.device_put(hyper, shd.replicated(experiment.mesh))
  state = jax.eval_shape(programs["init_state"], experiment.trainable, hyper)
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in experiment.batches(0).items()}
  start = time.perf_counter()
  compiled = programs["train_step"].lower(state, experiment.frozen, batch, hyper).compile()
  seconds = time.perf_counter() - start
  shardings = compiled.input_shardings[0]
  arguments = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
    (state, experiment.frozen, batch, hyper),
    tuple(shardings),
  )
  return compiled, experiment.mesh, arguments, seconds


def print_plan(config: RunConfig) -> dict:
  """Compiles the run's train step and prints its per-device cost; returns the numbers."""
  from train import aot

  compiled, mesh, arguments, seconds = compile_train_step(config)
  cost = aot.step_cost(compiled, mesh)
  axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
  print(
    f"{config.model.name}, adapter.method={config.adapter.method}, batch {config.train.batch_size} "
    f"(grad_accum {config.train.grad_accum}) x {config.data.max_length} tokens; mesh {axes} "
    f"({mesh.devices.size} devices, {mesh.devices.flat[0].platform}); compiled in {seconds:.1f} s; per device:\n"
  )
  print(aot.format_cost([("train step", cost)]))
  print("\ncollectives by mesh axes:\n" + (aot.format_axes(cost) or "  none"))
  shard_bytes = aot.sharded_bytes(arguments)
  print(f"\nargument bytes {cost.argument:,} (summed shard sizes of the arguments: {shard_bytes:,})")
  return {**cost.as_dict(), "compile_s": seconds, "argument_shard_bytes": shard_bytes}
