"""The factored SoRA forward pass for Flax linen models.

Inside `factored(config)`, every `nn.Dense` / `nn.DenseGeneral` call whose scope holds a `sora_a` param beside its
`kernel` returns

  y = base(x) + s * ((dropout(x) @ A) * gate) @ B,      s = alpha / rank

without forming the (in x out) product A diag(gate) B. The adapter leaves are read from the module's own scope, so
the same mechanism works unrolled, under `nn.scan` (which slices the leading layer axis off every leaf), `nn.remat`,
`jax.jit` and `jax.grad`. Modules without adapters run unchanged. The mechanism is
`flax.linen.intercept_methods`; nothing about the model's code changes.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from sora_jax.adapters import A, B, GATE, SoraConfig

_DENSE = (nn.Dense, nn.DenseGeneral)


def _input_axes(module: nn.Module, x: jax.Array) -> tuple[int, ...]:
  if isinstance(module, nn.Dense):
    return (x.ndim - 1,)
  if module.batch_dims:
    raise NotImplementedError(f"SoRA factored forward: DenseGeneral with batch_dims at {module.path} is not supported.")
  axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  return tuple(ax % x.ndim for ax in axis)


def adapter_output(module: nn.Module, x: jax.Array, config: SoraConfig, deterministic: bool = True) -> jax.Array:
  """s * ((dropout(x) @ A) * gate) @ B for a bound Dense/DenseGeneral `module` that holds adapter params.

  Shapes: x (..., *in_shape) over the module's input axes, a (*in_shape, rank), gate (rank,), b (rank, *out_shape);
  returns (..., *out_shape) in the module's compute dtype.
  """
  a = module.get_variable("params", A)
  b = module.get_variable("params", B)
  gate = module.get_variable("params", GATE) if module.has_variable("params", GATE) else None
  axes = _input_axes(module, x)
  if a.ndim - 1 != len(axes):
    raise ValueError(
        f"SoRA adapter at {'/'.join(module.path)} has a of shape {a.shape} ({a.ndim - 1} input axes) but the module "
        f"contracts {len(axes)} input axes; was the tree initialised with the right in_axes / stacked?")
  if config.dropout > 0.0 and not deterministic:
    keep = 1.0 - config.dropout
    keep_mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
    x = jnp.where(keep_mask, x / keep, 0.0).astype(x.dtype)
  x, a, b = promote_dtype(x, a, b, dtype=module.dtype)
  h = jnp.tensordot(x, a, axes=(axes, tuple(range(len(axes)))), precision=module.precision)  # (..., rank)
  # The scale rides on the (rank,) gate so it multiplies the small (..., rank) tensor, not the (..., out) output:
  # on CPU the step is bound by memory traffic, and an extra pass over the output costs more than its flops.
  gate_scale = config.scale if gate is None else config.scale * gate
  h = h * jnp.asarray(gate_scale, h.dtype)
  # tensordot keeps x's uncontracted axes in order, as DenseGeneral's dot_general does.
  return jnp.tensordot(h, b, axes=1, precision=module.precision)  # (..., *out_shape)


@contextlib.contextmanager
def factored(config: SoraConfig, deterministic: bool = True) -> Iterator[None]:
  """Context manager: inside it, `model.apply` runs every adapted dense layer in factored form.

  Args:
    config: the SoRA config (for the scale s and the dropout rate).
    deterministic: when False and `config.dropout > 0`, adapter-input dropout draws from the 'dropout' rng stream
      (pass `rngs={'dropout': key}` to `apply`; under `nn.scan` split the 'dropout' rngs).

  Example:
    with sora_jax.factored(config):
      logits = model.apply({"params": params}, x)
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, _DENSE) or module.scope is None
        or not module.has_variable("params", A)):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    return y + adapter_output(module, x, config, deterministic).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    yield


def apply_factored(model: nn.Module, variables: Any, *args, config: SoraConfig, adapter_deterministic: bool = True,
                   **kwargs) -> Any:
  """`model.apply(variables, *args, **kwargs)` inside `factored(config, adapter_deterministic)`."""
  with factored(config, deterministic=adapter_deterministic):
    return model.apply(variables, *args, **kwargs)
