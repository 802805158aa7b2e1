"""Reading a HuggingFace PEFT LoRA adapter onto our trees: `load_peft`.

The inverse of `sora_jax.peft.save_peft` for any PEFT LoRA adapter (ours or one trained with PyTorch PEFT): every
module's own scale c_m (lora_alpha / r, alpha_pattern, use_rslora) is folded into B relative to the returned config's
scale s, sora_b = (c_m / s) * lora_B^T, sora_a = lora_A^T, sora_gate = ones(r_m); the factors take the layout of the
tree they land on (linen: beside a 2-D kernel; qwix: beside any weight, read through the naming object's `in_axes`).
The adapter files are checked before anything is read into a tree (`sora_jax.adapter_files`), and every refusal is
one line naming the file and the key.
"""

from __future__ import annotations

import collections
import json
import math
import os
from typing import Any, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from sora_jax import adapter_files
from sora_jax import layout
from sora_jax import leaves
from sora_jax.adapters import SoraConfig, scale_and_rank, weight_roles
from sora_jax.leaves import A, B, GATE, path_str
from sora_jax.leaves import LINEN_LEAVES as ADAPTER_LEAVES
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
  _linear_roles,
  _pad_for_stacking,
  _pattern_value,
  _unstacked_flat,
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

  Every adapted module gets `sora_a = lora_A^T (in, r_m)`, `sora_b = (c_m / s) lora_B^T (r_m, out)` and
  `sora_gate = ones(r_m)`, where c_m is the module's PEFT scale (alpha_m / r_m, or alpha_m / sqrt(r_m) with
  `use_rslora`; alpha_m from `alpha_pattern` by PEFT's matching rule, else `lora_alpha`) and s the returned
  config's scale. So `factored(config)` / `merge(params, config)` compute exactly what PEFT computes. Ranks may
  differ per module (r_m is read off the tensors). Adapter leaves already in `params` are dropped first, so the
  result holds exactly this adapter. In a stacked (`nn.scan`) tree a module has one rank for all layers: layers
  with a smaller rank (or no adapter) are padded with zero columns of A, zero rows of B and zero gates. Weights of
  `modules_to_save` (the head) and any saved biases replace ours.

  qwix layout (a Tunix model): `params` is `nnx.State` of the model after `sora_jax.apply_sora` with rules that
  match every module of the adapter, and `config` that provider (required: B is folded against each rule's s).
  Each adapted weight gets A = lora_A^T as (*W[:k], r_m), B = (c_m / s) lora_B^T as (r_m, *W[k:]), gate = ones;
  adapted weights the adapter leaves out get rank 0 (as `prune` leaves them). `nnx.update(model, loaded.params)`
  puts it in. Whole weights (`modules_to_save`) are refused, as are modules that map to no weight, and an adapter
  whose base model (a local directory) is of another `model_type`.

  Args:
    directory: holds adapter_config.json and adapter_model.safetensors (or adapter_model.bin).
    params: the base model's tree (`from_pretrained(...).params`), unrolled or stacked (kept as given); or the
      adapted Tunix model's `nnx.State`.
    naming: `sora_jax.models.EncoderNaming(pre.config)` or `sora_jax.models.TunixNaming(model)`.
    config: linen: the SoRA config to continue with; default `SoraConfig(rank=r_max, alpha=r_max, targets=naming
      targets)` (s = 1; `stacked=".*/layer/.*"` for a stacked tree); with a given config only its scale matters.
      qwix: the SoraProvider (or rules) of the adapted model.

  Returns:
    `LoadedPeft(params, config, ranks)`.
  """
  directory = os.fspath(directory)
  _check_naming(naming, "load_peft")
  if hasattr(naming, "in_axes"):
    return _load_peft_qwix(directory, params, naming, config)
  adapter = _read_adapter(directory)
  peft_config, factors, plain = adapter

  flat, stacked = _unstacked_flat(params, naming)
  flat = {path: leaf for path, leaf in flat.items() if path[-1] not in ADAPTER_LEAVES}
  kernel_modules = {naming.module_name(path[:-1]): path[:-1] for path in flat if path[-1] == "kernel"}

  ranks = {name: pair["A"].shape[0] for name, pair in factors.items()}
  if config is None:
    r_max = max(ranks.values(), default=1)
    config = SoraConfig(
      rank=r_max, alpha=float(r_max), targets=naming.targets, stacked=naming.stacked if stacked else None
    )

  unknown = sorted(set(factors) - set(kernel_modules))
  if unknown:
    raise ValueError(
      f"{directory}: the adapter's modules {unknown[:4]}{' ...' if len(unknown) > 4 else ''} are not dense "
      f"layers of this {naming.model_type} model (e.g. {sorted(kernel_modules)[:2]}); was the adapter "
      f"made for base model {peft_config.get('base_model_name_or_path')!r}?"
    )
  for name in sorted(factors):
    module = kernel_modules[name]
    kernel = flat[module + ("kernel",)]
    if kernel.ndim != 2:
      raise ValueError(f"{directory}: {name} is a PEFT Linear, the kernel of {path_str(module)} is {kernel.shape}")
    values = _as_adapter(directory, adapter, name, kernel.shape, 1, LINEN_DENSE, config.scale, path_str(module))
    for leaf, value in zip((A, B, GATE), values):
      flat[module + (leaf,)] = np.asarray(value, kernel.dtype)

  if plain:
    converted, unexpected = naming.convert(plain)
    unexpected = sorted(set(unexpected) | {path_str(p) for p in converted if p not in flat})
    if unexpected:
      raise ValueError(f"{directory}: saved weights {unexpected} are not parameters of this {naming.model_type} model")
    for path, value in converted.items():
      if np.shape(value) != flat[path].shape:
        raise ValueError(
          f"{directory}: {path_str(path)} has shape {np.shape(value)}, the model "
          f"{tuple(flat[path].shape)}; was it saved for another num_labels?"
        )
      flat[path] = np.asarray(value, flat[path].dtype)

  if stacked:
    flat = _pad_for_stacking(flat)
  tree = traverse_util.unflatten_dict({path: jnp.asarray(leaf) for path, leaf in flat.items()})
  if stacked:
    tree = naming.stack(tree)
  return LoadedPeft(tree, config, ranks)


# --- qwix layout (SoraProvider / qwix LoRA on NNX models) with a naming object -------------------------------------


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


def _load_peft_qwix(directory: str, tree, naming, config) -> LoadedPeft:
  """load_peft for qwix-layout trees: see `load_peft`."""
  if config is None:
    raise ValueError(
      "load_peft: pass the SoraProvider (or rules) of the adapted model as `config`; lora_B is "
      "folded against its alpha / rank."
    )
  adapter = _read_adapter(directory)
  _check_architecture(directory, adapter, naming)
  if adapter.plain:
    raise ValueError(
      f"{directory}: whole weights {sorted(adapter.plain)[:3]} (modules_to_save) cannot be read "
      "onto a Tunix model; load_peft reads the LoRA factors only."
    )
  flat, rebuild = leaves.flatten(tree)
  records = {rec.weight: rec for rec in leaves.find_adapters(flat) if rec.layout == "qwix"}
  if not records:
    raise ValueError(
      "load_peft: the tree has no adapters to fill (no <w>_lora_a leaves); apply SoRA first "
      "(sora_jax.apply_sora with rules matching the adapter's modules) and pass nnx.state(model)."
    )
  out = dict(flat)
  vals = {p: leaves.value(v) for p, v in flat.items()}  # the arrays of the input tree (`out` gets the new leaves)
  ranks: dict[str, int] = {}
  loaded = set()
  for name, pair in sorted(adapter.factors.items()):
    weight = naming.weight_path(name)
    if weight is None:
      raise ValueError(
        f"{directory}: the adapter's module {name!r} maps to no weight of {naming!r}; was the "
        f"adapter made for base model {adapter.peft_config.get('base_model_name_or_path')!r}?"
      )
    if weight not in records:
      raise ValueError(
        f"load_peft: {name!r} ({path_str(weight)}) has no adapter leaves in the tree; apply SoRA "
        "with a rule whose module_path matches it."
      )
    rec = records[weight]
    w_shape = leaves.weight_shape(vals, rec.weight)
    roles = _linear_roles(rec, vals, naming)
    scale, _ = scale_and_rank(config, weight)
    values = _as_adapter(directory, adapter, name, w_shape, naming.in_axes(weight), roles, scale, path_str(weight))
    for path, value in zip(rec.leaves, values):
      if vals.get(path) is not None:
        out[path] = leaves.rewrap(flat[path], jnp.asarray(value, vals[path].dtype))
    ranks[name] = pair["A"].shape[0]
    loaded.add(weight)
  for weight, rec in records.items():  # modules the adapter leaves out: rank 0, as `prune` leaves them
    if weight in loaded:
      continue
    w_shape = leaves.weight_shape(vals, rec.weight)
    a, b, gate = (vals.get(p) for p in rec.leaves)
    roles = weight_roles(vals, rec)
    for path, old, shape in zip(rec.leaves, (a, b, gate), roles.shapes(w_shape, 0)):
      if old is not None:
        out[path] = leaves.rewrap(flat[path], jnp.zeros(shape, old.dtype))
  return LoadedPeft(rebuild(out), config, ranks)
