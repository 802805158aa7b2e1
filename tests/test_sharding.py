"""Partition rules: frozen leaves over 'fsdp', adapter leaves derived from their base kernel; mesh helpers."""

import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from sora_jax import sharding


def _mesh(fsdp):
  return types.SimpleNamespace(shape={"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})


def _module(kernel_shape, a_shape, b_shape):
  return {
    "kernel": jnp.zeros(kernel_shape),
    "bias": jnp.zeros(kernel_shape[-1:]),
    "sora_a": jnp.zeros(a_shape),
    "sora_b": jnp.zeros(b_shape),
    "sora_gate": jnp.zeros(a_shape[:-2] + a_shape[-1:]),
  }


@pytest.mark.parametrize(
  "kernel, a, b, want_kernel, want_a, want_b, want_gate",
  [
    ((64, 32), (64, 8), (8, 32), P("fsdp", None), P("fsdp", None), P(None, None), P(None)),
    ((32, 64), (32, 8), (8, 64), P(None, "fsdp"), P(None, None), P(None, "fsdp"), P(None)),
    # under nn.scan: a leading layer axis on every leaf
    (
      (2, 32, 64),
      (2, 32, 8),
      (2, 8, 64),
      P(None, None, "fsdp"),
      P(None, None, None),
      P(None, None, "fsdp"),
      P(None, None),
    ),
    (
      (4, 64, 32),
      (4, 64, 8),
      (4, 8, 32),
      P(None, "fsdp", None),
      P(None, "fsdp", None),
      P(None, None, None),
      P(None, None),
    ),
  ],
)
def test_adapter_leaves_follow_their_kernel(kernel, a, b, want_kernel, want_a, want_b, want_gate):
  params = {"layer": {"dense": _module(kernel, a, b)}}
  specs = sharding.param_specs(params, _mesh(2), min_size=0)["layer"]["dense"]
  assert specs["kernel"] == want_kernel and specs["sora_a"] == want_a
  assert specs["sora_b"] == want_b and specs["sora_gate"] == want_gate


def test_trainable_half_uses_reference_kernels():
  params = {"dense": _module((64, 32), (64, 8), (8, 32))}
  trainable = {"dense": {k: params["dense"][k] for k in ("sora_a", "sora_b", "sora_gate")}}
  frozen = {"dense": {k: params["dense"][k] for k in ("kernel", "bias")}}
  with pytest.raises(ValueError, match="base kernel"):
    sharding.param_specs(trainable, _mesh(2), min_size=0)
  specs = sharding.param_specs(trainable, _mesh(2), min_size=0, reference=frozen)
  assert set(specs["dense"]) == {"sora_a", "sora_b", "sora_gate"} and specs["dense"]["sora_a"] == P("fsdp", None)


def test_replicated_without_fsdp_or_when_small():
  params = {"dense": _module((64, 32), (64, 8), (8, 32)), "odd": jnp.zeros((3, 5))}
  for mesh, min_size in ((_mesh(1), 0), (_mesh(2), 10**6)):
    specs = sharding.param_specs(params, mesh, min_size=min_size)
    assert specs["dense"]["kernel"] == P() and specs["dense"]["sora_b"] == P(None, None)
  assert sharding.param_specs(params, _mesh(2), min_size=0)["odd"] == P()  # 3 and 5 don't divide by 2


def test_make_mesh():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.size == jax.device_count()
  assert sharding.batch_shards(mesh) == jax.device_count()
  with pytest.raises(ValueError, match="devices"):
    sharding.make_mesh(data=-1, fsdp=jax.device_count() + 1)
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh(data=-1, fsdp=-1)


def test_no_distributed_init_on_one_host(monkeypatch):
  for key in (
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "JAX_NUM_PROCESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(key, raising=False)
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert sharding._multi_host_env()


def test_jax_env_is_passed_to_initialize_explicitly(monkeypatch):
  """JAX reads only the coordinator address from the environment; the process count and id must be passed."""
  for key in (
    "COORDINATOR_ADDRESS",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
  ):
    monkeypatch.delenv(key, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert sharding.maybe_initialize_distributed() is True
  assert calls == [
    {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1, "initialization_timeout": 300}
  ]
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    sharding.maybe_initialize_distributed()
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
    sharding.maybe_initialize_distributed()
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
  monkeypatch.setenv("SLURM_NTASKS", "2")
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  assert sharding.maybe_initialize_distributed() is True
  assert calls[-1] == {"initialization_timeout": 300}  # the cluster (SLURM here) is detected by JAX itself
