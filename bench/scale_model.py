"""Abstract Tunix LLMs of real sizes, with SoRA or qwix LoRA attached, for compiling a step without weights.

`abstract_model` builds a Tunix Qwen3 / Llama3 under `nnx.eval_shape` (every weight a `jax.ShapeDtypeStruct`, nothing
allocated) and attaches adapters inside the same trace, so an 8B or 70B model costs seconds and megabytes of host
memory. Shardings are Tunix's own (`ShardingConfig.get_default_sharding()`: weights over ('fsdp', 'tp'), activations
(batch over 'fsdp', features over 'tp')); adapter leaves take their weight's axes (`sora_jax.SoraProvider`, qwix).

Tunix's activation constraints (`tunix.models.<family>.model.shard`) return their input unchanged when the first
device is a CPU, so a CPU compile would be a different program from an accelerator's. `activation_sharding(mesh)`
swaps that function, in this one place, for one that applies the constraint on any platform; `tests/test_scale.py`
pins the Tunix behaviour it relies on (the CPU early return, and that the models look `shard` up in their module).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any, Iterator

TARGETS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
METHODS = ("sora", "lora", "full", "forward")
DTYPES = ("float32", "bfloat16")
_FAMILIES = {"qwen3": "Qwen3", "llama3": "Llama3"}
# name -> (Tunix family, ModelConfig constructor)
MODELS = {
  "qwen3-0.6b": ("qwen3", "qwen3_0p6b"),
  "qwen3-8b": ("qwen3", "qwen3_8b"),
  "qwen3-14b": ("qwen3", "qwen3_14b"),
  "qwen3-32b": ("qwen3", "qwen3_32b"),
  "llama3-8b": ("llama3", "llama3p1_8b"),
  "llama3-70b": ("llama3", "llama3_70b"),
}


def tunix_module(family: str) -> Any:
  """`tunix.models.<family>.model`."""
  return importlib.import_module(f"tunix.models.{family}.model")


def model_config(name: str, *, layers: int | None = None, dtype: str = "float32") -> Any:
  """Tunix's ModelConfig of `name` (see MODELS) with `layers` decoder layers (default: the model's) and, where the
  family has the fields (Qwen3), compute and parameter dtype. No remat: Tunix's `nnx.remat` of a layer fails inside
  a jitted step built from `nnx.merge` ("Cannot mutate Param from a different trace level", Flax 0.12.8)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
  family, constructor = MODELS[name]
  module = tunix_module(family)
  config = getattr(module.ModelConfig, constructor)()
  fields = {f.name for f in dataclasses.fields(config)}
  changes = {}
  if layers is not None:
    changes["num_layers"] = layers
  if "param_dtype" in fields:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    changes.update(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
  return dataclasses.replace(config, **changes)


@contextlib.contextmanager
def activation_sharding(mesh: Any) -> Iterator[None]:
  """Within the block, Tunix's Qwen3 and Llama3 constrain activations to their `ShardingConfig` specs on `mesh` on
  every platform (Tunix itself skips them on CPU)."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel

  def shard(x, spec):
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*spec)))

  modules = [tunix_module(family) for family in _FAMILIES]
  saved = [module.shard for module in modules]
  try:
    for module in modules:
      module.shard = shard
    yield
  finally:
    for module, original in zip(modules, saved):
      module.shard = original


def sample_inputs(batch: int, seq: int) -> dict[str, Any]:
  """Tunix's call arguments for a causal LM step: tokens, positions, no cache, a causal mask (B, T, T)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  return {
    "input_tokens": jnp.zeros((batch, seq), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
    "cache": None,
    "attention_mask": jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), bool)), (batch, seq, seq)),
  }


def attach(model: Any, method: str, *, rank: int, alpha: float, targets: str = TARGETS) -> Any:
  """`model` with SoRA (`sora_jax.apply_sora`) or qwix LoRA on `targets`; unchanged for 'full' and 'forward'."""
  if method in ("full", "forward"):
    return model
  import qwix  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import sora_jax  # pylint: disable=import-outside-toplevel

  sample = sample_inputs(1, 4)
  if method == "sora":
    provider = sora_jax.SoraProvider(module_path=targets, rank=rank, alpha=alpha)
    return sora_jax.apply_sora(model, provider, **sample, rngs=nnx.Rngs(1))
  if method == "lora":
    provider = qwix.LoraProvider(module_path=targets, rank=rank, alpha=alpha)
    return qwix.apply_lora_to_model(model, provider, **sample, rngs=nnx.Rngs(1))
  raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def abstract_model(
  config: Any, family: str, method: str, mesh: Any, *, rank: int = 8, alpha: float = 16.0, dtype: str = "float32"
) -> Any:
  """The Tunix model of `config` with `method`'s adapters, every leaf a `jax.ShapeDtypeStruct`; floating leaves in
  `dtype` (Llama3's config has no dtype field, so its leaves are cast here)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  cls = getattr(tunix_module(family), _FAMILIES[family])
  with jax.set_mesh(mesh):
    model = nnx.eval_shape(lambda: attach(cls(config, rngs=nnx.Rngs(0)), method, rank=rank, alpha=alpha))
  graphdef, state = nnx.split(model)
  want = jnp.dtype(dtype)

  def cast(x):
    if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != want:
      return jax.ShapeDtypeStruct(x.shape, want, sharding=x.sharding)
    return x

  return nnx.merge(graphdef, jax.tree.map(cast, state))
