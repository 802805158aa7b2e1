"""Adapter leaf names, and the flat view of every kind of tree the tree functions accept.

This module is the one place that knows what SoRA leaves are called. Two layouts exist:

  linen intercept (`sora_jax.init` + `sora_jax.factored`), beside `.../<module>/kernel`:
    sora_a (*lead, *in, r),  sora_b (*lead, r, *out),  sora_gate (*lead, r)
  qwix (`sora_jax.SoraProvider` on NNX or linen models), beside any base weight `<w>` (`kernel`, `w`, `embedding`):
    <w>_lora_a,  <w>_lora_b,  <w>_lora_gate (*batch, r)   (shapes: see `sora_jax.provider`)
    <w>_lora_axes (int32), only where the weight's axes break `sora_jax.layout`'s convention: their recorded roles

A qwix tree with `<w>_lora_a` / `<w>_lora_b` and no gate (plain qwix LoRA) is read as an adapter whose gate is ones.

Three kinds of tree are accepted, and each function returns the kind it was given:
  linen params (nested dicts, FrozenDict), `nnx.State` (leaves are `nnx.Variable`s, or arrays after `nnx.as_pure`;
  paths may hold ints for list items), and the nested dict of `nnx.to_pure_dict`. A dict whose every leaf sits under
  a `value` key (orbax's restore of an `nnx.State` without a target) is read without that level and given back with
  it.
`flatten` gives {path tuple: leaf} and a function that rebuilds the same kind of tree from such a dict; `value` and
`rewrap` read and replace a leaf's array while keeping an `nnx.Variable`'s type and metadata (e.g. sharding).

`walk` is the one walk of any pytree (those three, and any container of them: a tuple of trees, an optax state, the
params with `optax.MaskedNode`s that `optax.masked` hands its inner transform); `map_leaves` and the masks
(`gate_mask`, `not_gate_mask`, and `sora_jax.adapter_mask` / `param_labels`) are made from it and return a tree of
the kind and structure given.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any, Callable, Iterable, Literal

import jax
from flax import nnx
from flax import traverse_util

PyTree = Any
Path = tuple[Any, ...]
Flat = dict[Path, Any]

# linen intercept layout: fixed names beside `kernel`.
KERNEL = "kernel"
A, B, GATE = "sora_a", "sora_b", "sora_gate"
LINEN_LEAVES = (A, B, GATE)
# qwix layout: suffixes on the base weight's name (qwix's own `_lora_a`, `_lora_b`; ours `_lora_gate`).
QWIX_A, QWIX_B, QWIX_GATE, QWIX_AXES = "_lora_a", "_lora_b", "_lora_gate", "_lora_axes"
# Metadata key that `sora_jax.merge` sets on an NNX weight holding its adapter's delta.
MERGED = "sora_merged"
# orbax's restore of an nnx.State without a target keeps each variable as {"value": array}.
_ORBAX_VALUE = "value"

Layout = Literal["linen", "qwix"]
Role = Literal["a", "b", "gate", "axes"]


class SoraGate(nnx.LoRAParam):
  """The NNX variable type of a SoRA gate `<w>_lora_gate`.

  A subclass of `nnx.LoRAParam`, so `nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` (and Tunix's PeftTrainer) train
  it with A and B, while `nnx.state(model, sora_jax.SoraGate)` selects the gates alone.
  """


class SoraAxes(nnx.Variable):
  """The NNX variable type of `<w>_lora_axes`, the recorded roles of a weight's axes (`sora_jax.layout.encode`).

  Not an `nnx.Param`: no optimizer trains it, and `nnx.state(model)` / `nnx.to_pure_dict` carry it with the adapter.
  """


def role(path: Path) -> Role | None:
  """'a', 'b', 'gate' or 'axes' when `path` names an adapter leaf of either layout, else None."""
  if not path or not isinstance(path[-1], str):
    return None
  name = path[-1]
  for kind, linen, suffix in (("a", A, QWIX_A), ("b", B, QWIX_B), ("gate", GATE, QWIX_GATE), ("axes", None, QWIX_AXES)):
    if name == linen or (name.endswith(suffix) and len(name) > len(suffix)):
      return kind
  return None


def is_adapter(path: Path) -> bool:
  """True at A, B and gate leaves of either layout (what trains)."""
  return role(path) in ("a", "b", "gate")


def is_adapter_leaf(path: Path) -> bool:
  """True at every leaf that belongs to an adapter: A, B, gate, and the axes record."""
  return role(path) is not None


def is_gate(path: Path, leaf: Any = None) -> bool:
  """True at gate leaves: named `sora_gate` / `<w>_lora_gate`, or of NNX type `SoraGate`."""
  return role(path) == "gate" or isinstance(leaf, SoraGate)


@dataclasses.dataclass(frozen=True)
class AdapterPaths:
  """Where one adapted weight and its leaves sit in a flat tree (gate and axes paths are given even when absent)."""

  layout: Layout
  weight: Path
  a: Path
  b: Path
  gate: Path
  axes: Path | None = None

  @property
  def module(self) -> Path:
    return self.weight[:-1]

  @property
  def leaves(self) -> tuple[Path, Path, Path]:
    return self.a, self.b, self.gate


def adapter_paths(weight: Path, layout: Layout) -> AdapterPaths:
  """The leaf paths of the adapter of `weight` (a path ending in the base weight's name)."""
  module, name = weight[:-1], weight[-1]
  if layout == "linen":
    return AdapterPaths("linen", weight, module + (A,), module + (B,), module + (GATE,))
  return AdapterPaths(
    "qwix",
    weight,
    module + (name + QWIX_A,),
    module + (name + QWIX_B,),
    module + (name + QWIX_GATE,),
    module + (name + QWIX_AXES,),
  )


def find_adapters(paths: Iterable[Path]) -> list[AdapterPaths]:
  """One record per adapted weight (both layouts), sorted by weight path.

  An adapter is recognised by its A leaf: `.../sora_a` (weight `.../kernel`) or `.../<w>_lora_a` (weight `.../<w>`).
  The weight itself need not be in `paths` (e.g. the trainable half of `split`).
  """
  out = []
  for path in paths:
    if not path or not isinstance(path[-1], str):
      continue
    name = path[-1]
    if name == A:
      out.append(adapter_paths(path[:-1] + (KERNEL,), "linen"))
    elif name.endswith(QWIX_A) and len(name) > len(QWIX_A):
      out.append(adapter_paths(path[:-1] + (name[: -len(QWIX_A)],), "qwix"))
  return sorted(out, key=lambda rec: tuple(str(k) for k in rec.weight))


def weight_shape(flat: Flat, weight: Path) -> tuple[int, ...]:
  """The shape of a base weight in a flat tree of arrays; a quantized (QLoRA) weight is a subtree whose `qvalue` has
  the weight's shape.

  Raises:
    ValueError: the weight is not in the tree.
  """
  if weight in flat:
    return tuple(value(flat[weight]).shape)
  for path, leaf in flat.items():
    if path[: len(weight)] == weight and path[-1] == "qvalue":
      return tuple(value(leaf).shape)
  raise ValueError(
    f"{path_str(weight)!r}, the base weight of an adapter, is not in the tree; the tree functions read "
    "the weight's shape, so pass the full tree (nnx.state(model), or combine(trainable, frozen))."
  )


def path_str(path: Iterable[Any]) -> str:
  """'/'-joined path, as matched by every regex in this library (list indices print as numbers)."""
  return "/".join(str(k) for k in path)


# --- flat view of the three kinds of tree --------------------------------------------------------------------------


def flatten(tree: PyTree) -> tuple[Flat, Callable[[Flat], PyTree]]:
  """{path: leaf} of a linen tree, an `nnx.State` or a pure dict, and `rebuild(flat) -> tree of the same kind`.

  Leaves of an `nnx.State` stay `nnx.Variable`s (read them with `value`); for a dict the rebuilt tree is a plain
  nested dict (a FrozenDict comes back as a dict, as `traverse_util` does).
  """
  if isinstance(tree, nnx.State):
    state_type = type(tree)
    flat = dict(nnx.to_flat_state(tree))
    return flat, lambda new: nnx.from_flat_state(new, cls=state_type)
  if tree is None:
    return {}, lambda new: traverse_util.unflatten_dict(new)
  flat = traverse_util.flatten_dict(tree)
  if flat and all(len(path) > 1 and path[-1] == _ORBAX_VALUE for path in flat):
    return (
      {path[:-1]: leaf for path, leaf in flat.items()},
      lambda new: traverse_util.unflatten_dict({path + (_ORBAX_VALUE,): leaf for path, leaf in new.items()}),
    )
  return flat, traverse_util.unflatten_dict


def value(leaf: Any) -> Any:
  """The array held by a leaf (an `nnx.Variable`'s value, or the leaf itself)."""
  if isinstance(leaf, nnx.Variable):
    return leaf.get_value()
  return leaf


def rewrap(like: Any, new_value: Any) -> Any:
  """`new_value` in the container of `like`: a copy of an `nnx.Variable` (same type and metadata), or bare."""
  if isinstance(like, nnx.Variable):
    return like.replace(new_value)
  return new_value


def key_name(key: Any) -> Any:
  """The plain name of a pytree path key (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey, or a bare key)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def is_variable(x: Any) -> bool:
  """True for an `nnx.Variable`, which the tree functions treat as one leaf."""
  return isinstance(x, nnx.Variable)


def walk(tree: PyTree) -> tuple[list[Path], list[Any], Any]:
  """(paths, leaves, treedef) of any pytree: the one walk that every mask of this library is made from.

  An `nnx.Variable` is one leaf; a path is the tuple of plain key names (dict keys, list indices, attribute names), so
  linen params, an `nnx.State` (of Variables, or of arrays as `nnx.Optimizer` passes it to `update`), a pure dict, and
  any container around them (a tuple of trees, an optax state) are read alike. When every path ends in orbax's
  `value` key (an `nnx.State` restored without a target) that level is left out of the paths, as `flatten` does.
  `jax.tree_util.tree_unflatten(treedef, new_leaves)` rebuilds the same kind of tree.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
  paths = [tuple(key_name(k) for k in path) for path, _ in flat]
  if paths and all(len(path) > 1 and path[-1] == _ORBAX_VALUE for path in paths):
    paths = [path[:-1] for path in paths]
  return paths, [leaf for _, leaf in flat], treedef


def map_leaves(tree: PyTree, fn: Callable[[Path, Any], Any]) -> PyTree:
  """A tree of the same kind and structure whose leaf at each path is `fn(path, leaf)`, rewrapped like the old leaf
  (an `nnx.Variable` stays a Variable of the same type holding the new value; a bare leaf stays bare). Any pytree
  (`walk`)."""
  paths, old, treedef = walk(tree)
  return jax.tree_util.tree_unflatten(treedef, [rewrap(leaf, fn(path, leaf)) for path, leaf in zip(paths, old)])


def gate_mask(params: PyTree) -> PyTree:
  """Bool tree of `params`' kind and structure, True at gate leaves (`sora_gate`, `<w>_lora_gate`, NNX `SoraGate`):
  what the gate steps act on. An `nnx.Variable` leaf gives a Variable holding the bool, a bare leaf a bare bool, so
  the mask matches `params` leaf for leaf in `optax.masked` and under `nnx.Optimizer` (`init` sees Variables, `update`
  arrays)."""
  return map_leaves(params, is_gate)


def not_gate_mask(params: PyTree) -> PyTree:
  """The complement of `gate_mask`, a tree of the same kind: True at every leaf that is not a gate. The mask of an
  optimizer that must not touch the gates, e.g. `optax.adamw(lr, mask=sora_jax.not_gate_mask)`."""
  return complement(gate_mask(params))


def complement(mask: PyTree) -> PyTree:
  """The negation of a bool mask tree, of the same kind (inside an `nnx.Variable` too)."""
  return jax.tree.map(operator.not_, mask)
