"""Reading transformers checkpoints into Flax linen encoders.

`from_pretrained` resolves a local directory or a hub name, reads the config with transformers' `AutoConfig` and the
weights from safetensors (single or sharded) or `pytorch_model.bin`, and hands them to the family module chosen by
`config.model_type`. The family maps transformers names to our parameter paths; this module checks the result against
the model's own parameter shapes, initialises what is missing and reports it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

logger = logging.getLogger(__name__)

# config.model_type -> module under sora_jax.models (imported on first use).
FAMILIES = {
  "bert": "bert",
  "roberta": "bert",
  "electra": "bert",
  "deberta-v2": "deberta_v2",
}

_LAYER = re.compile(r"layer_(\d+)")
# `SoraConfig.stacked` of the `nn.scan` layout (`stack_layers`): every kernel below a `layer` key has a layer axis.
STACKED = r"(.*/)?layer/.*"


@dataclasses.dataclass(frozen=True)
class LoadReport:
  """What `from_pretrained` did with a checkpoint.

  missing_head: our parameter paths of the head that the checkpoint lacks; freshly initialised, as expected when a
    base-model checkpoint is loaded for fine-tuning.
  missing_encoder: our parameter paths outside the head that the checkpoint lacks; also initialised, but the model
    is then not the pretrained one.
  unexpected: transformers keys of the checkpoint that the model does not use (e.g. a masked-LM head).
  """

  source: str
  missing_head: tuple[str, ...] = ()
  missing_encoder: tuple[str, ...] = ()
  unexpected: tuple[str, ...] = ()

  @property
  def ok(self) -> bool:
    return not self.missing_encoder

  def __str__(self) -> str:
    lines = [f"loaded {self.source}"]
    if self.missing_head:
      lines.append(
        f"  newly initialised head ({len(self.missing_head)}, expected for fine-tuning): "
        + ", ".join(self.missing_head)
      )
    if self.missing_encoder:
      lines.append(
        f"  MISSING encoder weights ({len(self.missing_encoder)}, initialised at random): "
        + ", ".join(self.missing_encoder)
      )
    if self.unexpected:
      lines.append(f"  unused checkpoint weights ({len(self.unexpected)}): " + ", ".join(self.unexpected))
    if len(lines) == 1:
      lines.append("  all weights matched")
    return "\n".join(lines)


class Pretrained(NamedTuple):
  model: nn.Module
  params: dict
  config: Any  # transformers.PretrainedConfig
  report: LoadReport


def family_module(model_type: str):
  """The family module (e.g. `sora_jax.models.bert`) for a transformers `model_type`."""
  if model_type not in FAMILIES:
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
  return importlib.import_module(f"sora_jax.models.{FAMILIES[model_type]}")


def stack_layers(params: dict) -> dict:
  """`.../layer_<i>/...` leaves -> `.../layer/...` with a leading layer axis (the `nn.scan` layout).

  Leaves of the same path below `layer_0 .. layer_{n-1}` are stacked along a new axis 0; other leaves are kept.
  """
  flat = traverse_util.flatten_dict(params)
  out, groups = {}, {}
  for path, leaf in flat.items():
    at = next((i for i, key in enumerate(path) if _LAYER.fullmatch(str(key))), None)
    if at is None:
      out[path] = leaf
      continue
    index = int(_LAYER.fullmatch(path[at]).group(1))
    stacked_path = path[:at] + ("layer",) + path[at + 1 :]
    groups.setdefault(stacked_path, {})[index] = leaf
  for path, by_index in groups.items():
    if sorted(by_index) != list(range(len(by_index))):
      raise ValueError(f"layers of {'/'.join(path)} are not numbered 0..n-1: {sorted(by_index)}")
    leaves = [by_index[i] for i in range(len(by_index))]
    stack = np.stack if all(isinstance(x, np.ndarray) for x in leaves) else jnp.stack
    out[path] = stack(leaves)
  return traverse_util.unflatten_dict(out)


def unstack_layers(params: dict) -> dict:
  """`.../layer/...` leaves with a leading layer axis -> `.../layer_<i>/...` (the unrolled layout)."""
  flat = traverse_util.flatten_dict(params)
  out = {}
  for path, leaf in flat.items():
    if "layer" not in path:
      out[path] = leaf
      continue
    at = path.index("layer")
    for i in range(leaf.shape[0]):
      out[path[:at] + (f"layer_{i}",) + path[at + 1 :]] = leaf[i]
  return traverse_util.unflatten_dict(out)


def _resolve(name_or_path: str, revision: str | None) -> str:
  """A local directory holding config.json and weights; hub names go through huggingface_hub's cache."""
  if os.path.isdir(name_or_path):
    return name_or_path
  from huggingface_hub import snapshot_download

  # Safetensors first; the pickled .bin only for repos that have no safetensors.
  path = snapshot_download(name_or_path, revision=revision, allow_patterns=["*.json", "*.safetensors"])
  if not any(f.endswith(".safetensors") for f in os.listdir(path)):
    path = snapshot_download(name_or_path, revision=revision, allow_patterns=["*.json", "pytorch_model*.bin"])
  return path


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as NumPy arrays keyed by their transformers names."""

  def at(name):
    return os.path.join(directory, name)

  if os.path.exists(at("model.safetensors")):
    return _read_safetensors([at("model.safetensors")])
  if os.path.exists(at("model.safetensors.index.json")):
    return _read_safetensors([at(f) for f in _shards(at("model.safetensors.index.json"))])
  if os.path.exists(at("pytorch_model.bin")):
    return _read_torch_bin([at("pytorch_model.bin")])
  if os.path.exists(at("pytorch_model.bin.index.json")):
    return _read_torch_bin([at(f) for f in _shards(at("pytorch_model.bin.index.json"))])
  raise FileNotFoundError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin in {directory}")


def _shards(index_file: str) -> list[str]:
  with open(index_file) as f:
    return sorted(set(json.load(f)["weight_map"].values()))


def _read_safetensors(files: list[str]) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  state = {}
  for file in files:
    with safe_open(file, framework="np") as f:
      for key in f.keys():
        state[key] = np.asarray(f.get_tensor(key))
  return state


def _read_torch_bin(files: list[str]) -> dict[str, np.ndarray]:
  import torch  # only here: .bin checkpoints are pickled torch tensors

  state = {}
  for file in files:
    for key, tensor in torch.load(file, map_location="cpu", weights_only=True).items():
      if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
      state[key] = tensor.numpy()
  return state


def _is_head(family, path: tuple[str, ...]) -> bool:
  return any(re.match(pattern, "/".join(path)) for pattern in family.HEAD)


def from_pretrained(
  name_or_path: str,
  *,
  num_labels: int | None = None,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  scan_layers: bool = False,
  remat: bool = False,
  revision: str | None = None,
  seed: int = 0,
  **config_overrides,
) -> Pretrained:
  """Builds our linen sequence classifier for a transformers checkpoint and loads its weights.

  Args:
    name_or_path: a local directory (config.json + weights) or a hub model name.
    num_labels: outputs of the classification head (1 = regression); default: the config's.
    dtype: computation dtype (e.g. `jnp.bfloat16`); logits are always float32.
    param_dtype: dtype of the returned parameters.
    scan_layers: put the layers under `nn.scan` (params under `encoder/layer` with a leading layer axis).
    remat: rematerialise each layer in the backward pass (`nn.remat`).
    revision: hub revision, for hub names.
    seed: PRNG seed for the parameters the checkpoint lacks (a fresh classifier head).
    **config_overrides: passed to `transformers.AutoConfig.from_pretrained` (e.g. `hidden_dropout_prob=0.0`).

  Returns:
    `Pretrained(model, params, config, report)`; `model.apply({"params": params}, input_ids, attention_mask)`
    gives logits `(batch, num_labels)`.
  """
  from transformers import AutoConfig

  directory = _resolve(name_or_path, revision)
  if num_labels is not None:
    config_overrides["num_labels"] = num_labels
  config = AutoConfig.from_pretrained(directory, **config_overrides)
  family = family_module(config.model_type)
  model = family.build(config, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, remat=remat)

  flat, unexpected = family.convert(read_state_dict(directory), config)
  if scan_layers:
    flat = traverse_util.flatten_dict(stack_layers(traverse_util.unflatten_dict(flat)))

  dummy_ids = jnp.zeros((1, 8), jnp.int32)
  init = jax.jit(lambda key: model.init(key, dummy_ids, jnp.ones_like(dummy_ids))["params"])
  expected = traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0)))

  for path in sorted(set(flat) - set(expected)):
    # Converted but not in the model (e.g. a pooler the chosen head does not use): report, drop.
    unexpected.append("/".join(path))
    del flat[path]
  for path, leaf in list(flat.items()):
    if tuple(leaf.shape) == tuple(expected[path].shape):
      continue
    if _is_head(family, path):
      # e.g. a classifier fine-tuned for another number of labels: re-initialised below, reported missing.
      logger.warning(
        "%s: checkpoint shape %s, model %s; initialising it afresh",
        "/".join(path),
        tuple(leaf.shape),
        tuple(expected[path].shape),
      )
      del flat[path]
    else:
      raise ValueError(
        f"{'/'.join(path)}: checkpoint shape {tuple(leaf.shape)}, model expects {tuple(expected[path].shape)}"
      )

  missing = sorted(set(expected) - set(flat))
  missing_head, missing_encoder = [], []
  for path in missing:
    name = "/".join(path)
    (missing_head if _is_head(family, path) else missing_encoder).append(name)
  if missing:
    # Only the missing leaves leave the jitted init, so XLA drops the rest (a full init compiles much slower).
    init_missing = jax.jit(lambda key: [traverse_util.flatten_dict(init(key))[path] for path in missing])
    flat.update(zip(missing, init_missing(jax.random.key(seed))))

  params = traverse_util.unflatten_dict({path: jnp.asarray(leaf, dtype=param_dtype) for path, leaf in flat.items()})
  report = LoadReport(
    source=name_or_path,
    missing_head=tuple(missing_head),
    missing_encoder=tuple(missing_encoder),
    unexpected=tuple(sorted(unexpected)),
  )
  if missing_encoder:
    logger.warning("%s", report)
  else:
    logger.info("%s", report)
  return Pretrained(model=model, params=params, config=config, report=report)
