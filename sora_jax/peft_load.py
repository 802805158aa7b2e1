"""Reading a HuggingFace PEFT LoRA adapter onto our trees: `load_peft`.

The inverse of `sora_jax.peft.save_peft` for any PEFT LoRA adapter (ours or one trained with PyTorch PEFT): every
module's own scale c_m (lora_alpha / r, alpha_pattern, use_rslora) is folded into B relative to the returned config's
scale s, sora_b = (c_m / s) * lora_B^T, sora_a = lora_A^T, sora_gate = ones(r_m). One path serves both layouts: the
naming object finds each module's weight (`module_name(weight)`) and its input axes (`in_axes(weight)`), and the
factors take the layout of the tree they land on (linen: beside a 2-D kernel; qwix: the weight's own adapter leaves).
The adapter files are checked before anything is read into a tree (`sora_jax.adapter_files`), and every refusal is
one line naming the file and the key.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax import adapter_files
from sora_jax import layout
from sora_jax import leaves
from sora_jax.adapters import SoraConfig, scale_and_rank, weight_roles
from sora_jax.leaves import A, B, GATE, path_str
from sora_jax.peft import (
  _BIN_WEIGHTS_NAME,
  _LORA_KEY,
  _MODULES_TO_SAVE,
  _PREFIX,
  _UNSUPPORTED_KEY,
  CONFIG_NAME,
  WEIGHTS_NAME,
  LoadedPeft,
  _check_naming,
  Flat,
  _linear_roles,
  _pattern_value,
  _unstacked,
)


def _tensor_file(directory: str) -> str:
  path = os.path.join(directory, WEIGHTS_NAME)
  return path if os.path.exists(path) else os.path.join(directory, _BIN_WEIGHTS_NAME)


def _read_tensors(directory: str) -> dict[str, np.ndarray]:
  path = os.path.join(directory, WEIGHTS_NAME)
  if os.path.exists(path):
    from safetensors.numpy import load_file

    return load_file(path)
  path = os.path.join(directory, _BIN_WEIGHTS_NAME)
  if os.path.exists(path):
    import torch  # only for pickled adapters

    return {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
  raise FileNotFoundError(f"no {WEIGHTS_NAME} or {_BIN_WEIGHTS_NAME} in {directory}")


class _Adapter(NamedTuple):
  """A PEFT LoRA adapter as read from disk: its config, {module: {"A": lora_A, "B": lora_B}}, whole weights."""

  peft_config: dict
  factors: dict[str, dict[str, np.ndarray]]
  plain: dict[str, np.ndarray]

  def scale(self, name: str, rank: int) -> float:
    """PEFT's scale of one module: alpha_m / r_m (alpha_m / sqrt(r_m) with use_rslora), alpha_m from
    `alpha_pattern` by PEFT's matching rule, else `lora_alpha`."""
    alpha = _pattern_value(self.peft_config.get("alpha_pattern") or {}, name, self.peft_config.get("lora_alpha", 8))
    return alpha / (math.sqrt(rank) if self.peft_config.get("use_rslora", False) else rank)


def _read_adapter(directory: str) -> _Adapter:
  config_path = os.path.join(directory, CONFIG_NAME)
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; is it a PEFT adapter directory?")
  peft_config = adapter_files.read_adapter_config(config_path)
  if peft_config.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{directory}: peft_type {peft_config.get('peft_type')!r}; only LORA adapters can be read")
  for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
    if peft_config.get(flag):
      raise ValueError(f"{directory}: {flag}=true is not supported by load_peft")
  if peft_config.get("layer_replication"):
    raise ValueError(f"{directory}: layer_replication is not supported by load_peft")
  factors: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  plain: dict[str, np.ndarray] = {}
  tensors = _read_tensors(directory)
  adapter_files.check_adapter_tensors(_tensor_file(directory), tensors, peft_config)
  for key, value in tensors.items():
    name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
    if _UNSUPPORTED_KEY.match(name):
      raise ValueError(
        f"{directory}: {key} is not a plain LoRA weight (embedding LoRA, DoRA or LoRA bias); "
        "load_peft reads LoRA on Linear layers only"
      )
    lora = _LORA_KEY.fullmatch(name)
    if lora:
      factors[lora["module"]][lora["factor"]] = np.asarray(value, np.float32)
    else:
      plain[_MODULES_TO_SAVE.sub(".", name)] = np.asarray(value, np.float32)
  for name, pair in factors.items():
    if set(pair) != {"A", "B"}:
      raise ValueError(f"{directory}: {name} has lora_{''.join(pair)} but not both lora_A and lora_B")
  return _Adapter(peft_config, dict(factors), plain)


LINEN_DENSE = layout.linen_roles(2, 2, 2)  # a linen Dense kernel (in, out): A (in, r), B (r, out), gate (r,)


def _as_adapter(
  directory: str,
  adapter: _Adapter,
  name: str,
  w_shape: Sequence[int],
  in_axes: int,
  roles: layout.WeightRoles,
  scale: float,
  where: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PEFT module `name` (lora_A (r, in), lora_B (out, r), a transformers Linear) as our A, B and gate for a weight of
  shape `w_shape` whose first `in_axes` axes are the Linear's input, in the shapes `roles` gives: A = lora_A^T,
  B = (c_m / s) lora_B^T with c_m the module's PEFT scale and s = `scale` ours, gate = ones. Both layouts use it."""
  pair = adapter.factors[name]
  lora_a, lora_b, rank = pair["A"], pair["B"], pair["A"].shape[0]
  fan_in, fan_out = math.prod(w_shape[:in_axes]), math.prod(w_shape[in_axes:])
  if lora_a.shape != (rank, fan_in) or lora_b.shape != (fan_out, rank):
    raise ValueError(
      f"{directory}: {name} lora_A {lora_a.shape} / lora_B {lora_b.shape} do not fit the weight "
      f"{tuple(w_shape)} of {where} (a Linear {fan_in} -> {fan_out}); was the adapter made for another model size?"
    )
  a_shape, b_shape, g_shape = roles.shapes(w_shape, rank)
  factor = adapter.scale(name, rank) / scale
  with np.errstate(over="ignore"):
    b = factor * lora_b.T
    # |(B A)_ij| <= rank max|A| max|B|: below float32's largest, the merged update is finite too
    bound = rank * float(np.max(np.abs(lora_a), initial=0.0)) * float(np.max(np.abs(b), initial=0.0))
  if not (math.isfinite(factor) and np.isfinite(b).all() and bound < np.finfo(np.float32).max):
    raise ValueError(
      f"{os.path.join(directory, CONFIG_NAME)}: lora_alpha / alpha_pattern give {name} a scale of "
      f"{adapter.scale(name, rank):.3g}, which makes its LoRA update overflow float32; check the adapter's alpha"
    )
  return lora_a.T.reshape(a_shape), b.reshape(b_shape), np.ones(g_shape)


def load_peft(
  directory: str | os.PathLike,
  params,
  naming=None,
  *,
  config: SoraConfig | Any | None = None,
) -> LoadedPeft:
  """Reads a PEFT LoRA adapter onto our tree as SoRA adapters with gates of one.

  Every adapted module gets A = lora_A^T, B = (c_m / s) lora_B^T and gate = ones(r_m), where c_m is the module's PEFT
  scale (alpha_m / r_m, or alpha_m / sqrt(r_m) with `use_rslora`; alpha_m from `alpha_pattern` by PEFT's matching
  rule, else `lora_alpha`) and s the returned config's scale (per weight: a SoraConfig's, or the first matching
  rule's). So `factored(config)` / `merge(params, config)` compute exactly what PEFT computes. Ranks may differ per
  module (r_m is read off the tensors). The adapter's modules are found by `naming.module_name(weight)`, and the
  factors take the weight's layout through `naming.in_axes(weight)`. Adapted weights the adapter leaves out get rank
  0: zero-size A and B (as `prune` leaves them), and a zero-size gate.

  linen layout (our encoders: `params` is the base model's tree, unrolled or stacked, kept as given): adapter leaves
  already in `params` are dropped first, so the result holds exactly this adapter; `sora_a (in, r_m)`,
  `sora_b (r_m, out)`, `sora_gate (r_m,)` go beside each 2-D kernel of the adapter, rank-0 ones beside the other
  2-D kernels the config targets. In a stacked (`nn.scan`) tree a module has one rank for all layers: layers with a
  smaller rank are padded with zero columns of A, zero rows of B and zero gates. Weights of `modules_to_save` (the
  head) and any saved biases replace ours.

  qwix layout (an `nnx.State`, or a tree with `<w>_lora_a` leaves: a Tunix model after `sora_jax.apply_sora` with
  rules that match every module of the adapter): the adapter leaves in the tree are filled, in their dtype and
  container; `nnx.update(model, loaded.params)` puts them in. Whole weights (`modules_to_save`) are refused.

  Modules that map to no adapted weight, and an adapter whose base model (a local directory) is of another
  `model_type`, are refused with one line.

  Args:
    directory: holds adapter_config.json and adapter_model.safetensors (or adapter_model.bin).
    params: the base model's tree (`from_pretrained(...).params`), or the adapted Tunix model's `nnx.State`.
    naming: `sora_jax.models.EncoderNaming(pre.config)` or `sora_jax.models.TunixNaming(model)`.
    config: linen: the SoRA config to continue with; default `SoraConfig(rank=r_max, alpha=r_max, targets=naming
      targets)` (s = 1; `stacked=".*/layer/.*"` for a stacked tree); a given config's scale is folded against and
      its targets get rank-0 adapters. qwix: the SoraProvider (or rules) of the adapted model (required).

  Returns:
    `LoadedPeft(params, config, ranks)`.
  """
  directory = os.fspath(directory)
  _check_naming(naming, "load_peft")
  adapter = _read_adapter(directory)
  _check_architecture(directory, adapter, naming)
  tree, stacked = _unstacked(params, naming)
  flat, rebuild = leaves.flatten(tree)
  vals = {p: leaves.value(v) for p, v in flat.items()}
  qwix = isinstance(tree, nnx.State) or any(rec.layout == "qwix" for rec in leaves.find_adapters(vals))
  ranks = {name: pair["A"].shape[0] for name, pair in adapter.factors.items()}
  if qwix and config is None:
    raise ValueError(
      "load_peft: pass the SoraProvider (or rules) of the adapted model as `config`; lora_B is "
      "folded against its alpha / rank."
    )
  if config is None:
    r_max = max(ranks.values(), default=1)
    targets, stacked_rule = getattr(naming, "targets", (r".*kernel",)), getattr(naming, "stacked", None)
    config = SoraConfig(rank=r_max, alpha=float(r_max), targets=targets, stacked=stacked_rule if stacked else None)
  if qwix:
    slots = {rec.weight: rec for rec in leaves.find_adapters(vals) if rec.layout == "qwix"}
    zero = set(slots)
  else:
    flat = {p: v for p, v in flat.items() if not leaves.is_adapter_leaf(p)}
    vals = {p: v for p, v in vals.items() if p in flat}
    kernels = [p for p, v in vals.items() if p[-1] == leaves.KERNEL and np.ndim(v) == 2]
    slots = {p: leaves.adapter_paths(p, "linen") for p in kernels}
    zero = {p for p in kernels if any(re.fullmatch(t, path_str(p)) for t in config.targets)}
  weights = _adapted_weights(directory, adapter, vals, slots, naming, qwix)
  out = dict(flat)
  for name, weight in weights.items():
    rec = slots[weight]
    roles = _linear_roles(rec, vals, naming) if qwix else LINEN_DENSE
    scale, _ = scale_and_rank(config, weight)
    w_shape = leaves.weight_shape(vals, weight)
    values = _as_adapter(directory, adapter, name, w_shape, naming.in_axes(weight), roles, scale, path_str(weight))
    _put(out, vals, rec, values)
  for weight in sorted(zero - set(weights.values()), key=lambda w: tuple(map(str, w))):
    rec = slots[weight]
    roles = weight_roles(vals, rec) if qwix else LINEN_DENSE
    _put(out, vals, rec, tuple(np.zeros(shape) for shape in roles.shapes(leaves.weight_shape(vals, weight), 0)))
  if adapter.plain:
    _put_plain(directory, adapter.plain, out, naming)
  if stacked:
    out = _pad_for_stacking(out)
  out = {p: v if isinstance(v, nnx.Variable) else jnp.asarray(v) for p, v in out.items()}
  tree = rebuild(out)
  return LoadedPeft(naming.stack(tree) if stacked else tree, config, ranks)


def _adapted_weights(
  directory: str, adapter: _Adapter, vals: Flat, slots: dict, naming, qwix: bool
) -> dict[str, tuple]:
  """transformers module name -> our weight path, for every module of the adapter; a module that names no weight
  with adapter slots is refused (qwix: a weight without adapter leaves is named as such)."""
  by_name = {naming.module_name(weight): weight for weight in slots}
  unknown = sorted(set(adapter.factors) - set(by_name))
  if unknown:
    known = {naming.module_name(p) for p in vals if qwix and not leaves.is_adapter_leaf(p)}
    named = [n for n in unknown if n in known]
    if named:
      raise ValueError(
        f"load_peft: {named[0]!r} has no adapter leaves in the tree; apply SoRA with a rule whose module_path "
        "matches it."
      )
    raise ValueError(
      f"{directory}: the adapter's modules {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are not dense layers of "
      f"this {naming.model_type} model: {unknown[0]!r} maps to no weight of {naming!r} (e.g. "
      f"{sorted(n for n in by_name if n)[:2]}); was the adapter made for base model "
      f"{adapter.peft_config.get('base_model_name_or_path')!r}?"
    )
  return {name: by_name[name] for name in sorted(adapter.factors)}


def _put(out: Flat, vals: Flat, rec: leaves.AdapterPaths, values: tuple) -> None:
  """Writes (A, B, gate) of one adapter into `out`: a leaf the tree has keeps its dtype and container (a qwix slot;
  a plain qwix LoRA's absent gate stays absent); a linen adapter's leaves are added in the kernel's dtype."""
  for path, value in zip(rec.leaves, values):
    if vals.get(path) is not None:
      out[path] = leaves.rewrap(out[path], jnp.asarray(value, vals[path].dtype))
    elif rec.layout == "linen":
      out[path] = np.asarray(value, vals[rec.weight].dtype)


def _put_plain(directory: str, plain: dict[str, np.ndarray], out: Flat, naming) -> None:
  """The adapter's whole weights (`modules_to_save`, saved biases) in place of ours, through the naming's `convert`."""
  if not hasattr(naming, "convert"):
    raise ValueError(
      f"{directory}: whole weights {sorted(plain)[:3]} (modules_to_save) cannot be read onto a model whose naming "
      f"({naming!r}) converts no transformers weights; load_peft reads the LoRA factors only."
    )
  converted, unexpected = naming.convert(plain)
  unexpected = sorted(set(unexpected) | {path_str(p) for p in converted if p not in out})
  if unexpected:
    raise ValueError(f"{directory}: saved weights {unexpected} are not parameters of this {naming.model_type} model")
  for path, value in converted.items():
    if np.shape(value) != np.shape(out[path]):
      raise ValueError(
        f"{directory}: {path_str(path)} has shape {np.shape(value)}, the model "
        f"{tuple(np.shape(out[path]))}; was it saved for another num_labels?"
      )
    out[path] = np.asarray(value, out[path].dtype)


def _pad_for_stacking(flat: Flat) -> Flat:
  """Gives every layer of a stacked module adapters of one rank, so `stack_layers` can stack them.

  Layers with a smaller rank are padded with zero columns of A, zero rows of B and zero gates: they add nothing and
  `prune` cuts them. Every layer of an adapted module has its leaves (rank 0: zero-size ones).
  """
  layer = re.compile(r"layer_\d+")
  groups: dict[tuple[str, ...], list[tuple[str, ...]]] = collections.defaultdict(list)
  for path in flat:
    if path[-1] == "kernel" and any(layer.fullmatch(k) for k in path):
      groups[tuple("layer" if layer.fullmatch(k) else k for k in path[:-1])].append(path[:-1])
  out = dict(flat)
  for modules in groups.values():
    if not any(m + (A,) in flat for m in modules):
      continue
    rank = max(flat[m + (A,)].shape[-1] for m in modules if m + (A,) in flat)
    bare = [m for m in modules if m + (A,) not in flat]
    if bare:
      raise ValueError(
        f"load_peft: {path_str(bare[0])} has no adapter while other layers of its stacked module do; give a config "
        "whose targets match it, or load onto the unrolled tree."
      )
    for m in modules:
      a, b, gate = flat[m + (A,)], flat[m + (B,)], flat[m + (GATE,)]
      pad = rank - a.shape[-1]
      out[m + (A,)] = np.pad(a, ((0, 0), (0, pad)))
      out[m + (B,)] = np.pad(b, ((0, pad), (0, 0)))
      out[m + (GATE,)] = np.pad(gate, (0, pad))
  return out


def _check_architecture(directory: str, adapter: _Adapter, naming) -> None:
  """An adapter whose base model (a local directory with config.json) is of another model_type is refused."""
  base = adapter.peft_config.get("base_model_name_or_path")
  path = os.path.join(base, "config.json") if base else None
  if path and os.path.exists(path):
    with open(path) as f:
      model_type = json.load(f).get("model_type")
    if model_type and model_type != naming.model_type:
      raise ValueError(
        f"{directory}: the adapter was made for a {model_type!r} model ({base}); this model is "
        f"{naming.model_type!r}. Load it onto a {model_type} model."
      )
