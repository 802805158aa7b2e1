"""Device meshes and partition rules for frozen weights and SoRA adapter leaves.

The mesh has the axes ('data', 'fsdp', 'tensor'). Batches are split over ('data', 'fsdp') together, as in FSDP
(every device sees different examples); frozen weights are replicated, or, when the fsdp axis is larger than one,
each leaf of at least `min_size` elements is split over 'fsdp' along its largest axis that divides evenly. The
'tensor' axis is reserved for tensor parallelism; no rule here uses it yet, so it is best left at 1.

Adapter leaves follow their base weight. linen layout (`.../kernel` of shape (*lead, *in_shape, *out_shape)):
  sora_a (*lead, *in_shape, rank):  the kernel's spec on lead and in axes, rank replicated;
  sora_b (*lead, rank, *out_shape): the kernel's spec on lead and out axes, rank replicated;
  sora_gate (*lead, rank):          the kernel's spec on lead axes.
qwix layout: each leaf axis takes the spec of the weight axis it runs along, as qwix derives LoRA shardings (a
flattened group of axes takes its first axis's; the rank axis is replicated; see `sora_jax.layout`).
So the low-rank factors are split exactly where their weight is, and `x @ A`, `h @ B` need no extra resharding.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sora_jax import adapters
from sora_jax import leaves

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

PyTree = Any


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor') over `devices` (default: all); one size may be -1 (the rest).

  With no -1 and fewer devices asked for than given, the mesh takes the first ones (e.g. a 1-device run).
  """
  devices = list(jax.devices() if devices is None else devices)
  if -1 not in (data, fsdp, tensor) and data * fsdp * tensor < len(devices):
    devices = devices[: data * fsdp * tensor]
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into mesh axes of product {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
      f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {math.prod(sizes)} "
      f"devices, have {len(devices)}"
    )
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_spec(leading: int = 0) -> P:
  """Spec of a batch array whose example axis comes after `leading` axes (e.g. 1 for (accum, batch, ...))."""
  return P(*([None] * leading), BATCH_AXES)


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split; batch sizes must divide by it."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def frozen_spec(shape: Sequence[int], mesh: Mesh, min_size: int = 2**14) -> P:
  """Replicated, or split over 'fsdp' along the largest axis that divides evenly (leaves of >= min_size)."""
  fsdp = mesh.shape["fsdp"]
  if fsdp == 1 or math.prod(shape) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def param_specs(params: PyTree, mesh: Mesh, min_size: int = 2**14, reference: Optional[PyTree] = None) -> dict:
  """PartitionSpec tree (a nested dict) for `params` (frozen, adapted, or either half of `split`; linen params, an
  `nnx.State` or a pure dict, of either adapter layout).

  Args:
    params: a parameter tree (arrays or `jax.ShapeDtypeStruct`s).
    mesh: the mesh; only its 'fsdp' size matters.
    min_size: frozen leaves with fewer elements stay replicated.
    reference: a tree holding the base weights when `params` holds adapter leaves without them (the trainable half
      of `split`); default `params` itself.
  """
  flat = {path: leaves.value(leaf) for path, leaf in leaves.flatten(params)[0].items()}
  ref = (
    dict(flat)
    if reference is None
    else {**{path: leaves.value(leaf) for path, leaf in leaves.flatten(reference)[0].items()}, **flat}
  )
  specs = {
    path: frozen_spec(leaf.shape, mesh, min_size) for path, leaf in flat.items() if not leaves.is_adapter_leaf(path)
  }
  for rec in leaves.find_adapters(flat):
    if rec.weight not in ref or rec.b not in ref:
      raise ValueError(
        f"{leaves.path_str(rec.a)}: its base kernel (weight) and both factors are needed to derive its "
        "sharding; pass the tree that holds them as reference="
      )
    w_shape = leaves.weight_shape(ref, rec.weight)
    kspec = tuple(frozen_spec(w_shape, mesh, min_size))
    kspec += (None,) * (len(w_shape) - len(kspec))
    for path, axes in zip(rec.leaves, adapters.weight_roles(ref, rec).leaf_axes()):
      if path in flat:
        specs[path] = P(*(None if i is None else kspec[i] for i in axes))
    if rec.axes in flat:
      specs[rec.axes] = P()
  return traverse_util.unflatten_dict(specs)


def named(specs: PyTree, mesh: Mesh) -> PyTree:
  """NamedSharding tree from a PartitionSpec tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


_MULTI_HOST_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _multi_host_env() -> bool:
  if any(os.environ.get(k) for k in _MULTI_HOST_ENV):
    return True
  for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_NUM_PROCESSES"):
    if int(os.environ.get(key, "1") or 1) > 1:
      return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def _explicit_env() -> dict:
  """initialize()'s arguments from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, when set.

  JAX reads only the address from the environment; without the other two it stops with "Number of processes must be
  defined", so all three are read here and passed explicitly.
  """
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not address:
    return {}
  values = {}
  for key, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    raw = os.environ.get(key, "")
    try:
      values[name] = int(raw)
    except ValueError:
      raise ValueError(
        f"JAX_COORDINATOR_ADDRESS is set but {key} is {raw!r}; set {key} to an integer on every "
        "process (or unset JAX_COORDINATOR_ADDRESS to use the cluster's own detection)"
      ) from None
  if values["num_processes"] < 1 or not 0 <= values["process_id"] < values["num_processes"]:
    raise ValueError(
      f"JAX_PROCESS_ID={values['process_id']} must be in [0, JAX_NUM_PROCESSES="
      f"{values['num_processes']}); number the processes 0, 1, ..."
    )
  return {"coordinator_address": address, **values}


def maybe_initialize_distributed(initialization_timeout: int = 300) -> bool:
  """Calls `jax.distributed.initialize` when the environment describes several hosts; returns whether it did.

  With JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID set, those three are
  passed explicitly; otherwise `initialize()` detects the cluster itself (TPU pod metadata, SLURM, Open MPI). So one
  command runs on every host. An incomplete JAX_* environment raises `ValueError` naming the missing variable.
  `initialization_timeout` (seconds) is how long JAX waits for every process to reach the coordinator.
  """
  if not _multi_host_env():
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(**_explicit_env(), initialization_timeout=initialization_timeout)
  return True


def put_batch(batch: dict, mesh: Mesh, leading: int = 0) -> dict:
  """Places a global batch (host numpy arrays) on the mesh, examples split over ('data', 'fsdp').

  On several hosts each process passes the full global batch and contributes the rows of its addressable shards.
  """
  sharding = NamedSharding(mesh, batch_spec(leading))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)

  def put(x):
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, batch)
