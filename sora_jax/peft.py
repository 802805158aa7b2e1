"""SoRA adapters to and from HuggingFace PEFT's LoRA format (adapter_config.json + adapter_model.safetensors).

A pruned SoRA is a LoRA whose rank differs per module. PEFT computes, per module m with rank r_m and alpha_m,

  y = x W^T + (alpha_m / r_m) * x A_m^T B_m^T,     lora_A: (r_m, in),  lora_B: (out, r_m)

(alpha_m / sqrt(r_m) with `use_rslora`), while SoRA computes y = x W + s * ((x A) * gate) B with one global
s = alpha / rank. On export the gate and s are folded into B and every module is written with alpha_m = r_m, so
its PEFT scale is exactly 1 whichever of `lora_alpha` / `alpha_pattern` a reader applies:

  lora_A = A^T,   lora_B = (s * diag(gate) B)^T.

On import every module's own scale c_m is folded into B relative to the returned config's scale s:
sora_b = (c_m / s) * lora_B^T, sora_a = lora_A^T, sora_gate = ones(r_m).

Both tree layouts are handled. linen (`sora_a (in, r)`, `sora_b (r, out)` beside a 2-D kernel): the factors are the
Linear's as they are. qwix (`<w>_lora_a`, `<w>_lora_b`, `<w>_lora_gate` beside any weight, e.g. Tunix's einsum weight
q_proj (d, n, h) or o_proj (n, h, d)): the weight's first k axes are the Linear's inputs, so A (*W[:k], r) and
B (r, *W[k:]) flatten to (in, r) and (r, out) in W's order, which is how Tunix reshapes transformers' (out, in) weight.

This module knows no model family, and has one path for both layouts. Module names and weight layouts come from a
naming object the model side provides (the `PeftNaming` protocol below), asked about weight paths of our tree:
`module_name(weight)` and `in_axes(weight)`; `sora_jax.models.EncoderNaming(hf_config)` answers for our linen
encoders, `sora_jax.models.TunixNaming(model)` for Tunix's Qwen3 and Llama3. A module pruned to rank 0 has zero-size
factors in both layouts (`sora_jax.prune`) and is left out of the file (PEFT requires r > 0).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import math
from typing import Any, NamedTuple, Protocol, Sequence

import jax
import numpy as np

from sora_jax import adapter_files
from sora_jax import layout
from sora_jax import leaves
from sora_jax.adapters import SoraConfig, adapter_records, merge, prune, scale_and_rank, weight_roles
from sora_jax.leaves import path_str

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_BIN_WEIGHTS_NAME = "adapter_model.bin"
# PeftModel wraps the transformers model twice (PeftModel.base_model = LoraModel, LoraModel.model = the model).
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<factor>A|B)(\.[^.]+)?\.weight")
_UNSUPPORTED_KEY = re.compile(r".*\.(lora_embedding_[AB]|lora_magnitude_vector|lora_[AB](\.[^.]+)?\.bias)(\.|$)")
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")

Flat = dict[tuple[str, ...], Any]


class PeftNaming(Protocol):
  """What the PEFT code asks the model side (`sora_jax.models.EncoderNaming`, `sora_jax.models.TunixNaming`). Both
  questions take a weight path of our tree (either layout; an encoder's tree unrolled).

  model_type: transformers' `config.model_type` the names belong to ('bert', 'qwen3', 'llama').
  module_name(weight): the transformers module name of our weight path (`bert/encoder/layer_0/attention/self/query/
    kernel` -> `bert.encoder.layer.0.attention.self.query`, `layers/0/attn/q_proj/w` ->
    `model.layers.0.self_attn.q_proj`), or None when the weight has no transformers Linear.
  in_axes(weight): k such that the weight's first k axes are the Linear's input features and the rest its outputs.

  Optional: `task_type` (PEFT's default task type); `head` and `convert` (a head written whole as `modules_to_save`:
  regexes of its parameters, and transformers tensors -> our leaves); `is_stacked`, `unstack`, `stack` (a scanned
  layout, read and written unrolled); `hf_tensor(weight, array)` and `hf_config()` (for `save_merged`).
  """

  model_type: str

  def module_name(self, weight: tuple) -> str | None: ...

  def in_axes(self, weight: tuple) -> int: ...


class LoadedPeft(NamedTuple):
  """What `load_peft` returns.

  params: the model's tree with the adapter as `sora_a` (in, r_m), `sora_b` (r_m, out), `sora_gate` (r_m,) = ones,
    and the saved head modules replaced.
  config: the SoRA config whose scale `sora_b` was folded against; use it for `factored`, `merge` and training.
  ranks: transformers module name -> rank r_m, for every adapted module.
  """

  params: dict
  config: SoraConfig
  ranks: dict[str, int]


def _unstacked(params, naming) -> tuple[Any, bool]:
  """The tree as the naming reads it: a scanned encoder tree unrolled (and True); any other tree as given."""
  if hasattr(naming, "is_stacked") and naming.is_stacked(params):
    return naming.unstack(params), True
  return params, False


def _check_naming(naming, fn: str) -> None:
  if naming is None or not hasattr(naming, "module_name") or not hasattr(naming, "in_axes"):
    got = "a transformers config" if hasattr(naming, "model_type") else repr(naming)
    raise TypeError(
      f"{fn}: `naming` must be a naming object, got {got}; pass "
      "sora_jax.models.EncoderNaming(hf_config) for our encoders or "
      "sora_jax.models.TunixNaming(model) for a Tunix model."
    )


def _check_module_names(records: Sequence[leaves.AdapterPaths], naming, fn: str) -> None:
  """Every adapted weight must be a transformers Linear by the naming."""
  for rec in records:
    if naming.module_name(rec.weight) is None:
      raise ValueError(
        f"{fn}: the adapter of {path_str(rec.weight)!r} maps to no transformers Linear of "
        f"{naming!r}; was the tree made for another model?"
      )


def _host(flat: Flat) -> Flat:
  """{path: NumPy array} of a flat tree (any leaf container)."""
  return {path: np.asarray(jax.device_get(leaves.value(leaf))) for path, leaf in flat.items()}


def _pattern_matches(pattern: str, name: str) -> bool:
  """PEFT's rule for `rank_pattern` / `alpha_pattern` keys: the key, as a regex, ends the name at a '.' boundary."""
  return re.match(rf"(.*\.)?({pattern})$", name) is not None


def _pattern_value(patterns: dict[str, Any], name: str, default):
  """The value of the first key of `patterns` that matches `name` (PEFT's `get_pattern_key`), else default."""
  for pattern, value in patterns.items():
    if _pattern_matches(pattern, name):
      return value
  return default


def _to_hf(leaf: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """Our leaf -> (transformers parameter name, tensor); the inverse of the families' `convert` for one leaf."""
  if leaf == "bias":
    return "bias", value
  if leaf == "kernel" and value.ndim == 2:  # (in, out) -> Linear (out, in)
    return "weight", value.T
  if leaf == "kernel" and value.ndim == 3:  # (width, in / groups, out) -> Conv1d (out, in / groups, width)
    return "weight", value.transpose(2, 1, 0)
  if leaf in ("scale", "embedding"):
    return "weight", value
  raise ValueError(f"no transformers name for a {value.ndim}-D leaf {leaf!r}")


def _saved_modules(flat: Flat, patterns: Sequence[str]) -> list[tuple[str, ...]]:
  """The largest module subtrees all of whose non-adapter leaves match one of `patterns` (re.match on the path).

  These become PEFT `modules_to_save` entries: `classifier` (BERT, or RoBERTa's dense + out_proj), `bert.pooler`.
  """
  base = [path for path in flat if not leaves.is_adapter_leaf(path)]
  saved = {path for path in base if any(re.match(p, path_str(path)) for p in patterns)}
  modules = []
  for path in sorted(saved):
    for depth in range(1, len(path)):
      module = path[:depth]
      if all(p in saved for p in base if p[:depth] == module):
        if module not in modules:
          modules.append(module)
        break
  return modules


def save_peft(
  directory: str | os.PathLike,
  params,
  config: SoraConfig | Any,
  *,
  naming=None,
  base_model_name_or_path: str | None = None,
  modules_to_save: Sequence[str] | None = None,
  task_type: str | None = None,
  uniform_rank: bool = False,
  model_config=None,
) -> dict[str, int]:
  """Writes a SoRA tree as a PEFT LoRA adapter: `adapter_config.json` and `adapter_model.safetensors`.

  The tree is unstacked (if it comes from `nn.scan`) and pruned (`sora_jax.prune`: zero gates and the zero rows of B
  that pad a stacked module's layers are cut) first, so every module gets its own rank r_m = its number of nonzero
  gates. Modules at rank 0 are left out: PEFT requires r > 0.
  `lora_A = A^T (r_m, in)`, `lora_B = (s * diag(gate) B)^T (out, r_m)`, alpha_m = r_m, so PEFT's scale is 1 per
  module. `r` and `lora_alpha` are the most common rank; the others go to `rank_pattern` and `alpha_pattern` under
  their full module names, each of which matches exactly one module by PEFT's rules.

  Both layouts take this one path. Each adapted weight must be a transformers Linear by `naming`
  (`naming.module_name(weight)` not None, no batch axes, contracted axes = the weight's first `naming.in_axes(weight)`),
  else a ValueError names it: A (*W[:k], r) -> lora_A (r, in), B (r, *W[k:]) -> lora_B (out, r), s per module from
  the config (a SoraConfig's, or the first matching rule's). When every module is at rank 0 the adapter is still
  written, as a zero rank-1 LoRA on the first adapted weight (PEFT rejects an empty `target_modules`), so it loads
  everywhere and adds nothing; a warning is logged.

  Args:
    directory: created if missing; an existing adapter there is replaced whole (written beside it, then renamed
      into place: a failure leaves the old adapter), other files in it are kept.
    params: the model's tree with SoRA adapters (pruned or not; linen unrolled or stacked, or an nnx.State / pure
      dict of the qwix layout).
    config: the SoraConfig (linen), or the SoraProvider / rules (qwix) the adapters were made with; its scale
      alpha / rank is folded into B.
    naming: `sora_jax.models.EncoderNaming(pre.config)` or `sora_jax.models.TunixNaming(model)`.
    base_model_name_or_path: recorded in adapter_config.json; PEFT and servers load the base model from it.
    modules_to_save: regexes (`re.match` on '/'-joined paths) of non-adapter parameters written whole, as PEFT
      `modules_to_save` (a naming with `convert` only); default the naming's `head` (an encoder's classifier and
      pooler; none for a Tunix model). `()` writes none.
    task_type: PEFT task type; default the naming's `task_type` ("SEQ_CLS" for encoders, "CAUSAL_LM" for Tunix).
    uniform_rank: pad every module to the largest written rank R with zero rows of lora_A / columns of lora_B
      (r = lora_alpha = R, no patterns), for servers that read one rank (vLLM); the outputs are identical.
    model_config: no longer taken (raises TypeError naming the replacement, `naming=EncoderNaming(...)`).

  Returns:
    transformers module name -> rank written (absent: pruned to 0).

  Example:
    pre = from_pretrained("bert-base-uncased", num_labels=2)
    ... train ...
    save_peft("out/peft", params, sora_config, naming=EncoderNaming(pre.config),
              base_model_name_or_path="bert-base-uncased")
    # torch: PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(...), "out/peft")
  """
  if model_config is not None:
    raise TypeError("save_peft: model_config= is replaced by naming=sora_jax.models.EncoderNaming(model_config).")
  _check_naming(naming, "save_peft")
  if config is None:
    raise ValueError(
      "save_peft: pass the SoraConfig, or the SoraProvider (or rules), that made the adapters as `config`; its "
      "alpha / rank is folded into lora_B."
    )
  tree, _ = _unstacked(params, naming)
  flat, _ = leaves.flatten(tree)
  records = adapter_records({p: leaves.value(v) for p, v in flat.items()}, "save_peft", config)
  _check_module_names(records, naming, "save_peft")
  # Pruned even without gates: a stacked module's layers share one rank, padded with zero rows of B, which `prune`
  # cuts per layer once unstacked.
  vals = _host(leaves.flatten(prune(tree))[0])
  tensors, ranks = _lora_tensors(vals, config, naming)
  saved, saved_names, head = _head(vals, naming, modules_to_save)
  tensors.update(head)
  ranks_written = dict(ranks)
  if not ranks:
    name, lora_a, lora_b = _placeholder(vals, records, naming, saved)
    logger.warning(
      "save_peft: every SoRA module is pruned to rank 0; writing a zero rank-1 LoRA on %s so that "
      "the adapter stays loadable (it adds nothing).",
      name,
    )
    ranks_written[name] = 1
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = lora_a
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = lora_b
  overlap = [n for n in ranks_written if any(n == s or n.startswith(s + ".") for s in saved_names)]
  if overlap:
    raise ValueError(
      f"modules {overlap} carry LoRA adapters and are also in modules_to_save {saved_names}; "
      "PEFT does not adapt a module it saves whole. Narrow `modules_to_save`."
    )
  _check_patterns(ranks_written, vals, naming)
  _write_adapter(
    directory,
    tensors,
    ranks_written,
    task_type=task_type or getattr(naming, "task_type", "CAUSAL_LM"),
    base_model_name_or_path=base_model_name_or_path,
    modules_to_save=saved_names or None,
    uniform_rank=uniform_rank,
  )
  return ranks


def _head(vals: Flat, naming, modules_to_save) -> tuple[list[tuple], list[str], dict[str, np.ndarray]]:
  """The modules written whole (PEFT `modules_to_save`): (module paths, transformers names, tensors), checked
  against the naming's own converter. Default: the naming's `head` (none for a naming without one)."""
  patterns = tuple(getattr(naming, "head", ()) if modules_to_save is None else modules_to_save)
  if not patterns:
    return [], [], {}
  if not hasattr(naming, "convert"):
    raise ValueError(
      f"save_peft: modules_to_save {list(patterns)} given, but {naming!r} has no `convert` to check whole weights "
      "against; pass modules_to_save=None (the LoRA factors only)."
    )
  saved = _saved_modules(vals, patterns)
  # A module's transformers name is that of any leaf directly in it.
  names = [naming.module_name(module + ("kernel",)) for module in saved]
  head: dict[str, np.ndarray] = {}
  for path, leaf in vals.items():
    if not leaves.is_adapter_leaf(path) and any(path[: len(m)] == m for m in saved):
      hf_leaf, value = _to_hf(path[-1], leaf)
      head[f"{naming.module_name(path)}.{hf_leaf}"] = value
  _check_inverse(head, vals, naming)
  return saved, names, {_PREFIX + key: value for key, value in head.items()}


def _placeholder(vals: Flat, records, naming, saved) -> tuple[str, np.ndarray, np.ndarray]:
  """(name, lora_A (1, in), lora_B (out, 1)): a zero rank-1 LoRA on the first adapted weight outside the saved head,
  for a tree whose every module is at rank 0 (PEFT rejects an empty `target_modules`; a zero LoRA adds nothing)."""
  for rec in records:
    if not any(rec.weight[: len(m)] == m for m in saved):
      w_shape, k = leaves.weight_shape(vals, rec.weight), naming.in_axes(rec.weight)
      fan_in, fan_out = math.prod(w_shape[:k]), math.prod(w_shape[k:])
      return naming.module_name(rec.weight), np.zeros((1, fan_in), np.float32), np.zeros((fan_out, 1), np.float32)
  raise ValueError(
    "save_peft: every module is pruned to rank 0 and every adapted weight lies in modules_to_save; there is no "
    "module to write a placeholder LoRA on."
  )


def _write_adapter(
  directory,
  tensors: dict[str, np.ndarray],
  ranks: dict[str, int],
  *,
  task_type: str | None,
  base_model_name_or_path: str | None,
  modules_to_save: list[str] | None,
  uniform_rank: bool,
) -> None:
  """Writes adapter_config.json and adapter_model.safetensors.

  Every module has alpha_m = r_m (PEFT scale 1): `r` = `lora_alpha` = the most common rank, the others in
  `rank_pattern` = `alpha_pattern` under full module names. With `uniform_rank`, every module is padded to the largest
  rank R with zero rows of lora_A and zero columns of lora_B (they add nothing), and r = lora_alpha = R with no
  patterns, for servers that read one global rank (vLLM).
  """
  ranks = dict(ranks)
  if uniform_rank:
    top = max(ranks.values())
    for name, k in ranks.items():
      a_key, b_key = f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"
      tensors[a_key] = np.pad(tensors[a_key], ((0, top - k), (0, 0)))
      tensors[b_key] = np.pad(tensors[b_key], ((0, 0), (0, top - k)))
      ranks[name] = top
  counts = collections.Counter(ranks.values())
  r = max(counts, key=lambda k: (counts[k], k))  # most common rank; ties to the larger
  adapter_config = {
    "peft_type": "LORA",
    "task_type": task_type,
    "base_model_name_or_path": base_model_name_or_path,
    "r": int(r),
    "lora_alpha": int(r),
    "target_modules": sorted(ranks),
    "rank_pattern": {n: int(k) for n, k in sorted(ranks.items()) if k != r},
    "alpha_pattern": {n: int(k) for n, k in sorted(ranks.items()) if k != r},
    "modules_to_save": modules_to_save,
    "lora_dropout": 0.0,
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "init_lora_weights": True,
    "inference_mode": True,
  }
  from safetensors.numpy import save_file

  with adapter_files.atomic_folder(
    directory, owned=(WEIGHTS_NAME, _BIN_WEIGHTS_NAME, CONFIG_NAME)
  ) as staging:  # old adapter whole, or the new
    save_file(
      {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
      os.path.join(staging, WEIGHTS_NAME),
      metadata={"format": "pt"},
    )
    with open(os.path.join(staging, CONFIG_NAME), "w") as f:
      json.dump(adapter_config, f, indent=2, sort_keys=True)


def _check_inverse(head: dict[str, np.ndarray], flat: Flat, naming) -> None:
  """The head written under transformers names must convert back to exactly our leaves."""
  back, unexpected = naming.convert(head)
  wrong = sorted(unexpected) + [
    path_str(p)
    for p, v in back.items()
    if p not in flat or np.shape(v) != flat[p].shape or not np.array_equal(v, flat[p])
  ]
  if wrong or len(back) != len(head):
    raise ValueError(f"save_peft: the head's transformers names do not map back onto our parameters: {wrong}")


def _check_patterns(ranks: dict[str, int], vals: Flat, naming) -> None:
  """Each full module name in target_modules / rank_pattern must select only itself under PEFT's rules, among the
  modules of the tree and their parents."""
  modules = set()
  # The written modules themselves, and every module named by a leaf (a quantized weight is a subtree: not named).
  for name in list(ranks) + [None if leaves.is_adapter_leaf(p) else naming.module_name(p) for p in vals]:
    parts = name.split(".") if name else []
    modules.update(".".join(parts[:depth]) for depth in range(1, len(parts) + 1))
  for name in ranks:
    hits = [m for m in modules if m == name or m.endswith("." + name) or _pattern_matches(name, m)]
    if hits != [name]:
      raise ValueError(f"save_peft: module name {name!r} would select {sorted(hits)} in PEFT")


def _lora_tensors(vals: Flat, config, naming) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """PEFT tensors and ranks of every adapter of a pruned flat tree of arrays (either layout), each a transformers
  Linear: lora_A = A^T (r_m, in), lora_B = (s * diag(gate) B)^T (out, r_m), in float32; rank-0 modules left out."""
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, int] = {}
  for rec in leaves.find_adapters(vals):
    a, b, gate = vals[rec.a], vals[rec.b], vals.get(rec.gate)
    if rec.layout == "linen" and (a.ndim != 2 or b.ndim != 2):
      raise ValueError(
        f"{path_str(rec.module)}: PEFT export handles 2-D adapters (a: (in, r), b: (r, out)), "
        f"got a {a.shape}, b {b.shape}"
      )
    rank = a.shape[-1]
    if rank == 0:
      continue
    _linear_roles(rec, vals, naming)
    scale, _ = scale_and_rank(config, rec.weight)
    b2 = b.reshape(rank, -1).astype(np.float32) * scale
    if gate is not None:
      b2 = b2 * gate.reshape(rank, 1)
    name = naming.module_name(rec.weight)
    ranks[name] = rank
    tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.reshape(-1, rank).astype(np.float32).T
    tensors[f"{_PREFIX}{name}.lora_B.weight"] = b2.T
  return tensors, ranks


def _linear_roles(rec: leaves.AdapterPaths, vals: Flat, naming) -> layout.WeightRoles:
  """The adapter's axis roles, checked to be a transformers Linear's: no batch axes, the contracted axes are the
  weight's first `naming.in_axes` axes in order, the remaining ones the rest."""
  name = path_str(rec.weight)
  w_shape = leaves.weight_shape(vals, rec.weight)
  roles = weight_roles(vals, rec)
  k = naming.in_axes(rec.weight)
  contract = roles.contract if roles.kind == "dot" else tuple(sorted(roles.contract))
  if roles.batch or contract != tuple(range(k)) or tuple(roles.remain) != tuple(range(k, len(w_shape))):
    raise ValueError(
      f"{name}: its adapter contracts weight axes {roles.contract} (batch {roles.batch}); the "
      f"transformers Linear of {name!r} takes axes {tuple(range(k))} as "
      "inputs, so the adapter has no PEFT LoRA equivalent."
    )
  return roles


def save_merged(
  directory: str | os.PathLike,
  tree,
  config: Any,
  *,
  naming: PeftNaming,
  max_shard_size: int = 5 * 2**30,
) -> list[str]:
  """Writes the base weights with the adapters merged in as a transformers checkpoint: config.json and
  model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above `max_shard_size`.

  W <- W + s * A diag(gate) B on every adapted weight (`sora_jax.merge`), then every weight is written under its
  transformers name in transformers' layout (`naming.hf_tensor`). `AutoModelForCausalLM.from_pretrained(directory)`
  loads it.

  Args:
    directory: created if missing; an existing checkpoint there is replaced whole (written beside it, then
      renamed into place), other files in it are kept.
    tree: `nnx.State` (or pure dict) of the adapted model, pruned or not.
    config: the SoraProvider / rules that made the adapters (their scale, and the weights' recorded axis roles).
    naming: the model's naming object (`sora_jax.models.tunix.TunixNaming(model)`).
    max_shard_size: bytes per safetensors file (float32).

  Returns:
    the safetensors file names written.
  """
  flat, _ = leaves.flatten(tree)
  _check_module_names(
    adapter_records({p: leaves.value(v) for p, v in flat.items()}, "save_merged", config), naming, "save_merged"
  )
  merged, _ = leaves.flatten(merge(tree, config))
  tensors: dict[str, np.ndarray] = {}
  for path, leaf in merged.items():
    name, tensor = naming.hf_tensor(path, np.asarray(jax.device_get(leaves.value(leaf)), np.float32))
    tensors[name] = np.ascontiguousarray(tensor)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_size:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += nbytes
  from safetensors.numpy import save_file

  if len(shards) == 1:
    files = ["model.safetensors"]
  else:
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  with adapter_files.atomic_folder(
    directory, owned=("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors", "config.json")
  ) as staging:
    if len(shards) > 1:
      index = {
        "metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
        "weight_map": {name: file for file, shard in zip(files, shards) for name in shard},
      }
      with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    for file, shard in zip(files, shards):
      save_file(shard, os.path.join(staging, file), metadata={"format": "pt"})
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(naming.hf_config(), f, indent=2, sort_keys=True)
  return files
