"""Shapes of the qwix-layout adapter: the roles of a weight's axes, the delta in the weight's layout, pruning.

A weight W seen by `SoraProvider` has axes in three roles: batch (kept by the op, e.g. n in 'bnd,ndh->bnh'),
contracting (summed with the input) and remaining (output-only). The leaves are laid out as

  dot_general:  A (*W[batch], prod W[contract], r),  B (*W[batch], r, prod W[remain]),  gate (*W[batch], r)
  einsum:       A (*W[batch + contract in W order], r),  B (r, *W[remain]),  gate (*W[batch], r)

and delta W = s * sum_r A[..., r] gate[..., r] B[r, ...] placed back on W's axes. `SoraProvider` records each
weight's roles when it runs the op (`roles_of`); without that record the roles are inferred from the shapes, and a
shape that allows two readings with different results (a square (d, d) kernel: (in, out) or (out, in)?) is an
error that asks for the provider, never a guess.
"""
from __future__ import annotations

import itertools
import math
import string
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Kind = Literal["dot", "einsum"]


class WeightRoles(NamedTuple):
  """The roles of W's axes (indices into W.shape, in the order the op lists them)."""
  kind: Kind
  batch: tuple[int, ...]
  contract: tuple[int, ...]
  remain: tuple[int, ...]

  def a_axes(self) -> tuple[int, ...]:
    """W axes along A's non-rank axes (dot_general: batch then the flattened contracting axes)."""
    if self.kind == "dot":
      return self.batch + self.contract
    return tuple(sorted(self.batch + self.contract))

  def b_axes(self) -> tuple[int | str, ...]:
    """W axes along B's axes, 'r' marking the rank axis."""
    if self.kind == "dot":
      return self.batch + ("r",) + self.remain
    return ("r",) + self.remain

  def shapes(self, w_shape: Sequence[int], rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(A, B, gate) shapes at `rank`."""
    dims = lambda axes: tuple(w_shape[i] for i in axes)
    if self.kind == "dot":
      return ((*dims(self.batch), math.prod(dims(self.contract)), rank),
              (*dims(self.batch), rank, math.prod(dims(self.remain))), (*dims(self.batch), rank))
    return (*dims(self.a_axes()), rank), (rank, *dims(self.remain)), (*dims(self.batch), rank)

  def leaf_axes(self) -> tuple[tuple[int | None, ...], tuple[int | None, ...], tuple[int | None, ...]]:
    """For each of A, B, gate: the W axis whose sharding each leaf axis takes (None: replicated), as qwix derives
    LoRA shardings (a flattened group takes its first axis's; the rank axis is replicated)."""
    if self.kind == "dot":
      return ((*self.batch, self.contract[0] if self.contract else None, None),
              (*self.batch, None, self.remain[0] if self.remain else None), (*self.batch, None))
    return (*self.a_axes(), None), (None, *self.remain), (*self.batch, None)

  @property
  def b_rank_axis(self) -> int:
    """Position of the rank axis in B."""
    return len(self.batch) if self.kind == "dot" else 0

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
    raise NotImplementedError(f"{name}: a stacked (nnx.scan) einsum weight is not supported by the tree functions; "
                              "unstack the layers first.")
  shift = lambda axes: tuple(i + lead for i in axes)
  return WeightRoles("dot", tuple(range(lead)) + shift(roles.batch), shift(roles.contract), shift(roles.remain))


def infer_roles(name: str, w_shape: Sequence[int], a_shape: Sequence[int], b_shape: Sequence[int],
                gate_shape: Sequence[int] | None) -> WeightRoles:
  """The one reading of W's axes that the leaf shapes allow (each role's axes taken in W order).

  Raises:
    ValueError: no reading fits, or two fit and give different deltas.
  """
  w_shape, a_shape, b_shape = tuple(w_shape), tuple(a_shape), tuple(b_shape)
  rank = a_shape[-1] if a_shape else -1
  found: dict[tuple, WeightRoles] = {}
  for assignment in itertools.product(range(3), repeat=len(w_shape)):
    groups = tuple(tuple(i for i, g in enumerate(assignment) if g == role) for role in range(3))
    for kind in ("dot", "einsum"):
      roles = WeightRoles(kind, *groups)
      a, b, gate = roles.shapes(w_shape, rank)
      if a == a_shape and b == b_shape and (gate_shape is None or gate == tuple(gate_shape)):
        found.setdefault(roles.canonical(w_shape, gate_shape is not None), roles)
  shapes = f"weight {w_shape}, A {a_shape}, B {b_shape}, gate {None if gate_shape is None else tuple(gate_shape)}"
  if not found:
    raise ValueError(f"{name}: the adapter's shapes do not fit qwix's LoRA layout of this weight ({shapes}); "
                     "was the tree edited, or does it come from another model?")
  if len(found) > 1:
    readings = "; ".join(_describe(r) for r in found.values())
    raise ValueError(f"{name}: its shapes ({shapes}) allow {len(found)} readings of the weight's axes ({readings}), "
                     "which give different results; pass the sora_jax.SoraProvider that ran the model (it records "
                     "each weight's axes) instead of a rule.")
  return next(iter(found.values()))


def _describe(roles: WeightRoles) -> str:
  return f"{roles.kind}: batch {roles.batch}, contracting {roles.contract}, remaining {roles.remain}"


def delta(roles: WeightRoles, w_shape: Sequence[int], a: jax.Array, b: jax.Array, gate: jax.Array | None,
          scale: float) -> jax.Array:
  """s * A diag(gate) B laid out like W (shape `w_shape`); differentiable, jit-able."""
  letters = string.ascii_letters
  w_sub = letters[:len(w_shape)]
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
  batch); `a_positions`: where they are among A's non-rank axes (None: unknown)."""
  nb: int
  b_batched: bool
  a_positions: tuple[int, ...] | None


def batching(name: str, a_shape, b_shape, gate_shape, roles: WeightRoles | None) -> Batching:
  """Reads the batch layout off the leaf shapes (or `roles`, when the provider recorded them).

  Raises:
    ValueError: no gate and no roles with more than a plain (in, r) / (r, out) pair, or a layout that fits both
      dot_general's and einsum's reading differently.
  """
  if roles is not None:
    roles = with_lead(name, roles, len(a_shape))
    nb = len(roles.batch)
    if roles.kind == "dot" or nb == 0:
      return Batching(nb, True, tuple(range(nb)))
    a_axes = roles.a_axes()
    return Batching(nb, False, tuple(a_axes.index(i) for i in roles.batch))
  if gate_shape is None:
    if len(a_shape) == 2 and len(b_shape) == 2:
      return Batching(0, True, ())
    raise ValueError(f"{name}: a gate-less adapter with A {tuple(a_shape)}, B {tuple(b_shape)} has no unique batch "
                     "layout; pass the sora_jax.SoraProvider that ran the model.")
  nb = len(gate_shape) - 1
  if nb == 0:
    return Batching(0, True, ())
  rank, batch = gate_shape[-1], tuple(gate_shape[:-1])
  dot = (len(a_shape) == nb + 2 and len(b_shape) == nb + 2 and tuple(a_shape[:nb]) == batch
         and tuple(b_shape[:nb]) == batch and b_shape[nb] == rank)
  positions = [p for p in itertools.combinations(range(len(a_shape) - 1), nb)
               if tuple(a_shape[i] for i in p) == batch]
  einsum = b_shape[0] == rank and bool(positions)
  if dot and einsum:
    raise ValueError(f"{name}: A {tuple(a_shape)}, B {tuple(b_shape)}, gate {tuple(gate_shape)} fit both the "
                     "dot_general and the einsum layout; pass the sora_jax.SoraProvider that ran the model.")
  if dot:
    return Batching(nb, True, tuple(range(nb)))
  if einsum:
    return Batching(nb, False, positions[0] if len(positions) == 1 else None)
  raise ValueError(f"{name}: A {tuple(a_shape)}, B {tuple(b_shape)}, gate {tuple(gate_shape)} fit no qwix LoRA "
                   "layout; was the tree edited?")


def fans(a_shape, b_shape, layout: Batching) -> tuple[int, int]:
  """(fan_in, fan_out) of one batch entry."""
  batch = math.prod(a_shape[i] for i in (layout.a_positions or range(layout.nb)))
  fan_in = math.prod(a_shape[:-1]) // max(batch, 1)
  if layout.b_batched:
    return fan_in, math.prod(b_shape[layout.nb + 1:])
  return fan_in, math.prod(b_shape[1:])


def active_ranks(gate: np.ndarray | None, b: np.ndarray, layout: Batching) -> np.ndarray:
  """(entries, r) bool: ranks that are on (gate != 0 and a nonzero row of B), per batch entry."""
  r = b.shape[layout.nb] if layout.b_batched else b.shape[0]
  # Explicit sizes: at r = 0 a -1 in reshape is ambiguous.
  if layout.b_batched:
    nb = layout.nb
    b_on = np.any(b.reshape(math.prod(b.shape[:nb]), r, math.prod(b.shape[nb + 1:])) != 0, axis=-1)
  else:
    b_on = np.any(b.reshape(r, math.prod(b.shape[1:])) != 0, axis=-1)[None]
  if gate is None:
    return b_on
  return (gate.reshape(math.prod(gate.shape[:-1]), r) != 0) & b_on


def prune_one(a: np.ndarray, b: np.ndarray, gate: np.ndarray, layout: Batching
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cuts the off ranks of one gated adapter and folds the gate in; returns (A, B, gate) at rank k.

  B carries the batch axes (dot_general, or no batch): k = the largest active count over batch entries, each entry's
  active ranks first, the rest zero columns of A / rows of B; gate folded into B. B shared by the batch entries
  (batched einsum): the ranks active in any entry are kept, gate folded into A (left unfolded when the batch axes'
  place in A is ambiguous). The new gate is 1 at kept-and-active entries and 0 elsewhere (or the unfolded gate), so
  the function is unchanged and any reader that ignores the gate (qwix's LoRA) computes the same.
  """
  nb, r = layout.nb, gate.shape[-1]
  active = active_ranks(gate, b, layout)
  batch_shape = gate.shape[:-1]
  if layout.b_batched:
    entries = math.prod(batch_shape)
    a2 = a.reshape(entries, math.prod(a.shape[nb:-1]), r)
    b2 = b.reshape(entries, r, math.prod(b.shape[nb + 1:])) * gate.reshape(entries, r, 1).astype(b.dtype)
    k = int(active.sum(axis=-1).max(initial=0))
    new_a = np.zeros(a2.shape[:-1] + (k,), a.dtype)
    new_b = np.zeros((entries, k, b2.shape[-1]), b.dtype)
    new_gate = np.zeros((entries, k), gate.dtype)
    for entry, on in enumerate(active):
      idx = np.flatnonzero(on)
      new_a[entry, :, :idx.size] = a2[entry][:, idx]
      new_b[entry, :idx.size] = b2[entry][idx]
      new_gate[entry, :idx.size] = 1
    return (new_a.reshape(a.shape[:-1] + (k,)), new_b.reshape(b.shape[:nb] + (k,) + b.shape[nb + 1:]),
            new_gate.reshape(batch_shape + (k,)))
  keep = np.flatnonzero(active.any(axis=0))
  if layout.a_positions is None:  # batch axes' place in A unknown: keep the gate as it is, cut only
    return a[..., keep], b[keep], gate[..., keep]
  g_shape = [1] * (a.ndim - 1) + [r]
  for pos, size in zip(layout.a_positions, batch_shape):
    g_shape[pos] = size
  folded = a * gate.reshape(g_shape).astype(a.dtype)
  return folded[..., keep], b[keep], (gate[..., keep] != 0).astype(gate.dtype)
