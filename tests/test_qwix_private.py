"""Pins the qwix internals that sora_jax/_qwix.py wraps, so a qwix upgrade that changes them fails here first."""

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

from sora_jax import _qwix


def test_version_range():
  major, minor, *_ = (int(p) for p in qwix.__version__.split(".")[:3])
  assert (major, minor) == (0, 1), "sora_jax/_qwix.py is written against qwix 0.1.x; re-check every wrapper"


def test_einsum_operands_resolve_ellipsis_and_implicit_output():
  assert _qwix.einsum_operands("bnd,ndh->bnh", 3, 3) == ("bnd", "ndh", "bnh")
  lhs, rhs, out = _qwix.einsum_operands("...d,dh->...h", 3, 2)
  assert len(lhs) == 3 and rhs[-1] == "h" and rhs[0] == lhs[-1] and out[-1] == "h"


def test_update_sharding_and_boxed_transpose():
  assert _qwix.update_sharding(P("fsdp", "tp", None), (0, None)) == P("fsdp", None)
  assert _qwix.update_sharding(("a", "b", "c"), (None, 2)) == (None, "c")
  boxed = nn.Partitioned(jnp.zeros((4, 6)), names=("embed", "mlp"))
  new = _qwix.update_boxed(boxed, jnp.ones((3, 6)), (None, 1))
  assert new.names == (None, "mlp") and new.unbox().shape == (3, 6)
  variable = nnx.Param(jnp.zeros((4, 6)), sharding_names=("embed", "mlp"), eager_sharding=False)
  new = _qwix.update_boxed(variable, jnp.ones((4, 2)), (0, None))
  meta = new.get_metadata()
  assert tuple(meta.get("out_sharding", meta.get("sharding_names"))) == ("embed", None)
  assert _qwix.update_boxed(jnp.zeros(3), jnp.ones(2), (0,)).shape == (2,)


def test_unbox():
  assert _qwix.unbox(nnx.Param(jnp.ones(2))).shape == (2,)
  assert _qwix.unbox(nn.Partitioned(jnp.ones(3), names=("x",))).shape == (3,)
  assert _qwix.unbox(nnx.VariableMetadata(jnp.ones(4), metadata={})).shape == (4,)


class _Probe(nnx.Module):
  """Calls the wrappers from inside an intercepted op, as SoraProvider does."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jnp.ones((3, 2)))

  def __call__(self, x):
    return jax.lax.dot_general(x, self.kernel[...], (((1,), (0,)), ((), ())))


class _RecordingProvider(qwix.LoraProvider):
  def __init__(self, **kw):
    super().__init__(**kw)
    self.seen = {}

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    self.seen["rule"] = _qwix.current_rule(self, "dot_general")
    self.seen["module"] = type(_qwix.current_module()).__name__
    self.seen["param"] = _qwix.find_param(rhs)
    self.seen["activation"] = _qwix.find_param(lhs)
    self.seen["run_complete_during_first_call"] = _qwix.initial_run_complete(self)
    created = _qwix.get_or_create_param("probe_leaf", lambda key: jax.random.normal(key, (2,)), nnx.LoRAParam)
    self.seen["created"] = created.shape
    return _qwix.ptq_dot_general(
      self, lhs, rhs, dimension_numbers, precision, preferred_element_type, out_sharding=out_sharding
    )


def test_provider_internals_inside_an_nnx_call():
  provider = _RecordingProvider(module_path=".*", rank=1, alpha=1.0)
  x = jnp.ones((2, 3))
  model = _qwix.quantize_model(_Probe(nnx.Rngs(0)), provider, x, methods=("__call__",), rngs=nnx.Rngs(0))
  assert provider.seen["rule"] is not None and provider.seen["rule"].rank == 1
  assert provider.seen["module"] == "_Probe"
  assert provider.seen["param"] == "kernel" and provider.seen["activation"] is None
  assert provider.seen["run_complete_during_first_call"] is False
  assert _qwix.initial_run_complete(provider) is True
  assert type(model.probe_leaf) is nnx.LoRAParam and model.probe_leaf[...].shape == (2,)
  np.testing.assert_allclose(model(x), x @ jnp.ones((3, 2)))
  assert model.qwix_path == () and model.qwix_rngs is None  # set for the first call only


def test_ptq_ops_are_plain_without_qtype_and_quantize_with_one():
  class Lin(nnx.Module):
    def __init__(self, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (8, 4)))

    def __call__(self, x):
      return jnp.einsum("bi,io->bo", x, self.kernel[...])

  x = jax.random.normal(jax.random.key(0), (2, 8))
  base = Lin(nnx.Rngs(0))
  plain = qwix.apply_lora_to_model(base, qwix.LoraProvider(module_path=".*", rank=1, alpha=1.0), x, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(plain(x), base(x), atol=1e-6)
  quantized = qwix.apply_lora_to_model(
    base, qwix.LoraProvider(module_path=".*", rank=1, alpha=1.0, weight_qtype="int8"), x, rngs=nnx.Rngs(0)
  )
  assert isinstance(quantized.kernel, _qwix.WithAux)
  assert isinstance(quantized.kernel.array, _qwix.QArray)
  assert quantized.kernel.array.qvalue.dtype == jnp.int8 and quantized.kernel.array.scale.dtype == jnp.float32
  np.testing.assert_allclose(quantized(x), base(x), atol=0.1)


def test_current_rule_first_match_and_op_names():
  rules = [
    qwix.LoraRule(module_path="nomatch", rank=1, alpha=1.0),
    qwix.LoraRule(module_path=".*", op_names=("einsum",), rank=2, alpha=1.0),
    qwix.LoraRule(module_path=".*", rank=3, alpha=1.0),
  ]
  provider = _RecordingProvider.__new__(_RecordingProvider)
  qwix.LoraProvider.__init__(provider, rules)
  provider.seen = {}
  _qwix.quantize_model(_Probe(nnx.Rngs(0)), provider, jnp.ones((1, 3)), methods=("__call__",), rngs=nnx.Rngs(0))
  assert provider.seen["rule"].rank == 3
