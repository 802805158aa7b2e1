"""Shapes of an adapter: the roles of a weight's axes, the delta in the weight's layout, pruning (both layouts).

A weight W seen by `SoraProvider` has axes in three roles: batch (kept by the op, e.g. n in 'bnd,ndh->bnh'),
contracting (summed with the input) and remaining (output-only). The leaves are laid out as

  dot_general:  A (*W[batch], prod W[contract], r),  B (*W[batch], r, prod W[remain]),  gate (*W[batch], r)
  einsum:       A (*W[batch + contract in W order], r),  B (r, *W[remain]),  gate (*W[batch], r)

and delta W = s * sum_r A[..., r] gate[..., r] B[r, ...] placed back on W's axes.

The roles are read from the tree, never from a provider's memory: by convention, the reading of the leaf shapes
with the fewest batch axes and, among those, W's axes in the order batch, contracting, remaining (an (in, out)
kernel, `nnx.LinearGeneral`'s (*batch, *in, *out), an einsum 'bnd,ndh->bnh' weight (n, d, h), a conv kernel
(*window, in, out)). An op whose weight does not follow it (`x @ W.T` on a square W, `'...d,vd->...v'` with v = d)
gets its roles recorded beside the adapter when the adapter is created, as the int32 leaf `<w>_lora_axes`
(`encode`); `read_roles` prefers that record. A leaf is an array, so the record survives `nnx.state`,
`nnx.split`/`nnx.merge`, `nnx.to_pure_dict` and checkpoints.
"""

from __future__ import annotations

import itertools
import math
import string
from typing import Any, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Kind = Literal["dot", "einsum", "linen"]


class WeightRoles(NamedTuple):
  """The roles of W's axes (indices into W.shape, in the order the op lists them).

  kind: "dot" and "einsum" are qwix's layouts (module docstring); "linen" is `sora_jax.init`'s layout beside a
  kernel (*lead, *in, *out): A (*W[batch], *W[contract], r), B (*W[batch], r, *W[remain]), gate (*W[batch], r), the
  stacked-layer axes being the batch axes.
  """

  kind: Kind
  batch: tuple[int, ...]
  contract: tuple[int, ...]
  remain: tuple[int, ...]

  def a_axes(self) -> tuple[int, ...]:
    """W axes along A's non-rank axes (dot_general: batch then the flattened contracting axes)."""
    if self.kind == "einsum":
      return tuple(sorted(self.batch + self.contract))
    return self.batch + self.contract

  def b_axes(self) -> tuple[int | str, ...]:
    """W axes along B's axes, 'r' marking the rank axis."""
    if self.kind == "einsum":
      return ("r",) + self.remain
    return self.batch + ("r",) + self.remain

  def shapes(self, w_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(A, B, gate) shapes at `rank`."""
    dims = lambda axes: tuple(w_shape[i] for i in axes)
    gate = (*dims(self.batch), rank)
    if self.kind == "dot":
      return (
        (*dims(self.batch), math.prod(dims(self.contract)), rank),
        (*dims(self.batch), rank, math.prod(dims(self.remain))),
        gate,
      )
    b = tuple(rank if i == "r" else w_shape[i] for i in self.b_axes())
    return (*dims(self.a_axes()), rank), b, gate

  def leaf_axes(self) -> tuple[tuple[int | None, ...], tuple[int | None, ...], tuple[int | None, ...]]:
    """For each of A, B, gate: the W axis whose sharding each leaf axis takes (None: replicated), as qwix derives
    LoRA shardings (a flattened group takes its first axis's; the rank axis is replicated)."""
    if self.kind == "dot":
      return (
        (*self.batch, self.contract[0] if self.contract else None, None),
        (*self.batch, None, self.remain[0] if self.remain else None),
        (*self.batch, None),
      )
    return ((*self.a_axes(), None), tuple(None if i == "r" else i for i in self.b_axes()), (*self.batch, None))

  @property
  def b_rank_axis(self) -> int:
    """Position of the rank axis in B."""
    return self.b_axes().index("r")

  def canonical(self, w_shape: Sequence[int], with_gate: bool) -> tuple:
    """What the delta depends on: the axis sequences of A, B and the gate, size-1 axes dropped (they index nothing)."""
    keep = lambda axes: tuple(i for i in axes if i == "r" or w_shape[i] != 1)
    return keep(self.a_axes()), keep(self.b_axes()), keep(self.batch) if with_gate else ()


def with_lead(name: str, roles: WeightRoles, a_ndim: int) -> WeightRoles:
  """`roles` recorded on one layer, for leaves that carry `lead` stacked-layer axes in front (a model whose layers
  were created with `nnx.vmap` and run with `nnx.scan`: the provider saw one slice). The stacked axes act as batch
  axes of a dot_general; stacked einsum weights are not supported.

  Raises:
    NotImplementedError: a stacked einsum weight.
  """
  a_ndim_one = len(roles.batch) + 2 if roles.kind == "dot" else len(roles.a_axes()) + 1
  lead = a_ndim - a_ndim_one
  if lead <= 0:
    return roles
  if roles.kind != "dot":
    raise NotImplementedError(
      f"{name}: a stacked (nnx.scan) einsum weight is not supported by the tree functions; unstack the layers first."
    )
  shift = lambda axes: tuple(i + lead for i in axes)
  return WeightRoles("dot", tuple(range(lead)) + shift(roles.batch), shift(roles.contract), shift(roles.remain))


_KINDS: tuple[Kind, ...] = ("dot", "einsum", "linen")
_QWIX_KINDS: tuple[Kind, ...] = ("dot", "einsum")


def linen_roles(kernel_ndim: int, a_ndim: int, b_ndim: int) -> WeightRoles:
  """The roles of a linen-layout kernel's axes, read off the ranks of the kernel, A and B: lead = a.ndim + b.ndim - 2
  - kernel.ndim stacked-layer axes (batch), then the input axes (contracting), then the output axes."""
  lead = a_ndim + b_ndim - 2 - kernel_ndim
  n_in = a_ndim - 1 - lead
  return WeightRoles(
    "linen", tuple(range(lead)), tuple(range(lead, lead + n_in)), tuple(range(lead + n_in, kernel_ndim))
  )


def dot_roles(dimension_numbers: Any, rhs_ndim: int) -> WeightRoles:
  """The roles of the rhs weight's axes in `lax.dot_general(lhs, rhs, dimension_numbers)`."""
  (_, rhs_ca), (_, rhs_ba) = dimension_numbers
  rhs_ca, rhs_ba = tuple(rhs_ca), tuple(rhs_ba)
  return WeightRoles("dot", rhs_ba, rhs_ca, tuple(i for i in range(rhs_ndim) if i not in rhs_ca + rhs_ba))


def einsum_roles(lhs_sub: str, rhs_sub: str, out_sub: str) -> WeightRoles:
  """The roles of the rhs weight's axes in a binary einsum 'lhs,rhs->out' (resolved subscripts)."""
  batch = tuple(i for i, c in enumerate(rhs_sub) if c in lhs_sub and c in out_sub)
  contract = tuple(i for i, c in enumerate(rhs_sub) if c in lhs_sub and i not in batch)
  return WeightRoles("einsum", batch, contract, tuple(i for i, c in enumerate(rhs_sub) if c not in lhs_sub))


def conv_roles(rhs_ndim: int) -> WeightRoles:
  """qwix's LoRA on `conv_general_dilated` (out features last): A (*W[:-1], r), B (r, W[-1])."""
  return WeightRoles("einsum", (), tuple(range(rhs_ndim - 1)), (rhs_ndim - 1,))


def encode(roles: WeightRoles) -> np.ndarray:
  """The record `<w>_lora_axes`: int32 [kind, #batch, #contract, *batch, *contract, *remain] (kind 0 dot, 1 einsum)."""
  return np.asarray(
    [_KINDS.index(roles.kind), len(roles.batch), len(roles.contract), *roles.batch, *roles.contract, *roles.remain],
    np.int32,
  )


def decode(record: Any) -> WeightRoles:
  """Inverse of `encode`; a record with leading stacked-layer axes (every row the same) reads its first row."""
  row = np.asarray(record).reshape(-1, np.shape(record)[-1])[0]
  kind, nb, nc = (int(x) for x in row[:3])
  axes = tuple(int(x) for x in row[3:])
  return WeightRoles(_KINDS[kind], axes[:nb], axes[nb : nb + nc], axes[nb + nc :])


def convention(
  w_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int], gate_shape: Sequence[int] | None
) -> WeightRoles | None:
  """The conventional reading of W's axes from the leaf shapes (see the module docstring); None when none fits."""
  w_shape, a_shape, b_shape = tuple(w_shape), tuple(a_shape), tuple(b_shape)
  rank = a_shape[-1] if a_shape else -1
  best = None
  for assignment in itertools.product(range(3), repeat=len(w_shape)):
    groups = tuple(tuple(i for i, g in enumerate(assignment) if g == role) for role in range(3))
    key = (len(groups[0]), assignment)
    if best is not None and key >= best[0]:
      continue
    for kind in _QWIX_KINDS:
      roles = WeightRoles(kind, *groups)
      a, b, gate = roles.shapes(w_shape, rank)
      if a == a_shape and b == b_shape and (gate_shape is None or gate == tuple(gate_shape)):
        best = (key, roles)
        break
  return None if best is None else best[1]


def needs_record(roles: WeightRoles, w_shape: Sequence[int], rank: int, gated: bool) -> bool:
  """Whether the convention misreads the leaves that `roles` create (then `<w>_lora_axes` must record them)."""
  a, b, gate = roles.shapes(w_shape, rank)
  found = convention(w_shape, a, b, gate if gated else None)
  return found is None or found.canonical(w_shape, gated) != roles.canonical(w_shape, gated)


def read_roles(
  name: str,
  w_shape: Sequence[int],
  a_shape: Sequence[int],
  b_shape: Sequence[int],
  gate_shape: Sequence[int] | None,
  record: Any = None,
) -> WeightRoles:
  """The roles of W's axes: the recorded `<w>_lora_axes` when given (stacked layers added), else the convention.

  Raises:
    ValueError: the leaf shapes fit no qwix LoRA layout of the weight.
  """
  if record is not None:
    roles = with_lead(name, decode(record), len(a_shape))
  else:
    roles = convention(w_shape, a_shape, b_shape, gate_shape)
  if roles is None or roles.shapes(w_shape, a_shape[-1])[:2] != (tuple(a_shape), tuple(b_shape)):
    gate = None if gate_shape is None else tuple(gate_shape)
    raise ValueError(
      f"{name}: the adapter's shapes do not fit qwix's LoRA layout of this weight (weight "
      f"{tuple(w_shape)}, A {tuple(a_shape)}, B {tuple(b_shape)}, gate {gate}); was the tree edited, or "
      "does it come from another model?"
    )
  return roles


def delta(
  roles: WeightRoles, w_shape: Sequence[int], a: jax.Array, b: jax.Array, gate: jax.Array | None, scale: float
) -> jax.Array:
  """s * A diag(gate) B laid out like W (shape `w_shape`); differentiable, jit-able."""
  letters = string.ascii_letters
  w_sub = letters[: len(w_shape)]
  r = letters[len(w_shape)]
  rank = a.shape[-1]
  a = a.reshape(*(w_shape[i] for i in roles.a_axes()), rank)
  b = b.reshape(*(rank if i == "r" else w_shape[i] for i in roles.b_axes()))
  a_sub = "".join(w_sub[i] for i in roles.a_axes()) + r
  b_sub = "".join(r if i == "r" else w_sub[i] for i in roles.b_axes())
  if gate is None:
    out = jnp.einsum(f"{a_sub},{b_sub}->{w_sub}", a, b, precision=jax.lax.Precision.HIGHEST)
  else:
    g_sub = "".join(w_sub[i] for i in roles.batch) + r
    out = jnp.einsum(f"{a_sub},{g_sub},{b_sub}->{w_sub}", a, gate, b, precision=jax.lax.Precision.HIGHEST)
  return scale * out


class Batching(NamedTuple):
  """How the gate's batch axes sit in A and B: `nb` batch axes; `b_batched`: B carries them (dot_general, or no
  batch); `a_positions`: where they are among A's non-rank axes."""

  nb: int
  b_batched: bool
  a_positions: tuple[int, ...]

  @property
  def b_rank_axis(self) -> int:
    """Position of the rank axis in B: after the batch axes where B carries them, else first."""
    return self.nb if self.b_batched else 0


def batching(roles: WeightRoles) -> Batching:
  """How the gate's batch axes sit in A and B, from the weight's roles."""
  nb = len(roles.batch)
  if roles.kind != "einsum" or nb == 0:
    return Batching(nb, True, tuple(range(nb)))
  return Batching(nb, False, tuple(roles.a_axes().index(i) for i in roles.batch))


def fans(a_shape, b_shape, layout: Batching) -> tuple[int, int]:
  """(fan_in, fan_out) of one batch entry (its slices of A and B; a batched einsum's entries each read all of B)."""
  batch = math.prod(a_shape[i] for i in layout.a_positions)
  fan_in = math.prod(a_shape[:-1]) // max(batch, 1)
  if layout.b_batched:
    return fan_in, math.prod(b_shape[layout.nb + 1 :])
  return fan_in, math.prod(b_shape[1:])


class RankCost(NamedTuple):
  """The adapter parameters of one adapter's ranks: the one count of `rank_report`, `sora_budget`, `cut_to_budget`,
  `truncate` and `adapter_params`.

  rank: the adapter's rank now (A's last axis).
  slice: the parameters of one rank of the whole adapter, every batch entry included: prod(A's non-rank axes) +
    prod(B's non-rank axes). (n, d) x (d, h) is d + h; a dot_general with n batch entries (B (n, r, h)) n (d + h);
    a batched einsum 'bnd,ndh->bnh', whose B (r, h) the n entries share, n d + h.
  entries: the gate entries of one rank (the product of the gate's batch axes; 1 without any).
  """

  rank: int
  slice: int
  entries: int

  @property
  def per_entry(self) -> float:
    """One rank of one gate entry, slice / entries = (|A| + |B|) / |gate| (rank > 0): fan_in + fan_out of the entry
    where B carries the batch axes, fan_in + fan_out / entries where the entries share B (each carries its share)."""
    return self.slice / max(self.entries, 1)

  @property
  def total(self) -> int:
    """|A| + |B|: every rank of every entry."""
    return self.rank * self.slice

  def params(self, ranks: int) -> int | float:
    """`ranks` gate entries' parameters, ranks * per_entry; an int unless a shared B leaves a fraction of a row."""
    whole, rest = divmod(ranks * self.slice, max(self.entries, 1))
    return whole if rest == 0 else ranks * self.slice / self.entries


def rank_cost(a_shape, b_shape, batch_shape, b_rank_axis: int | None = None) -> RankCost:
  """The `RankCost` of an adapter from the shapes of A, B and the gate's batch axes (`batch_shape`, gate[:-1]).

  `b_rank_axis` is B's rank axis (`Batching`: nb where B carries the batch axes, else 0); None reads it from the
  shapes: len(batch_shape) when B starts with the batch shape and the rank, else 0 (at rank > 0 every axis of B of
  size r gives the same slice, |B| / r, so the reading cannot go wrong there).
  """
  a_shape, b_shape, batch_shape = tuple(a_shape), tuple(b_shape), tuple(batch_shape)
  rank, nb = a_shape[-1], len(batch_shape)
  if b_rank_axis is None:
    b_rank_axis = nb if b_shape[: nb + 1] == batch_shape + (rank,) else 0
  b_slice = math.prod(b_shape[:b_rank_axis] + b_shape[b_rank_axis + 1 :])
  return RankCost(rank, math.prod(a_shape[:-1]) + b_slice, math.prod(batch_shape))


def active_ranks(gate: np.ndarray | None, b: np.ndarray, layout: Batching) -> np.ndarray:
  """(entries, r) bool: ranks that are on (gate != 0 and a nonzero row of B), per batch entry."""
  r = b.shape[layout.nb] if layout.b_batched else b.shape[0]
  # Explicit sizes: at r = 0 a -1 in reshape is ambiguous.
  if layout.b_batched:
    nb = layout.nb
    b_on = np.any(b.reshape(math.prod(b.shape[:nb]), r, math.prod(b.shape[nb + 1 :])) != 0, axis=-1)
  else:
    b_on = np.any(b.reshape(r, math.prod(b.shape[1:])) != 0, axis=-1)[None]
  if gate is None:
    return b_on
  return (gate.reshape(math.prod(gate.shape[:-1]), r) != 0) & b_on


def prune_one(
  a: np.ndarray, b: np.ndarray, gate: np.ndarray, layout: Batching
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts the off ranks of one gated adapter and folds the gate in; returns (A, B, gate) at rank k.

  B carries the batch axes (dot_general, or no batch): k = the largest active count over batch entries, each entry's
  active ranks first, the rest zero columns of A / rows of B; gate folded into B. B shared by the batch entries
  (batched einsum): the ranks active in any entry are kept, gate folded into A. The new gate is 1 at kept-and-active
  entries and 0 elsewhere, so
  the function is unchanged and any reader that ignores the gate (qwix's LoRA) computes the same.
  """
  nb, r = layout.nb, gate.shape[-1]
  active = active_ranks(gate, b, layout)
  batch_shape = gate.shape[:-1]
  if layout.b_batched:
    entries = math.prod(batch_shape)
    a2 = a.reshape(entries, math.prod(a.shape[nb:-1]), r)
    b2 = b.reshape(entries, r, math.prod(b.shape[nb + 1 :])) * gate.reshape(entries, r, 1).astype(b.dtype)
    k = int(active.sum(axis=-1).max(initial=0))
    new_a = np.zeros(a2.shape[:-1] + (k,), a.dtype)
    new_b = np.zeros((entries, k, b2.shape[-1]), b.dtype)
    new_gate = np.zeros((entries, k), gate.dtype)
    for entry, on in enumerate(active):
      idx = np.flatnonzero(on)
      new_a[entry, :, : idx.size] = a2[entry][:, idx]
      new_b[entry, : idx.size] = b2[entry][idx]
      new_gate[entry, : idx.size] = 1
    return (
      new_a.reshape(a.shape[:-1] + (k,)),
      new_b.reshape(b.shape[:nb] + (k,) + b.shape[nb + 1 :]),
      new_gate.reshape(batch_shape + (k,)),
    )
  keep = np.flatnonzero(active.any(axis=0))
  g_shape = [1] * (a.ndim - 1) + [r]
  for pos, size in zip(layout.a_positions, batch_shape):
    g_shape[pos] = size
  folded = a * gate.reshape(g_shape).astype(a.dtype)
  return folded[..., keep], b[keep], (gate[..., keep] != 0).astype(gate.dtype)
