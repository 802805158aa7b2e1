"""A run's optimizer: the learning-rate schedule, the values that enter the jitted step as arrays (`Hyper`), and
SoRA's optimizer (`sora_jax.sora_optimizer`) or AdamW built from them.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

import sora_jax
from sora_jax import adapters
from sora_jax import sharding as shd
from train.build import Experiment
from train.config import AdapterConfig, ConfigError, RunConfig


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


def check_budget_keeps_a_rank(adapter: AdapterConfig, budget: int, least: int, full: int) -> None:
  """Raises `ConfigError` when a budget of `budget` adapter parameters (of `full` at full rank) is below `least`,
  one rank of the smallest adapted module: it would keep nothing and export an empty adapter."""
  if budget >= least:
    return
  if adapter.target_params is not None:
    raise ConfigError(
      f"adapter.target_params={adapter.target_params} is below one rank of the smallest module ({least} adapter "
      f"parameters): the budget would keep nothing; give adapter.target_params={least} or more"
    )
  fraction = math.ceil(least / full * 1e4) / 1e4
  raise ConfigError(
    f"adapter.target_fraction={adapter.target_fraction:g} is {budget} adapter parameters, below one rank of the "
    f"smallest module ({least}): the budget would keep nothing; give adapter.target_fraction={fraction:g} or more"
  )


def budget_params(experiment: Experiment) -> Optional[int]:
  """The budget in adapter parameters (`adapter.target_params`, or `target_fraction` of the parameters at full
  rank, rounded down); None outside budget mode."""
  from sora_jax.budget import adapter_params, smallest_rank_params

  a = experiment.config.adapter
  if not budget_mode(experiment.config):
    return None
  full = adapter_params(experiment.trainable)
  if a.target_params is not None and a.target_params > full:
    raise ConfigError(
      f"adapter.target_params={a.target_params} is above the {full} adapter parameters at "
      f"rank {a.rank}; give at most {full}, or a larger adapter.rank"
    )
  budget = a.target_params if a.target_params is not None else int(math.floor(a.target_fraction * full))
  check_budget_keeps_a_rank(a, budget, smallest_rank_params(experiment.trainable), full)
  return budget


def target_fraction(experiment: Experiment) -> Optional[float]:
  """The budget as a fraction of the adapter parameters at full rank; None outside budget mode."""
  from sora_jax.budget import adapter_params

  budget = budget_params(experiment)
  return None if budget is None else budget / adapter_params(experiment.trainable)


def build_optimizer(config: RunConfig, trainable, hyper: Hyper) -> optax.GradientTransformation:
  """The run's optimizer from `hyper`'s (possibly traced) values: clip_by_global_norm, then for "sora"
  `sora_jax.sora_optimizer` around AdamW (the proximal step, or the budget in budget mode; `adapter.gate_update`
  "gradient": the gates' own step at `optim.gate_learning_rate`, "adam": AdamW's step scaled by gate_learning_rate /
  learning_rate, as the official code), AdamW with the gates fixed at their init for "lora", AdamW alone for "full"."""
  opt, a, method = config.optim, config.adapter, config.adapter.method
  schedule = functools.partial(_lr_at, peak=hyper.learning_rate, warmup=hyper.warmup_steps, total=hyper.total_steps)
  adamw = optax.adamw(
    schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay, mask=_decay_mask(trainable)
  )
  clip = optax.clip_by_global_norm(opt.max_grad_norm)
  gates = adapters.gate_mask(trainable)
  if method == "sora":
    gradient = a.gate_update == "gradient"
    gate_schedule = functools.partial(
      _lr_at, peak=hyper.gate_learning_rate, warmup=hyper.warmup_steps, total=hyper.total_steps
    )
    scaled = not gradient and opt.gate_learning_rate is not None
    return optax.chain(
      clip,
      sora_jax.sora_optimizer(
        gate_schedule if gradient else schedule,
        hyper.lam,
        adamw,
        gate_update=a.gate_update,
        threshold_by_lr=gradient or a.lambda_scaled_by_lr,
        gate_scale=hyper.gate_learning_rate / hyper.learning_rate if scaled else None,
        target_fraction=hyper.target_fraction if budget_mode(config) else None,
        total_steps=hyper.total_steps,
        start=a.budget_start,
        reach=a.budget_reach,
        refit_from=None if a.refit_from is None else jnp.ceil(a.refit_from * hyper.total_steps),
        mask=gates,
      ),
    )
  chain = [clip, adamw]
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
  tx = build_optimizer(config, trainable, hyper_for(config, total_steps, sparse_lambda))
  return tx, lr_schedule(config, total_steps)


def opt_state_specs(opt_state, trainable_specs) -> Any:
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
