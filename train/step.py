"""The jitted train step: the loss of a batch (gradient accumulation over micro-batches), SoRA's optimizer step built
from `train.optimizer.Hyper` inside the trace, the non-finite guard and the step's metrics; and the programs that
create the train state and run the step on the mesh.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sora_jax import adapters
from sora_jax import sharding as shd
from train.build import Experiment
from train.config import RunConfig
from train.evaluate import logits_fn
from train.optimizer import Hyper, budget_mode, build_optimizer, opt_state_specs


class TrainState(NamedTuple):
  step: jax.Array
  params: Any  # the trainable half of `adapters.split`
  opt_state: Any


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
    tx = build_optimizer(config, state.params, hyper)
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


def step_programs(experiment: Experiment, trainable, hyper: Hyper) -> dict:
  """{"init_state": jit((trainable, hyper) -> TrainState), "train_step": `make_train_step`}, with the trainable
  params' specs, optimizer moments on their param's spec and the frozen params' specs as shardings."""
  config, mesh = experiment.config, experiment.mesh
  trainable_shardings = shd.named(experiment.trainable_specs, mesh)
  abstract_opt = jax.eval_shape(build_optimizer(config, trainable, hyper).init, trainable)
  opt_shardings = shd.named(opt_state_specs(abstract_opt, experiment.trainable_specs), mesh)
  state_shardings = TrainState(shd.replicated(mesh), trainable_shardings, opt_shardings)
  init_state = jax.jit(
    lambda t, h: TrainState(jnp.zeros((), jnp.int32), t, build_optimizer(config, t, h).init(t)),
    out_shardings=state_shardings,
  )
  return {
    "init_state": init_state,
    "train_step": make_train_step(experiment, state_shardings, shd.named(experiment.frozen_specs, mesh)),
  }
