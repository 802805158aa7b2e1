"""Every private qwix name sora_jax uses, wrapped in one place.

qwix's public surface (`qwix.LoraProvider`, `qwix.LoraRule`, `qwix.PtqProvider`, `qwix.quantize_model`, `qwix.QArray`)
does not expose what a provider subclass needs: finding which param an operand is, creating a param beside it with
sharding derived from it, the PTQ base op, the einsum parser. Those live in `qwix._src`; this module is the only
importer of `qwix._src`, each wrapper states the behaviour we rely on, and `tests/test_qwix_private.py` pins it, so a
qwix upgrade that changes any of it breaks one test file, not users. Written against qwix 0.1.8.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import qwix
from qwix._src.core import einsum_info as _einsum_info
from qwix._src.providers import ptq as _ptq
from qwix._src.utils import flax_util as _flax_util

# The PTQ weight wrapper: a quantized base weight reaches the provider as `WithAux(array=QArray, how=...)`, and
# sits in the model (NNX attribute / linen param) as one.
WithAux = _ptq.WithAux
QArray = qwix.QArray


def current_module() -> Any:
  """The linen or NNX module whose method is running the intercepted op (qwix: `flax_util.get_current_module`)."""
  return _flax_util.get_current_module()


def find_param(operand: Any) -> str | None:
  """Name of the module param that `operand` is (or is a unary transform of: astype, reshape, sharding constraint),
  quantized `WithAux` params included; None when the operand is an activation (qwix: `flax_util.find_param`)."""
  return _flax_util.find_param(operand, _ptq.WithAux)


def get_or_create_param(name: str, init_fn: Callable[..., Any], param_type: type, need_rng: bool = True) -> jax.Array:
  """The unboxed param `name` of the current module, created by `init_fn(rng)` (`init_fn()` without `need_rng`)
  when absent.

  linen: `module.scope.param(name, init_fn)` (collection 'params', rng from the 'params' stream). NNX: an attribute of
  type `param_type` (wrapping an `nnx.VariableMetadata` keeps the base weight's metadata), rng from the module's
  `qwix_rngs` that `quantize_model` sets for its first call, one draw per created leaf (qwix:
  `flax_util.get_or_create_param`).
  """
  return _flax_util.get_or_create_param(name, init_fn, nnx_param_type=param_type, need_rng=need_rng)


def make_rng(stream: str) -> jax.Array:
  """A key from `stream` of the current module (linen `make_rng`; NNX the module's `qwix_rngs`)."""
  return _flax_util.make_rng(stream)


def unbox(boxed: Any) -> Any:
  """The raw array inside linen `AxisMetadata` / `nnx.Variable` / `nnx.VariableMetadata`, nested or not."""
  return _flax_util.unbox(boxed)


def update_sharding(spec: Any, transpose: Sequence[int | None]) -> Any:
  """`spec` with its entries picked by `transpose` (None: replicated), as qwix derives LoRA shardings."""
  return _flax_util.update_sharding(spec, transpose=transpose)


def update_boxed(boxed: Any, value: jax.Array, transpose: Sequence[int | None]) -> Any:
  """`value` in the box of `boxed` (linen `Partitioned`-style metadata or `nnx.Variable`), its axis names
  (`names`, `sharding_names`, `out_sharding`) picked by `transpose`; a bare array gives `value` back."""
  return _flax_util.update_boxed(boxed, value=value, transpose=transpose)


def einsum_operands(einsum_str: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """(lhs, rhs, out) subscripts of a binary einsum, ellipsis and implicit output resolved (qwix: `EinsumInfo`)."""
  info = _einsum_info.EinsumInfo.parse(einsum_str, ndims=(lhs_ndim, rhs_ndim))
  return info.lhs, info.rhs, info.out


def ptq_dot_general(provider: qwix.PtqProvider, *args, **kwargs) -> jax.Array:
  """The base op without LoRA: `PtqProvider.dot_general` (plain `lax.dot_general`, or qwix's quantized one when the
  rule has a `weight_qtype`, which also replaces the weight by its quantized `WithAux` on first use)."""
  return qwix.PtqProvider.dot_general(provider, *args, **kwargs)


def ptq_einsum(provider: qwix.PtqProvider, *args, **kwargs) -> jax.Array:
  """The base op without LoRA: `PtqProvider.einsum` (see `ptq_dot_general`)."""
  return qwix.PtqProvider.einsum(provider, *args, **kwargs)


def current_rule(provider: qwix.QuantizationProvider, op_name: str) -> Any:
  """The first rule of `provider` whose `module_path` fully matches the current module's path and whose `op_names`
  allow `op_name`; None when none does (qwix: `QuantizationProvider._get_current_rule_and_op_id(only_rule=True)`)."""
  return provider._get_current_rule_and_op_id(op_name, only_rule=True)[0]  # pylint: disable=protected-access


def initial_run_complete(provider: qwix.QuantizationProvider) -> bool:
  """Whether a model call through `provider` has returned (qwix sets it in `process_model_output`)."""
  return bool(getattr(provider, "_initial_run_complete", False))


def quantize_model(model: Any, provider: qwix.QuantizationProvider, *args, methods: Sequence[str], **kwargs) -> Any:
  """qwix's `quantize_model` (what `qwix.apply_lora_to_model` calls after its rngs default), public as
  `qwix.quantize_model`; kept here so the one call path into qwix is in this module."""
  return qwix.quantize_model(model, provider, *args, methods=methods, **kwargs)
