"""What a compiled step costs per device, read from the program XLA built for it, before anything runs.

From a `jax.stages.Compiled` (a `jax.jit(...).lower(...).compile()` on a mesh) it reads, per device:

  memory   `memory_analysis()`: argument, output, aliased (donated) and temporary bytes; peak is
           argument + output - alias + temporary, XLA's own bound on what one device holds during the step
  FLOPs    `cost_analysis()["flops"]`
  collectives  every all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute in `as_text()`:
           count, result bytes, and the mesh axes its groups span (a group's members are partition ids, i.e. flat
           indices into `mesh.devices`; an axis is spanned when members differ along it)

and formats them as a table with the device memories the step fits in. `python -m bench.scale` and
`python -m train.glue ... train.compile_only=true` print it. On XLA's CPU backend (fake devices,
`--xla_force_host_platform_device_count`) the memory and FLOPs are those of the partitioned program; the collective
counts and temporaries are the CPU compiler's (an accelerator's combines and schedules differently), to be read as
ratios between methods rather than as a device's numbers.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

GiB = 2**30
DEVICE_MEMORIES_GIB = (16, 32, 80, 96, 141)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_BYTES = {
  "pred": 1,
  "s8": 1,
  "u8": 1,
  "s16": 2,
  "u16": 2,
  "f16": 2,
  "bf16": 2,
  "s32": 4,
  "u32": 4,
  "f32": 4,
  "s64": 8,
  "u64": 8,
  "f64": 8,
  "c64": 8,
  "c128": 16,
  "f8e4m3fn": 1,
  "f8e5m2": 1,
  "s4": 1,
  "u4": 1,
}
_OP = re.compile(
  r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+(?P<op>"
  + "|".join(COLLECTIVES)
  + r")(?P<start>-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")
_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
# XLA's mesh form: replica_groups=mesh['axis_0'=8,'axis_1'=8], device_ids=([8,8]T(1,0)) {'axis_0'}
_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}")
_LIST = re.compile(r"(?:replica_groups|source_target_pairs)=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective kind over one set of mesh axes: how many ops and their summed result bytes (per device)."""

  kind: str
  axes: str
  count: int
  bytes: int


@dataclasses.dataclass(frozen=True)
class StepCost:
  """Per-device cost of one compiled program.

  Attributes:
    argument, output, alias, temp: bytes from `memory_analysis()`.
    flops: `cost_analysis()["flops"]`.
    collectives: one `Collective` per (kind, axes), sorted.
  """

  argument: int
  output: int
  alias: int
  temp: int
  flops: float
  collectives: tuple[Collective, ...]

  @property
  def peak(self) -> int:
    """argument + output - alias + temp: bytes one device holds at most during the step."""
    return self.argument + self.output - self.alias + self.temp

  def count(self, kind: str | None = None) -> int:
    """Number of collectives (of `kind`, or all)."""
    return sum(c.count for c in self.collectives if kind is None or c.kind == kind)

  def collective_bytes(self, kind: str | None = None) -> int:
    return sum(c.bytes for c in self.collectives if kind is None or c.kind == kind)

  def fits(self, gib: float) -> bool:
    return self.peak <= gib * GiB

  def as_dict(self) -> dict[str, Any]:
    return {
      "argument": self.argument,
      "output": self.output,
      "alias": self.alias,
      "temp": self.temp,
      "peak": self.peak,
      "flops": self.flops,
      "collectives": [dataclasses.asdict(c) for c in self.collectives],
    }


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO result shape: `f32[8,128]{1,0}` or a tuple `(f32[8]{0}, bf16[4,4]{1,0})`."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue
    total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _groups(rest: str) -> list[list[int]]:
  """The device groups of one collective's attributes: iota form `[G,S]<=[dims]T(perm)`, XLA's mesh form
  `mesh['axis_0'=8,'axis_1'=8], device_ids=([8,8]T(1,0)) {'axis_0'}` (device ids laid out on that mesh, groups along
  the named axes), or explicit lists."""
  iota = _IOTA.search(rest)
  if iota:
    shape = [int(d) for d in iota[1].split(",")]
    dims = [int(d) for d in iota[2].split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota[3]:
      ids = ids.transpose([int(p) for p in iota[3].split(",")])
    return ids.reshape(shape[0], -1).tolist()
  mesh = _MESH.search(rest)
  if mesh:
    names = re.findall(r"'(\w+)'=(\d+)", mesh[1])
    sizes = [int(size) for _, size in names]
    ids = np.arange(math.prod(sizes))
    if mesh[2]:
      ids = ids.reshape([int(d) for d in mesh[2].split(",")])
      if mesh[3]:
        ids = ids.transpose([int(p) for p in mesh[3].split(",")])
    ids = ids.reshape(sizes)
    over = [i for i, (name, _) in enumerate(names) if f"'{name}'" in mesh[4]]
    ids = np.moveaxis(ids, over, list(range(len(sizes) - len(over), len(sizes))))
    return ids.reshape(-1, math.prod(sizes[i] for i in over)).tolist()
  listed = _LIST.search(rest)
  if listed:
    return [[int(i) for i in group.strip("{}").split(",") if i] for group in re.findall(r"\{[\d,]*\}", listed[1])]
  return []


def _axes(groups: list[list[int]], mesh_shape: Sequence[int], axis_names: Sequence[str]) -> str:
  """The mesh axes along which members of a group differ, joined by '+' (an empty group list is every device), '-'
  when no group spans any axis."""
  if not groups:
    return "+".join(name for name, size in zip(axis_names, mesh_shape) if size > 1) or "-"
  size = math.prod(mesh_shape)
  spanned = set()
  for group in groups:
    if not group or max(group) >= size:
      continue
    coords = np.stack(np.unravel_index(np.asarray(group), tuple(mesh_shape)), axis=-1)
    spanned.update(i for i in range(len(mesh_shape)) if len(set(coords[:, i])) > 1)
  return "+".join(axis_names[i] for i in sorted(spanned)) or "-"


def collectives(hlo_text: str, mesh_shape: Sequence[int], axis_names: Sequence[str]) -> tuple[Collective, ...]:
  """Every collective of an optimised HLO module (`Compiled.as_text()`), grouped by kind and spanned mesh axes.

  An async pair (`all-gather-start` / `-done`) counts once, by its start; its bytes are those of its last result
  array (the start returns (operand, result)).
  """
  found: dict[tuple[str, str], list[int]] = {}
  for line in hlo_text.splitlines():
    match = _OP.match(line)
    if match is None:
      continue
    shape = match["shape"]
    if match["start"]:
      arrays = _ARRAY.findall(shape)
      shape = f"{arrays[-1][0]}[{arrays[-1][1]}]" if arrays else ""
    key = (match["op"], _axes(_groups(match["rest"]), mesh_shape, axis_names))
    entry = found.setdefault(key, [0, 0])
    entry[0] += 1
    entry[1] += _shape_bytes(shape)
  return tuple(Collective(kind, axes, n, b) for (kind, axes), (n, b) in sorted(found.items()))


def step_cost(compiled: Any, mesh: Any) -> StepCost:
  """`StepCost` of a `jax.stages.Compiled` built on `mesh` (a `jax.sharding.Mesh`)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return StepCost(
    argument=int(memory.argument_size_in_bytes),
    output=int(memory.output_size_in_bytes),
    alias=int(memory.alias_size_in_bytes),
    temp=int(memory.temp_size_in_bytes),
    flops=float(cost.get("flops", 0.0)),
    collectives=collectives(compiled.as_text(), tuple(mesh.devices.shape), tuple(mesh.axis_names)),
  )


def sharded_bytes(abstract: Any) -> int:
  """Summed per-device shard bytes of a tree of `jax.ShapeDtypeStruct`s with shardings (what one device holds of
  them): the check on `memory_analysis()`'s argument bytes. Leaves without a sharding (an input the compiled
  program does not use, which jit drops) count nothing."""
  import jax

  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
    for x in jax.tree.leaves(abstract)
    if x.sharding is not None
  )


def _mib(n: float) -> str:
  return f"{n / 2**20:,.0f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
  widths = [max(map(len, column)) for column in zip(header, *rows)]
  lines = [
    [cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
    for row in [header, ["-" * w for w in widths], *rows]
  ]
  return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def format_cost(rows: Sequence[tuple[str, StepCost]], memories: Sequence[float] = DEVICE_MEMORIES_GIB) -> str:
  """A markdown table, one row per (label, cost): memory in MiB, GFLOP, collectives by kind, and the device
  memories (GiB) the peak fits in."""
  kinds = [k for k in COLLECTIVES if any(c.count(k) for _, c in rows)]
  header = ["step", "argument MiB", "temp MiB", "peak MiB", "GFLOP"] + [f"{k} n / MiB" for k in kinds] + ["fits (GiB)"]
  table = []
  for label, c in rows:
    fits = [f"{m:g}" for m in memories if c.fits(m)]
    table.append(
      [label, _mib(c.argument), _mib(c.temp), _mib(c.peak), f"{c.flops / 1e9:,.0f}"]
      + [f"{c.count(k)} / {_mib(c.collective_bytes(k))}" for k in kinds]
      + [" ".join(fits) if fits else "none"]
    )
  return _markdown(header, table)


def format_axes(cost: StepCost) -> str:
  """One line per collective kind: count and MiB on each set of mesh axes."""
  lines = []
  for kind in COLLECTIVES:
    parts = [f"{c.axes}: {c.count} ({_mib(c.bytes)} MiB)" for c in cost.collectives if c.kind == kind]
    if parts:
      lines.append(f"  {kind}: " + ", ".join(parts))
  return "\n".join(lines)
