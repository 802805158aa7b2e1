"""SoRA adapters as a transform over Flax parameter trees.

A targeted kernel W of shape (*in_shape, *out_shape) gets three sibling leaves

  sora_a: (*in_shape, rank)    kaiming-uniform, bound 1 / sqrt(prod(in_shape))
  sora_b: (rank, *out_shape)   zeros
  sora_gate: (rank,)           ones, or N(0, 1) as the official code

and the adapted layer computes x W + s * ((x A) * gate) B with s = alpha / rank (Ding et al. 2023, eq. 4).
Under `nn.scan` every leaf carries the kernel's leading layer axes. The number of leading axes is read off the
shapes, lead = a.ndim + b.ndim - 2 - kernel.ndim, so no function after `init` needs to be told about stacking.

After `prune`, the gate is folded into `sora_b` and `sora_gate` is gone; code that reads adapters treats a missing
gate as ones. A module whose rank reaches 0 keeps zero-size leaves, sora_a (*lead, *in, 0) and
sora_b (*lead, 0, *out), as the qwix layout does: in both layouts an adapted module always has its A and B, and rank 0
is a shape, not an absence.

The same functions read the qwix layout that `sora_jax.SoraProvider` makes (`<w>_lora_a`, `<w>_lora_b`,
`<w>_lora_gate` beside any weight; shapes in `sora_jax.layout`), in the same tree or another; `sora_jax.leaves` is
where both layouts' names live.

All functions are pure: they take a tree (linen params as `model.init(...)["params"]`, an `nnx.State`, or the pure
dict of `nnx.to_pure_dict`) and return a new one of the same kind. Regular expressions (`targets`, `stacked`,
`trainable`, rules' `module_path`) are matched with `re.fullmatch` against '/'-joined paths.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

import qwix
from flax import nnx

from sora_jax import _qwix
from sora_jax import layout
from sora_jax import leaves
from sora_jax.leaves import A, B, GATE, path_str
from sora_jax.leaves import gate_mask as gate_mask  # the one gate walker (`sora_jax.leaves.walk`)
from sora_jax.leaves import not_gate_mask as not_gate_mask
from sora_jax.provider import SoraProvider

PyTree = Any
Path = tuple[Any, ...]

_GATE_INITS = ("ones", "normal")


@dataclasses.dataclass(frozen=True)
class SoraConfig:
  """What to adapt and how.

  Attributes:
    rank: r_max, the rank every adapter starts with.
    alpha: the scale is `s = alpha / rank`, kept after pruning.
    targets: regexes; a kernel is adapted when its '/'-joined path fully matches one of them.
    gate_init: "ones", or "normal" for N(0, 1) as the official code (`torch.randn(1, r)`).
    dropout: dropout rate on the adapter input (the base path sees no dropout from SoRA).
    in_axes: how many leading axes of an (unstacked) kernel are input axes: 1 for `nn.Dense` and for
      `nn.DenseGeneral` over the last input axis, 2 for `DenseGeneral(axis=(-2, -1))`, ...
    stacked: a regex over kernel paths; a matching kernel carries one leading layer axis from `nn.scan`, e.g.
      `.*/layer/.*` for `encoder/layer/attention/self/query/kernel` of shape (L, in, out). A 3-D kernel cannot be
      told apart from a `DenseGeneral` kernel by its shape, hence the explicit rule. None: no kernel is stacked.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = (r".*kernel",)
  gate_init: str = "ones"
  dropout: float = 0.0
  in_axes: int = 1
  stacked: str | None = None

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, "targets", (self.targets,))
    else:
      object.__setattr__(self, "targets", tuple(self.targets))
    if not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"SoraConfig.rank must be a positive int, got {self.rank!r}.")
    if not self.alpha > 0:
      raise ValueError(f"SoraConfig.alpha must be > 0, got {self.alpha!r}.")
    if not self.targets:
      raise ValueError("SoraConfig.targets is empty; give at least one regex, e.g. '.*attention/.*/kernel'.")
    for pattern in self.targets + ((self.stacked,) if self.stacked is not None else ()):
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"SoraConfig: {pattern!r} is not a valid regular expression: {e}.") from None
    if self.gate_init not in _GATE_INITS:
      raise ValueError(f"SoraConfig.gate_init must be one of {_GATE_INITS}, got {self.gate_init!r}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"SoraConfig.dropout must be in [0, 1), got {self.dropout!r}.")
    if not isinstance(self.in_axes, int) or self.in_axes < 1:
      raise ValueError(f"SoraConfig.in_axes must be a positive int, got {self.in_axes!r}.")

  @property
  def scale(self) -> float:
    """s = alpha / rank (rank = r_max)."""
    return self.alpha / self.rank


def _flat(params: PyTree) -> dict[Path, Any]:
  return traverse_util.flatten_dict(params)


def _unflat(flat: dict[Path, Any]) -> dict:
  return traverse_util.unflatten_dict(flat)


def _check_finite_adapters(flat: dict[Path, Any], action: str) -> None:
  """A NaN or inf gate or factor is a diverged run, not a switched-off rank: refuse to count or cut it."""
  for path, value in flat.items():
    if leaves.is_adapter(path) and not np.isfinite(np.asarray(leaves.value(value))).all():
      raise ValueError(
        f"{path_str(path)} holds NaN or inf values, so no {action} (a non-finite gate is not a "
        "pruned rank); the training diverged: lower the learning rate"
      )


def init(rng: jax.Array, params: PyTree, config: SoraConfig) -> dict:
  """Adds `sora_a`, `sora_b`, `sora_gate` beside every kernel matched by `config.targets`.

  A is drawn as `torch.nn.init.kaiming_uniform_(a=sqrt(5))` draws it in the official code:
  gain = sqrt(2 / (1 + 5)), bound = gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in), fan_in = prod(in_shape).

  Args:
    rng: a PRNG key.
    params: the model's parameter tree.
    config: the SoRA config.

  Returns:
    A new tree with the adapter leaves added, in the kernel's dtype.

  Raises:
    ValueError: a target matches nothing, matches a leaf that is not a kernel, or the rank exceeds min(in, out).
  """
  flat = _flat(params)
  paths = {path_str(p): p for p in flat}
  unused = [t for t in config.targets if not any(re.fullmatch(t, s) for s in paths)]
  if unused:
    examples = ", ".join(s for s in list(paths)[:6])
    raise ValueError(
      f"SoRA targets {unused} match no parameter path. Targets are fully matched against '/'-joined paths such as "
      f"{examples}; fix the pattern (e.g. prefix it with '.*' and end it with '/kernel')."
    )
  out = dict(flat)
  targeted = [p for s, p in paths.items() if any(re.fullmatch(t, s) for t in config.targets)]
  for path, key in zip(targeted, jax.random.split(rng, max(len(targeted), 1))):
    kernel = flat[path]
    name = path_str(path)
    if path[-1] != "kernel" or kernel.ndim < 2:
      raise ValueError(
        f"SoRA target matched {name!r} (shape {tuple(kernel.shape)}), which is not a dense kernel; SoRA adapts "
        f"'.../kernel' leaves of 2 or more axes. Narrow the pattern, e.g. end it with '/kernel'."
      )
    if path[:-1] + (A,) in flat:
      raise ValueError(f"{name!r} already has SoRA adapters; call `init` once, on a tree without adapters.")
    lead = int(config.stacked is not None and re.fullmatch(config.stacked, name) is not None)
    if kernel.ndim < lead + config.in_axes + 1:
      raise ValueError(
        f"{name!r} has shape {tuple(kernel.shape)}, too few axes for {lead} layer axis and in_axes="
        f"{config.in_axes} plus an output axis; fix SoraConfig.in_axes or SoraConfig.stacked."
      )
    lead_shape = kernel.shape[:lead]
    in_shape = kernel.shape[lead : lead + config.in_axes]
    out_shape = kernel.shape[lead + config.in_axes :]
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    if config.rank > min(fan_in, fan_out):
      raise ValueError(
        f"SoRA rank {config.rank} exceeds min(in, out) = min({fan_in}, {fan_out}) of {name!r} (shape "
        f"{tuple(kernel.shape)}, layer axes {lead}, in_axes {config.in_axes}); lower SoraConfig.rank or drop "
        f"this kernel from targets."
      )
    key_a, key_g = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    dtype = kernel.dtype
    module = path[:-1]
    out[module + (A,)] = jax.random.uniform(key_a, lead_shape + in_shape + (config.rank,), dtype, -bound, bound)
    out[module + (B,)] = jnp.zeros(lead_shape + (config.rank,) + out_shape, dtype)
    if config.gate_init == "ones":
      out[module + (GATE,)] = jnp.ones(lead_shape + (config.rank,), dtype)
    else:
      out[module + (GATE,)] = jax.random.normal(key_g, lead_shape + (config.rank,), dtype)
  return _unflat(out)


def adapter_mask(params: PyTree) -> PyTree:
  """Bool tree, True at A, B and gate leaves of either layout (`sora_a`..., `<w>_lora_a`...); same kind of tree."""
  return leaves.map_leaves(params, lambda path, leaf: leaves.is_adapter(path) or leaves.is_gate(path, leaf))


def _label(path: Path, leaf: Any, trainable: Sequence[str]) -> str:
  if leaves.is_gate(path, leaf):
    return "gate"
  if leaves.is_adapter(path):
    return "adapter"
  if any(re.fullmatch(t, path_str(path)) for t in trainable):
    return "trainable"
  return "frozen"


def param_labels(params: PyTree, trainable: Sequence[str] = ()) -> PyTree:
  """Label tree for `optax.multi_transform`: "gate", "adapter" (A, B), "trainable" (matches `trainable`), "frozen"."""
  if isinstance(trainable, str):
    trainable = (trainable,)
  return leaves.map_leaves(params, lambda path, leaf: _label(path, leaf, trainable))


def split(params: PyTree, trainable: Sequence[str] = ()) -> tuple[PyTree, PyTree]:
  """Splits params into (trainable, frozen) trees with disjoint leaves, each of the kind given.

  The trainable tree holds every adapter leaf plus the leaves whose path fully matches a regex in `trainable`
  (a classifier head, LayerNorms). Take `jax.grad` w.r.t. the first tree only and `combine` inside the loss, so no
  gradient of a frozen kernel is ever computed.

  Example:
    trainable, frozen = split(params, trainable=(r"classifier/.*",))
    loss = lambda t: loss_fn(combine(t, frozen))
    grads = jax.grad(loss)(trainable)
  """
  if isinstance(trainable, str):
    trainable = (trainable,)
  flat, rebuild = leaves.flatten(params)
  train, frozen = {}, {}
  for path, leaf in flat.items():
    if _label(path, leaf, trainable) != "frozen":
      train[path] = leaf
    else:
      frozen[path] = leaf
  return rebuild(train), rebuild(frozen)


def combine(*trees: PyTree) -> PyTree:
  """Inverse of `split`: the union of trees with disjoint leaves, of the first tree's kind."""
  flat, rebuild = {}, None
  for tree in trees:
    tree_flat, tree_rebuild = leaves.flatten(tree)
    rebuild = rebuild or tree_rebuild
    for path, leaf in tree_flat.items():
      if path in flat:
        raise ValueError(f"combine: leaf {path_str(path)!r} is in more than one tree.")
      flat[path] = leaf
  return (rebuild or traverse_util.unflatten_dict)(flat)


Config = SoraConfig | SoraProvider | qwix.LoraRule | Sequence[qwix.LoraRule]


def _rules(config: Config) -> list[Any] | None:
  """The rules of a provider / rule / sequence of rules; None for a SoraConfig."""
  if isinstance(config, SoraConfig):
    return None
  if isinstance(config, SoraProvider):
    return list(config.rules)
  if isinstance(config, qwix.LoraRule):
    return [config]
  if isinstance(config, (list, tuple)) and all(isinstance(rule, qwix.QuantizationRule) for rule in config):
    return list(config)
  raise TypeError(
    f"config must be a SoraConfig, a SoraProvider, a SoraRule (or qwix.LoraRule) or a sequence of "
    f"rules, got {type(config).__name__}."
  )


def scale_and_rank(config: Config, weight: Path) -> tuple[float, int]:
  """(s, r_max) for the adapter of `weight`: the SoraConfig's, or the first LoRA/SoRA rule whose module_path fully
  matches the '/'-joined module path (as qwix matches rules)."""
  rules = _rules(config)
  if rules is None:
    return config.scale, config.rank
  module = path_str(weight[:-1])
  for rule in rules:
    if isinstance(rule, qwix.LoraRule) and re.fullmatch(rule.module_path, module):
      return rule.alpha / rule.rank, rule.rank
  raise ValueError(
    f"no LoRA/SoRA rule's module_path matches {module!r} (adapter of {path_str(weight)!r}); pass the "
    "provider or rules that created the adapters."
  )


def weight_roles(vals: dict[Path, Any], rec: leaves.AdapterPaths) -> layout.WeightRoles:
  """The roles of an adapted weight's axes, read from the tree (`sora_jax.layout`): a linen kernel's from the ranks of
  kernel, A and B; a qwix weight's from its `<w>_lora_axes` record, else the convention over the shapes."""
  w_shape = leaves.weight_shape(vals, rec.weight)
  a_shape, b_shape, gate = np.shape(vals[rec.a]), np.shape(vals[rec.b]), vals.get(rec.gate)
  if rec.layout == "linen":
    return layout.linen_roles(len(w_shape), len(a_shape), len(b_shape))
  return layout.read_roles(
    path_str(rec.weight), w_shape, a_shape, b_shape, None if gate is None else np.shape(gate), vals.get(rec.axes)
  )


def adapter_records(vals: dict[Path, Any], fn: str, config: Config | None = None) -> list[leaves.AdapterPaths]:
  """The adapters of a flat tree; a tree without any is an error, and so (given a SoraConfig) is a targeted kernel
  without adapter leaves: a module pruned to rank 0 keeps zero-size ones, so its rank would go uncounted."""
  records = leaves.find_adapters(vals)
  if isinstance(config, SoraConfig):
    adapted = {rec.weight for rec in records}
    bare = [
      path_str(p)
      for p in vals
      if p[-1] == "kernel" and p not in adapted and any(re.fullmatch(t, path_str(p)) for t in config.targets)
    ]
    if bare:
      raise ValueError(
        f"{fn}: {bare[0]} is matched by SoraConfig.targets but has no sora_a / sora_b beside it; a module at rank 0 "
        "keeps zero-size sora_a (in, 0) and sora_b (0, out) (`sora_jax.prune` writes them): pass the tree from "
        "`init` / `prune`, or a SoraConfig whose targets match only the adapted kernels."
      )
  if records:
    return records
  examples = ", ".join(path_str(p) for p in list(vals)[:4])
  raise ValueError(
    f"{fn}: the tree has no adapters (no 'sora_a' or '<w>_lora_a' leaf among {len(vals)} leaves, e.g. "
    f"{examples or 'none'}); pass the adapted tree (params after sora_jax.init, or nnx.state(model) "
    "after sora_jax.apply_sora)."
  )


def _values(flat: dict[Path, Any]) -> dict[Path, Any]:
  return {p: leaves.value(v) for p, v in flat.items()}


def _base_weight(flat: dict[Path, Any], weight: Path, fn: str) -> Any:
  """The base weight's array, or a clear error when it is absent or quantized (QLoRA)."""
  w = flat.get(weight)
  quantized = isinstance(w, (_qwix.WithAux, _qwix.QArray)) or (
    w is None and any(p[: len(weight)] == weight and len(p) > len(weight) for p in flat)
  )
  if quantized:
    raise ValueError(
      f"{fn}: {path_str(weight)!r} is a quantized (QLoRA) weight; adding the delta to it would lose "
      "precision. Merge into the float weights instead (e.g. the model before quantization)."
    )
  if w is None:
    raise ValueError(
      f"{fn}: {path_str(weight)!r}, the base weight of an adapter, is not in the tree; merge the full "
      "tree (e.g. combine(trainable, frozen))."
    )
  return w


def _f32(x):
  return None if x is None else jnp.asarray(x, jnp.float32)


def _delta(vals: dict[Path, Any], rec: leaves.AdapterPaths, config: Config, fn: str) -> tuple[Any, jax.Array]:
  """(W, s * A diag(gate) B laid out like W in float32) for one adapter of either layout."""
  w = _base_weight(vals, rec.weight, fn)
  a, b, gate = _f32(vals[rec.a]), _f32(vals[rec.b]), _f32(vals.get(rec.gate))
  scale, _ = scale_and_rank(config, rec.weight)
  return w, layout.delta(weight_roles(vals, rec), w.shape, a, b, gate, scale)


def _merged_leaf(like: Any, value: jax.Array, merged: bool) -> Any:
  """`value` in `like`'s container; an NNX weight is marked as holding (or no longer holding) its adapter's delta,
  which the adapted model refuses to run (`sora_jax.SoraProvider`)."""
  if isinstance(like, nnx.Variable):
    return like.replace(value, **{leaves.MERGED: merged})
  return value


def merge(params: PyTree, config: Config) -> PyTree:
  """Folds every adapter into its weight, W <- W + s * A diag(gate) B, and drops the adapter leaves.

  Both layouts: linen `sora_*` beside a kernel (delta laid out as (*lead, *in, *out)), and qwix `<w>_lora_*` beside
  any weight (delta placed on W's own axes, einsum-shaped weights such as (d, n, h) included). The scale s comes from
  `config`: a SoraConfig, or the SoraProvider / SoraRule / rules that made the adapters (first rule whose module_path
  matches); a qwix-layout weight's axis roles come from the tree (`sora_jax.layout`), so a provider built afresh
  works. The sum is computed in float32 and cast once to W's dtype (bf16 W: one rounding of W + delta).

  The result is a plain tree of the same kind, for the model before `apply_sora`: `nnx.update(base_model, merged)` or
  `nnx.merge(base_graphdef, merged_state)` is the one way to a plain model. NNX weights in the result carry the
  metadata `sora_merged=True`, so putting them back into the adapted model (which would add the delta twice) raises
  when that model runs. Differentiable: `jax.grad(lambda t: f(merge(combine(t, frozen), config)))` gives adapter
  gradients.

  Raises:
    ValueError: the tree has no adapters, a base weight is missing or quantized, or no rule matches an adapter.
  """
  flat, rebuild = leaves.flatten(params)
  vals = _values(flat)
  out = {p: v for p, v in flat.items() if not leaves.is_adapter_leaf(p)}
  for rec in adapter_records(vals, "merge", config):
    w, d = _delta(vals, rec, config, "merge")
    out[rec.weight] = _merged_leaf(flat[rec.weight], (_f32(w) + d).astype(w.dtype), True)
  return rebuild(out)


def unmerge(merged: PyTree, adapters: PyTree, config: Config) -> PyTree:
  """Inverse of `merge`: W <- W - s * A diag(gate) B for every adapter in `adapters`, which are added back.

  Args:
    merged: a plain tree from `merge` (either layout's weights; any kind of tree).
    adapters: any tree holding the adapter leaves (the full adapted tree, or the trainable half of `split`; a
      `<w>_lora_axes` record sits in the frozen half, so for a weight that has one pass the full adapted tree).
    config: the config or provider / rules used to merge.

  Returns:
    The adapted tree, of `merged`'s kind; equal to the original up to float rounding of the weights.
  """
  flat, rebuild = leaves.flatten(merged)
  out = dict(flat)
  out.update({p: v for p, v in leaves.flatten(adapters)[0].items() if leaves.is_adapter_leaf(p)})
  vals = _values(out)
  for rec in adapter_records({p: v for p, v in vals.items() if leaves.is_adapter_leaf(p)}, "unmerge"):
    if rec.weight not in flat:
      raise ValueError(f"unmerge: {path_str(rec.weight)!r} is not in the merged tree.")
    w, d = _delta(vals, rec, config, "unmerge")
    out[rec.weight] = _merged_leaf(flat[rec.weight], (_f32(w) - d).astype(w.dtype), False)
  return rebuild(out)


def prune(params: PyTree, config: Config | None = None) -> PyTree:
  """Cuts every rank whose gate is exactly zero and folds the gate in; returns the same kind of tree.

  The result computes the same function (up to float rounding of the folded product) with a variable rank per module.
  Runs on host (the output shapes depend on the gate values), so call it outside `jax.jit`. The fold is computed in
  float32 and each leaf cast once to its dtype (bf16 leaves: one rounding of A and of the gate-scaled B).

  Batch entries (a stacked linen module's layers, a qwix weight's batch axes: the gate's leading axes) share one rank:
  gate folded into B, k the largest active rank over entries, each entry's active ranks first and the rest zero
  columns of A and zero rows of B. A batched einsum's B is shared by the entries: the ranks active in any entry are
  kept and the gate is folded into A.

  linen layout (`sora_*`): a (*lead, *in, k), b (*lead, k, *out), no `sora_gate`; a module at k = 0 keeps zero-size
  a and b, which `factored` runs as a zero update.

  qwix layout (`<w>_lora_*`): the tree keeps its structure, only shapes change, so `nnx.merge(graphdef, pruned)` with
  the adapted model's graphdef and `nnx.update(model, pruned)` work (a dropped leaf would leave `nnx.update` running
  the old A and B). The gate leaf stays, 1 at kept active ranks and 0 at padding; a module at k = 0 keeps zero-size
  leaves, which `SoraProvider` reads as "no adapter". A qwix adapter without a gate (plain LoRA) is kept as it is.

  Args:
    params: linen params, an `nnx.State`, or a pure dict (the base weights included: they give the axes' roles).
    config: not needed (everything is read from the tree); accepted so that `prune(tree, provider)` reads like the
      other tree functions.

  Raises:
    ValueError: the tree has no adapters, or holds a non-finite adapter leaf.
  """
  del config
  flat, rebuild = leaves.flatten(params)
  vals = _values(flat)
  _check_finite_adapters(vals, "pruning")
  out = dict(flat)
  for rec in adapter_records(vals, "prune"):
    a, b, gate = vals[rec.a], vals[rec.b], vals.get(rec.gate)
    if gate is None and rec.layout == "qwix":
      continue
    batching = layout.batching(weight_roles(vals, rec))
    ones = np.ones(np.shape(b)[: batching.nb] + (np.shape(a)[-1],), np.float32)
    new = layout.prune_one(*(np.asarray(x, np.float32) for x in (a, b, ones if gate is None else gate)), batching)
    put_adapter(out, flat, rec, new)
  return rebuild(out)


def put_adapter(out: dict[Path, Any], flat: dict[Path, Any], rec: leaves.AdapterPaths, new: tuple) -> None:
  """Writes one adapter's new (A, B, gate) at rank k into the flat tree `out` in the format `prune` leaves.

  Each leaf is cast to its old dtype and put in its old container (`flat`'s leaf); A and B stay, zero-size at k = 0.
  linen: the gate is dropped (it is folded in, or ones). qwix: the gate stays; a leaf absent from `flat` (a plain qwix
  LoRA's gate) stays absent.
  """
  for path, value in zip(rec.leaves, new):
    if path in flat:
      out[path] = leaves.rewrap(flat[path], jnp.asarray(value, leaves.value(flat[path]).dtype))
  if rec.layout == "linen":
    out.pop(rec.gate, None)


class RankRow(NamedTuple):
  """One adapted module (one layer of it when stacked, one batch entry of a batched qwix weight).

  fan_in, fan_out: the entry's input and output sizes (a batched einsum's entries each read all of the shared B).
  retained_params: rank * `sora_jax.rank_cost(...).per_entry`: rank * (fan_in + fan_out), or for a batched einsum
    whose B the n entries share rank * (fan_in + fan_out / n), each entry carrying its share of B (a float when that
    leaves a fraction of a row).
  """

  path: str
  layer: int | None
  rank_max: int
  rank: int
  fan_in: int
  fan_out: int
  retained_params: int | float


class RankReport(NamedTuple):
  """Ranks and retained adapter parameters, per module and in total.

  `retained_params` sums the rows' (`RankRow`); `max_params` is the same count at rank_max, |A| + |B| of the unpruned
  adapters (`sora_jax.adapter_params`); `fraction = retained_params / max_params` (`sora_jax.retained_fraction` of
  the unpruned params); `base_params` counts the non-adapter leaves.
  """

  rows: tuple[RankRow, ...]
  retained_params: int | float
  max_params: int
  base_params: int

  @property
  def fraction(self) -> float:
    return self.retained_params / self.max_params if self.max_params else 0.0

  @property
  def fraction_of_base(self) -> float:
    return self.retained_params / self.base_params if self.base_params else 0.0

  def __str__(self) -> str:
    width = max([len("module")] + [len(_row_name(r)) for r in self.rows])
    lines = [f"{'module':<{width}}  {'rank':>9}  {'in':>7}  {'out':>7}  {'params':>10}"]
    for r in self.rows:
      lines.append(
        f"{_row_name(r):<{width}}  {f'{r.rank}/{r.rank_max}':>9}  {r.fan_in:>7}  {r.fan_out:>7}  "
        f"{r.retained_params:>10}"
      )
    lines.append(
      f"total: {self.retained_params} of {self.max_params} adapter params ({100 * self.fraction:.2f}%), "
      f"{100 * self.fraction_of_base:.4f}% of {self.base_params} base params"
    )
    return "\n".join(lines)


def _row_name(row: RankRow) -> str:
  return row.path if row.layer is None else f"{row.path}[{row.layer}]"


def rank_report(params: PyTree, config: Config) -> RankReport:
  """Per-module (per-layer when stacked, per batch entry for batched qwix weights) active rank before (`rank_max`)
  and now (`rank`), and the retained adapter parameters.

  The active rank counts nonzero gates with a nonzero row of B (after `prune`: the kept ranks). `config` gives
  rank_max: a SoraConfig, or the SoraProvider / rules (first matching module_path). A module at rank 0 keeps
  zero-size leaves in both layouts and is reported from them. Rows of the qwix layout are named by the weight
  path (`.../kernel`, `.../w`); for a batched einsum, whose B the entries share, counts are per entry, each carrying
  its share of B. A rank's parameters are `sora_jax.rank_cost`'s, as `sora_budget`, `cut_to_budget` and `truncate`
  count them.
  """
  flat, _ = leaves.flatten(params)
  vals = _values(flat)
  _check_finite_adapters(vals, "rank report")
  rows, retained, max_params = [], 0, 0
  for rec in adapter_records(vals, "rank_report", config):
    b, gate = vals[rec.b], vals.get(rec.gate)
    _, rank_max = scale_and_rank(config, rec.weight)
    batching = layout.batching(weight_roles(vals, rec))
    a_shape, b_shape = np.shape(vals[rec.a]), np.shape(b)
    cost = layout.rank_cost(a_shape, b_shape, [a_shape[i] for i in batching.a_positions], batching.b_rank_axis)
    on = layout.active_ranks(None if gate is None else np.asarray(gate), np.asarray(b), batching)
    ranks = np.broadcast_to(on.sum(axis=-1), (cost.entries,))  # a gate-less shared B: each entry has B's ranks
    fan_in, fan_out = layout.fans(a_shape, b_shape, batching)
    name = path_str(rec.module if rec.layout == "linen" else rec.weight)
    for layer, rank in enumerate(ranks):
      rows.append(
        RankRow(name, layer if batching.nb > 0 else None, rank_max, int(rank), fan_in, fan_out, cost.params(int(rank)))
      )
    retained += cost.params(int(ranks.sum()))
    max_params += cost.params(rank_max * cost.entries)
  rows.sort(key=lambda row: (row.path, row.layer or 0))
  base = sum(int(np.size(v)) for p, v in vals.items() if not leaves.is_adapter_leaf(p))
  return RankReport(tuple(rows), retained, max_params, base)
