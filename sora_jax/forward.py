"""The factored SoRA forward pass for Flax linen models.

Inside `factored(config)`, every `nn.Dense` / `nn.DenseGeneral` call whose scope holds a `sora_a` param beside its
`kernel` returns

  y = base(x) + s * ((dropout(x) @ A) * gate) @ B,      s = alpha / rank

without forming the (in x out) product A diag(gate) B. The adapter leaves are read from the module's own scope, so
the same mechanism works unrolled, under `nn.scan` (which slices the leading layer axis off every leaf), `nn.remat`,
`jax.jit` and `jax.grad`. Modules without adapters run unchanged; a module pruned to rank 0 (zero-size A and B) adds
zeros. The mechanism is `flax.linen.intercept_methods`; nothing about the model's code changes.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from sora_jax.adapters import SoraConfig
from sora_jax.leaves import A, B, GATE

_DENSE = (nn.Dense, nn.DenseGeneral)


def _input_axes(module: nn.Module, x: jax.Array) -> tuple[int, ...]:
  if isinstance(module, nn.Dense):
    return (x.ndim - 1,)
  if module.batch_dims:
    raise NotImplementedError(f"SoRA factored forward: DenseGeneral with batch_dims at {module.path} is not supported.")
  axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  return tuple(ax % x.ndim for ax in axis)


def _flat_rows(x: jax.Array) -> jax.Array:
  return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def low_rank_product(x: jax.Array, a: jax.Array, gate: jax.Array, b: jax.Array, precision=None) -> jax.Array:
  """((x @ a) * gate) @ b with a hand-written VJP that never transposes an activation.

  Shapes: x (..., in), a (in, rank), gate (rank,), b (rank, out) -> (..., out). With h = x @ a and dy the cotangent
  of the output (rows flattened to N = prod(...)):

    dz = dy @ b^T            (N, rank)
    dgate = sum_n dz * h      (rank,)
    da = ((dz * gate)^T @ x)^T   (in, rank)
    db = (h * gate)^T @ dy       (rank, out)
    dx = (dz * gate) @ a^T       (..., in)

  Both weight gradients are computed as (rank, N) @ (N, features): only the small (N, rank) factor is transposed.
  Differentiating the plain expression instead leads XLA's CPU backend to contract over N by transposing the
  (N, features) activations and their gradients in memory, one full pass each, which made the SoRA train step of a
  BERT-base encoder 1.5x the cost of its forward plus activation backward.
  """
  return _low_rank_fwd(x, a, gate, b, precision)[0]


def _low_rank_fwd(x, a, gate, b, precision):
  h = jnp.matmul(x, a, precision=precision)
  return jnp.matmul(h * gate, b, precision=precision), (x, a, gate, b, h)


def _low_rank_bwd(precision, residuals, dy):
  x, a, gate, b, h = residuals
  rows_x, rows_h, rows_dy = _flat_rows(x), _flat_rows(h), _flat_rows(dy)
  dz = jnp.matmul(rows_dy, b.T, precision=precision)  # (N, rank)
  dgate = jnp.sum(dz * rows_h, axis=0)
  dz_gated = dz * gate
  # The barrier keeps XLA from folding the transpose of the small (rank, in) result into the product, which would
  # turn it back into x^T @ dz and a full transposed pass over x.
  da = jax.lax.optimization_barrier(jnp.matmul(dz_gated.T, rows_x, precision=precision)).T
  db = jnp.matmul((rows_h * gate).T, rows_dy, precision=precision)
  dx = jnp.matmul(dz_gated, a.T, precision=precision).reshape(x.shape)
  return dx.astype(x.dtype), da.astype(a.dtype), dgate.astype(gate.dtype), db.astype(b.dtype)


low_rank_product.defvjp(_low_rank_fwd, _low_rank_bwd)


def adapter_output(module: nn.Module, x: jax.Array, config: SoraConfig, deterministic: bool = True) -> jax.Array:
  """s * ((dropout(x) @ A) * gate) @ B for a bound Dense/DenseGeneral `module` that holds adapter params.

  Shapes: x (..., *in_shape) over the module's input axes, a (*in_shape, rank), gate (rank,), b (rank, *out_shape);
  returns (..., *out_shape) in the module's compute dtype. The product runs as `low_rank_product` on the flattened
  feature axes.
  """
  a = module.get_variable("params", A)
  b = module.get_variable("params", B)
  gate = module.get_variable("params", GATE) if module.has_variable("params", GATE) else None
  axes = _input_axes(module, x)
  if a.ndim - 1 != len(axes):
    raise ValueError(
      f"SoRA adapter at {'/'.join(module.path)} has a of shape {a.shape} ({a.ndim - 1} input axes) but the module "
      f"contracts {len(axes)} input axes; was the tree initialised with the right in_axes / stacked?"
    )
  if config.dropout > 0.0 and not deterministic:
    keep = 1.0 - config.dropout
    keep_mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
    x = jnp.where(keep_mask, x / keep, 0.0).astype(x.dtype)
  x, a, b = promote_dtype(x, a, b, dtype=module.dtype)
  rank = a.shape[-1]
  out_shape = b.shape[1:]
  # Contracted axes last, in the order of a's input axes; the remaining axes keep their order, as DenseGeneral's
  # dot_general does.
  batch_axes = tuple(ax for ax in range(x.ndim) if ax not in axes)
  if batch_axes + axes != tuple(range(x.ndim)):
    x = jnp.transpose(x, batch_axes + axes)
  batch_shape = x.shape[: len(batch_axes)]
  x = x.reshape(batch_shape + (-1,))
  if rank == 0:  # pruned to rank 0: zero-size factors, a zero update (and zero-size gradients for A and B)
    return jnp.zeros(batch_shape + out_shape, x.dtype)
  # The scale rides on the (rank,) gate so it multiplies the small (..., rank) tensor, not the (..., out) output:
  # on CPU the step is bound by memory traffic, and an extra pass over the output costs more than its flops.
  gate_scale = jnp.full((rank,), config.scale, x.dtype) if gate is None else (config.scale * gate).astype(x.dtype)
  y = low_rank_product(x, a.reshape(-1, rank), gate_scale, b.reshape(rank, -1), module.precision)
  return y.reshape(batch_shape + out_shape)


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
    if (
      context.method_name != "__call__"
      or not isinstance(module, _DENSE)
      or module.scope is None
      or not module.has_variable("params", A)
    ):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    return y + adapter_output(module, x, config, deterministic).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    yield


def apply_factored(
  model: nn.Module, variables: Any, *args, config: SoraConfig, adapter_deterministic: bool = True, **kwargs
) -> Any:
  """`model.apply(variables, *args, **kwargs)` inside `factored(config, adapter_deterministic)`."""
  with factored(config, deterministic=adapter_deterministic):
    return model.apply(variables, *args, **kwargs)
