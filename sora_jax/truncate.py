"""Truncation: any trained LoRA or SoRA tree cut to a parameter budget by singular values.

Each module m (each layer of a stacked module) adds delta_m = s_m P_m Q_m to its weight, with P = A diag(g) of shape
(fan_in, r) and Q = B of shape (r, fan_out) in the module's flattened (in, out) view (`sora_jax.layout`), s the
scale alpha / r_max and g the gate (ones for a LoRA or a pruned tree). Its singular values come from two thin QR
factorisations, never from the dense delta:

  P = Q_p R_p,  Q^T = Q_q R_q,  s R_p R_q^T = U' diag(sigma) V'^T,  delta = (Q_p U') diag(sigma) (Q_q V')^T

so the work is O(r^2 (fan_in + fan_out)) per module. One rank of a module costs c_m = fan_in + fan_out adapter
parameters (`sora_jax.rank_cost`; a batched einsum's shared B: the whole rank, n fan_in + fan_out). All modules' singular values are pooled and sorted from the largest, and
the longest prefix whose costs sum to at most the budget is kept: one global threshold (the smallest kept sigma), so
every kept singular value is at least every dropped one. Module m keeps its k_m largest, which is its best rank-k_m
approximation in the Frobenius and spectral norms (Eckart-Young), with error sqrt(sum of its dropped sigma^2).

The result is written as `sora_jax.prune` writes a tree: A = U_k sqrt(sigma_k / s), B = sqrt(sigma_k / s) V_k^T (so
s A B = U_k diag(sigma_k) V_k^T with the module's own scale s), the gate folded in (linen: no gate; qwix: gate one at
kept ranks, zero at padding; a plain qwix LoRA, which has no gate and runs at its rule's rank only, keeps its shape
and is padded with zeros). Batch entries of one weight (a stacked linen module's layers, a qwix weight's batch
axes) share one rank axis: each entry is its own module and is padded with zero columns of A / rows of B up to the
largest k of its weight, as `prune` pads. A batched einsum whose B the entries share is one module, its delta read
as the ((entries x fan_in), fan_out) matrix (A diag(g)) B. Numerically zero singular values (below NumPy's
`matrix_rank` tolerance, sigma_max * max(fan_in, fan_out) * eps) are never kept.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import numpy as np

from sora_jax import adapters
from sora_jax import layout
from sora_jax import leaves

PyTree = Any


class TruncateReport(NamedTuple):
  """What `truncate` kept.

  budget_params: the budget asked for.
  retained_params: sum_m k_m c_m of the result (<= budget_params).
  ranks: module name ('path', or 'path[layer]' per batch entry, as `rank_report` rows) -> k_m, for every module
    with adapter leaves (a linen module that `prune` left without any is not listed).
  threshold: the smallest kept singular value of a delta s A diag(g) B over all modules (inf when none is kept).
  kept_energy: sum of kept sigma^2 / sum of all sigma^2 (1.0 for a tree whose deltas are all zero).
  """

  budget_params: int
  retained_params: int
  ranks: dict[str, int]
  threshold: float
  kept_energy: float


class _Module(NamedTuple):
  """One module's SVD: delta = u diag(sigma) vt; one rank of it costs `cost` parameters."""

  name: str
  cost: int
  u: np.ndarray  # (fan_in, q)
  sigma: np.ndarray  # (q,), descending
  vt: np.ndarray  # (q, fan_out)


def thin_svd(p: np.ndarray, q: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """SVD of scale * p q from the QR factors of the thin p (m, r) and q (r, n): (u (m, t), sigma (t,), vt (t, n)),
  t = min(m, n, r), sigma descending. float64."""
  qp, rp = np.linalg.qr(np.asarray(p, np.float64))
  qq, rq = np.linalg.qr(np.asarray(q, np.float64).T)
  u, sigma, vt = np.linalg.svd(scale * (rp @ rq.T), full_matrices=False)
  return qp @ u, sigma, vt @ qq.T


def _factors(a, b, gate, batching: layout.Batching) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
  """(P (entries, in, r), Q (entries, r, out), batch shape): each entry's delta / s = P[e] Q[e]; a batched einsum
  (B shared) is one entry of P = (A diag(g)) read as ((batch x in), r)."""
  nb, r = batching.nb, a.shape[-1]
  if batching.b_batched:
    batch = b.shape[:nb]
    entries = math.prod(batch)
    g = np.ones(batch + (r,)) if gate is None else gate
    p = a.reshape(entries, math.prod(a.shape[nb:-1]), r) * g.reshape(entries, 1, r)
    return p, b.reshape(entries, r, math.prod(b.shape[nb + 1 :])), batch
  batch = tuple(a.shape[i] for i in batching.a_positions)
  g_shape = [1] * (a.ndim - 1) + [r]
  for pos, size in zip(batching.a_positions, batch):
    g_shape[pos] = size
  p = a if gate is None else a * gate.reshape(g_shape)
  return p.reshape(1, math.prod(a.shape[:-1]), r), b.reshape(1, r, math.prod(b.shape[1:])), batch


def _modules(vals: dict, rec: leaves.AdapterPaths, config) -> tuple[list[_Module], layout.Batching, tuple, float]:
  """The SVD of every entry of one adapter, its batching, batch shape and scale."""
  a, b = (np.asarray(vals[p], np.float64) for p in (rec.a, rec.b))
  gate = None if vals.get(rec.gate) is None else np.asarray(vals[rec.gate], np.float64)
  batching = layout.batching(adapters.weight_roles(vals, rec))
  scale, _ = adapters.scale_and_rank(config, rec.weight)
  p, q, batch = _factors(a, b, gate, batching)
  r, entries = a.shape[-1], p.shape[0]
  # A module's rank is one gate entry's where B carries the batch axes; a rank of a shared B spans every entry.
  cost = layout.rank_cost(a.shape, b.shape, batch, batching.b_rank_axis)
  cost = cost.params(1 if batching.b_batched else cost.entries)
  name = leaves.path_str(rec.module if rec.layout == "linen" else rec.weight)
  out = []
  for e in range(entries):
    entry_name = name if batching.nb == 0 or not batching.b_batched else f"{name}[{e}]"
    if r == 0:
      u, sigma, vt = np.zeros((p.shape[1], 0)), np.zeros(0), np.zeros((0, q.shape[2]))
    else:
      u, sigma, vt = thin_svd(p[e], q[e], scale)
    out.append(_Module(entry_name, int(cost), u, sigma, vt))
  return out, batching, batch, scale


def _choose(modules: list[_Module], budget: int) -> tuple[list[int], float]:
  """k per module: the longest prefix of all singular values (largest first, numerically zero ones left out) whose
  costs fit in `budget`; and the threshold (the smallest kept sigma, inf when none)."""
  entries = []
  for m, mod in enumerate(modules):
    if mod.sigma.size:
      tol = mod.sigma[0] * max(mod.u.shape[0], mod.vt.shape[1]) * np.finfo(np.float64).eps
      entries += [(float(s), m) for s in mod.sigma if s > tol]
  entries.sort(key=lambda e: -e[0])  # stable: ties keep module order
  ks, spent, threshold = [0] * len(modules), 0, math.inf
  for sigma, m in entries:
    if spent + modules[m].cost > budget:
      break
    spent += modules[m].cost
    ks[m] += 1
    threshold = sigma
  return ks, threshold


def _write(mods: list[_Module], ks: list[int], batching, batch, scale, a_shape, b_shape, k_min: int = 0) -> tuple:
  """(A, B, gate) of one adapter at rank K = max(k over its entries, k_min), in `prune`'s format (each entry's k
  first, then zero padding; gate one at kept ranks)."""
  k_max = max(ks + [k_min])
  fan_in, fan_out = mods[0].u.shape[0], mods[0].vt.shape[1]
  new_a, new_b = np.zeros((len(mods), fan_in, k_max)), np.zeros((len(mods), k_max, fan_out))
  gate = np.zeros((len(mods), k_max))
  for e, (mod, k) in enumerate(zip(mods, ks)):
    root = np.sqrt(mod.sigma[:k] / scale)
    new_a[e, :, :k] = mod.u[:, :k] * root
    new_b[e, :k] = root[:, None] * mod.vt[:k]
    gate[e, :k] = 1.0
  if batching.b_batched:
    nb = batching.nb
    return (
      new_a.reshape(a_shape[:-1] + (k_max,)),
      new_b.reshape(b_shape[:nb] + (k_max,) + b_shape[nb + 1 :]),
      gate.reshape(batch + (k_max,)),
    )
  return new_a.reshape(a_shape[:-1] + (k_max,)), new_b.reshape((k_max,) + b_shape[1:]), np.ones(batch + (k_max,))


def truncate(params: PyTree, config: adapters.Config, budget_params: int) -> tuple[PyTree, TruncateReport]:
  """Cuts every adapter to its best rank-k_m approximation, with one global singular-value threshold that keeps at
  most `budget_params` adapter parameters (module docstring for the math).

  Runs on host (NumPy float64; output shapes depend on the values), outside `jax.jit`.

  Args:
    params: a trained tree with adapters of either layout (linen params after `sora_jax.init`, an `nnx.State` or its
      pure dict after `sora_jax.apply_sora`; base weights included: they give the axes' roles), SoRA (gates at any
      value), LoRA (gates one, or no gate) or pruned.
    config: the SoraConfig, or the SoraProvider / rules that made the adapters (their scale s = alpha / r_max is
      kept: the result reads with the same config).
    budget_params: the most adapter parameters to keep, sum_m k_m (fan_in_m + fan_out_m).

  Returns:
    (tree, report): the tree in the format `sora_jax.prune` gives (same kind of tree; `merge`, `rank_report`,
    `adapter_params`, `save_peft` read it; a module at k = 0 looks like prune's rank-0 module), and a
    `TruncateReport`.

  Raises:
    ValueError: the budget is below one rank of the cheapest module, the tree has no adapters, or an adapter leaf is
      not finite.
  """
  try:
    budget = operator.index(budget_params)
  except TypeError:
    raise ValueError(f"truncate: budget_params must be an int, got {budget_params!r}") from None
  flat, rebuild = leaves.flatten(params)
  vals = adapters._values(flat)
  adapters._check_finite_adapters(vals, "truncation")
  found = []
  for rec in adapters.adapter_records(vals, "truncate", config):
    found.append((rec, *_modules(vals, rec, config)))
  modules = [mod for _, mods, *_ in found for mod in mods]
  if budget < 0:
    raise ValueError(f"truncate: budget_params must be >= 0, got {budget}")
  costs = {mod.cost: mod.name for mod in modules if mod.sigma.size}
  cheapest = min(costs, default=0)
  if budget < cheapest:
    raise ValueError(
      f"truncate: budget_params={budget} is below one rank of the cheapest module ({cheapest} params, "
      f"fan_in + fan_out of {costs.get(cheapest)}); give a budget of at least {cheapest}"
    )
  ks, threshold = _choose(modules, budget)
  out, offset = dict(flat), 0
  for rec, mods, batching, batch, scale in found:
    mine = ks[offset : offset + len(mods)]
    offset += len(mods)
    a_shape, b_shape = np.shape(vals[rec.a]), np.shape(vals[rec.b])
    # qwix's own LoRA (no gate) runs at its rule's rank only: keep the shape, pad with zeros.
    k_min = a_shape[-1] if rec.layout == "qwix" and rec.gate not in vals else 0
    new = _write(mods, mine, batching, batch, scale, a_shape, b_shape, k_min)
    adapters.put_adapter(out, flat, rec, new)
  energy = [(float(np.sum(mod.sigma[:k] ** 2)), float(np.sum(mod.sigma**2))) for mod, k in zip(modules, ks)]
  total = sum(t for _, t in energy)
  report = TruncateReport(
    budget,
    sum(k * mod.cost for mod, k in zip(modules, ks)),
    {mod.name: k for mod, k in zip(modules, ks)},
    threshold,
    sum(kept for kept, _ in energy) / total if total > 0 else 1.0,
  )
  return rebuild(out), report
