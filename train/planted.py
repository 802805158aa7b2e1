"""`python -m train.planted [--seeds 0 1 2] [--out docs/rank_learning_planted.md]`: rank learning against planted ranks.

An oracle for rank allocation. The teacher is the student's frozen base plus known low-rank changes in some modules:

  h <- h + tanh(h (W_m + D_m)),   D_m = U_m diag(sigma_m) V_m^T of rank k_m (k_m = 0: nothing planted in module m)

over a residual chain of six (width, width) modules m0..m5, full batch, mean squared error on the chain's output. A learned-rank
adapter should give rank to the planted modules (at least k_m) and none to the others. The study compares, for each
budget that a uniform LoRA of rank r = 1, 2, 4 occupies, SoRA steered to that budget against that LoRA and against a
LoRA with the largest planted rank everywhere, and runs `sora_proximal` over a lambda sweep; for each gate update:

  gradient     the recipe: `sora_proximal(lam, learning_rate=eta, optimizer=adamw(lr))`, the gates' proximal-gradient
               step on their raw gradient over one running RMS of all gate gradients,
               g <- S_{eta lam}(g - eta dL/dg / rms)
  sgd          the plain proximal-gradient step, g <- S_{eta lam}(g - eta dL/dg), eta = 0.1
  adam         the chain form `optax.chain(adamw(lr, mask=not_gate), sora_proximal(lam, learning_rate=lr))`: the
               gates take AdamW's normalised step, then the threshold (the official code's gate update)
  adam_metric  the proximal step in Adam's own metric: g <- S_{tau_i}(g - lr m_i / (sqrt(v_i) + eps)) with the
               per-coordinate threshold tau_i = lr lam / (sqrt(v_i) + eps)

and the recipe with a refit phase (`sora_proximal(..., refit_from=0.7 * steps)`: from there a zero gate stays zero
and the kept gates train without the threshold, which removes L1's shrinkage of the kept ranks).

The builders (`PLANTS`, `planted_problem`, `run_linen`, `run_nnx`) are imported by tests/test_planted.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import sora_jax

WIDTH, RANK_MAX, SAMPLES = 16, 8, 256
LR, GATE_LR, STEPS = 1e-2, 1e-2, 600
SGD_LR = 0.1  # the plain proximal-gradient candidate's gate step (raw gradient, no normalisation)
REFIT = 0.7  # the refit rows: zeros frozen and no threshold from 70 % of the steps (as budget mode's reach)


@dataclasses.dataclass(frozen=True)
class Plant:
  """Planted ranks k_m and singular-value scales of the six modules m0..m5 (rank 0: nothing planted)."""

  name: str
  ranks: tuple[int, ...]
  strengths: tuple[float, ...]


PLANTS = {
  "two_of_six": Plant("two_of_six", (0, 0, 0, 0, 6, 6), (0.0, 0.0, 0.0, 0.0, 1.0, 1.0)),
  "mixed": Plant("mixed", (0, 1, 2, 4, 0, 3), (0.0, 2.0, 1.0, 0.5, 0.0, 1.0)),
}
MODULES = tuple(f"m{i}" for i in range(6))


class Modules(nn.Module):
  """Six bias-free Dense(width) modules m0..m5 in a residual chain, h <- h + tanh(h W_m), on input x."""

  width: int = WIDTH

  @nn.compact
  def __call__(self, x):
    for m in MODULES:
      x = x + jnp.tanh(nn.Dense(self.width, use_bias=False, name=m)(x))
    return x


class NnxModules(nnx.Module):
  """The NNX twin of `Modules`."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    for m in MODULES:
      setattr(self, m, nnx.Linear(width, width, use_bias=False, rngs=rngs))

  def __call__(self, x):
    for m in MODULES:
      x = x + jnp.tanh(getattr(self, m)(x))
    return x


class Problem(NamedTuple):
  """Inputs xs (samples, width), teacher outputs ys, and the student's frozen base params (linen)."""

  xs: jax.Array
  ys: jax.Array
  base: dict


def planted_problem(plant: Plant, seed: int, width: int = WIDTH, samples: int = SAMPLES) -> Problem:
  """The teacher of `plant`: the base with W_m + U diag(sigma) V^T in each module, sigma = strength * linspace(1, 0.5,
  k), U and V orthonormal; inputs standard normal."""
  rng = np.random.default_rng(seed)
  xs = jnp.asarray(rng.normal(size=(samples, width)), jnp.float32)
  base = Modules(width).init(jax.random.key(seed), xs)["params"]
  teacher = {}
  for m, k, strength in zip(MODULES, plant.ranks, plant.strengths):
    delta = np.zeros((width, width))
    if k:
      u = np.linalg.qr(rng.normal(size=(width, k)))[0]
      v = np.linalg.qr(rng.normal(size=(width, k)))[0]
      delta = u @ np.diag(strength * np.linspace(1.0, 0.5, k)) @ v.T
    teacher[m] = {"kernel": jnp.asarray(np.asarray(base[m]["kernel"]) + delta, jnp.float32)}
  return Problem(xs, Modules(width).apply({"params": teacher}, xs), base)


def _loss(outputs, ys) -> jax.Array:
  return jnp.mean((outputs - ys) ** 2)


def base_loss(problem: Problem) -> float:
  """The loss of the base model alone (no adapter)."""
  return float(_loss(Modules().apply({"params": problem.base}, problem.xs), problem.ys))


def optimizer(
  method: str,
  steps: int,
  *,
  lam: float = 0.0,
  target: float | None = None,
  lr: float = LR,
  gate_lr: float = GATE_LR,
  refit: float | None = None,
) -> optax.GradientTransformation:
  """The optimizer of one study method: "lora" (gates fixed at one), or SoRA with gate update "gradient", "adam" or
  "adam_metric" (module docstring), proximal at `lam` or (`target`) steered to a budget; `refit`: the fraction of the
  steps after which the proximal recipe refits the kept ranks (`sora_proximal(refit_from=...)`)."""
  not_gate = sora_jax.not_gate_mask
  if method == "lora":
    return optax.chain(optax.adamw(lr, mask=not_gate), optax.masked(optax.set_to_zero(), sora_jax.gate_mask))
  # A budget's L1 strength is lam, or 1.0 when none is given; it refits its kept ranks itself.
  budget = {} if target is None else {"target_fraction": target, "total_steps": steps}
  lam = lam if target is None else lam or 1.0
  if method == "gradient":
    refit_from = None if refit is None or target is not None else int(refit * steps)
    return sora_jax.sora_optimizer(gate_lr, lam, optax.adamw(lr), refit_from=refit_from, **budget)
  if method == "adam":
    return sora_jax.sora_optimizer(lr, lam, gate_update="adam", **budget)
  if method == "sgd" and target is None:
    return optax.chain(
      optax.masked(optax.adamw(lr), not_gate),
      optax.masked(optax.scale(-SGD_LR), sora_jax.gate_mask),
      sora_jax.sora_proximal(lam, learning_rate=SGD_LR),
    )
  if method == "adam_metric" and target is None:
    return _adam_metric(lam, lr, optax.adamw(lr))
  raise ValueError(f"unknown study method {method!r} (target={target})")


class _AdamMetricState(NamedTuple):
  others: optax.OptState
  gates: optax.OptState


def _adam_metric(lam: float, lr: float, others: optax.GradientTransformation) -> optax.GradientTransformation:
  """Gates: Adam's moments of the raw gradient, then the proximal step in Adam's metric, threshold per coordinate."""
  eps = 1e-8
  adam = optax.scale_by_adam(eps=eps)
  gate_mask = sora_jax.gate_mask
  others = optax.masked(others, sora_jax.not_gate_mask)
  adam_on_gates = optax.masked(adam, gate_mask)

  def init_fn(params):
    return _AdamMetricState(others.init(params), adam_on_gates.init(params))

  def update_fn(grads, state, params):
    updates, others_state = others.update(grads, state.others, params)
    gate_state = adam_on_gates.update(grads, state.gates, params)[1]
    inner = gate_state.inner_state
    count = inner.count
    nu_hat = jax.tree.map(lambda v: v / (1 - 0.999**count), inner.nu)
    mu_hat = jax.tree.map(lambda m: m / (1 - 0.9**count), inner.mu)

    def step(is_gate, u, p, m, v):
      if not is_gate:
        return u
      scale = jnp.sqrt(v) + eps
      return sora_jax.soft_threshold(p - lr * m / scale, lr * lam / scale) - p

    updates = jax.tree.map(step, gate_mask(params), updates, params, mu_hat, nu_hat)
    return updates, _AdamMetricState(others_state, gate_state)

  return optax.GradientTransformation(init_fn, update_fn)


class Outcome(NamedTuple):
  """One run: final loss, retained adapter parameters and the rank (nonzero gates) per module."""

  loss: float
  retained_params: int
  ranks: tuple[int, ...]
  min_active_ranks: int  # the fewest nonzero gates after any step (0: the adapter was switched off mid-run)


def _config(rank: int) -> sora_jax.SoraConfig:
  return sora_jax.SoraConfig(rank=rank, alpha=float(rank), targets=(r"m\d/kernel",))


def run_linen(
  problem: Problem, tx: optax.GradientTransformation, steps: int = STEPS, rank: int = RANK_MAX, seed: int = 0
) -> Outcome:
  """Trains the adapter of `Modules` (linen, `sora_jax.init`/`split`/`factored`) with `tx` for `steps` full-batch
  steps."""
  config = _config(rank)
  trainable, frozen = sora_jax.split(sora_jax.init(jax.random.key(seed + 1000), problem.base, config))
  model = Modules()

  def loss_fn(t):
    with sora_jax.factored(config):
      return _loss(model.apply({"params": sora_jax.combine(t, frozen)}, problem.xs), problem.ys)

  @jax.jit
  def train(t):
    def step(carry, _):
      t, state = carry
      grads = jax.grad(loss_fn)(t)
      updates, state = tx.update(grads, state, t)
      t = optax.apply_updates(t, updates)
      return (t, state), sum(jnp.sum(g != 0) for g in _gates(t))

    (t, _), active = jax.lax.scan(step, (t, tx.init(t)), None, length=steps)
    return t, loss_fn(t), jnp.min(active)

  trainable, loss, min_active = train(trainable)
  report = sora_jax.rank_report(sora_jax.combine(trainable, frozen), config)
  ranks = {row.path: row.rank for row in report.rows}
  return Outcome(float(loss), int(report.retained_params), tuple(ranks.get(m, 0) for m in MODULES), int(min_active))


def _gates(tree) -> list:
  return [tree[m]["sora_gate"] for m in MODULES]


def run_nnx(
  problem: Problem, tx: optax.GradientTransformation, steps: int = STEPS, rank: int = RANK_MAX, seed: int = 0
) -> Outcome:
  """As `run_linen`, on `NnxModules` adapted by `sora_jax.SoraProvider` / `apply_sora`, trained by `nnx.Optimizer`."""
  model = NnxModules(WIDTH, nnx.Rngs(0))
  for m in MODULES:
    getattr(model, m).kernel[...] = problem.base[m]["kernel"]
  provider = sora_jax.SoraProvider(module_path=".*", rank=rank, alpha=float(rank))
  model = sora_jax.apply_sora(model, provider, problem.xs[:1], rngs=nnx.Rngs(seed + 1000))
  opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    loss = lambda mdl: _loss(mdl(problem.xs), problem.ys)  # noqa: E731
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return sum(jnp.sum(getattr(model, m).kernel_lora_gate[...] != 0) for m in MODULES)

  min_active = rank * len(MODULES)
  for _ in range(steps):
    min_active = min(min_active, int(step(model, opt)))
  loss = float(_loss(model(problem.xs), problem.ys))
  ranks = tuple(int(np.sum(np.asarray(getattr(model, m).kernel_lora_gate[...]) != 0)) for m in MODULES)
  return Outcome(loss, sum(ranks) * 2 * WIDTH, ranks, min_active)


def _row(name: str, outcomes: Sequence[Outcome], base: float) -> str:
  losses = np.array([o.loss for o in outcomes]) / base
  ranks = ["/".join(str(o.ranks[i]) for o in outcomes) for i in range(len(MODULES))]
  params = sorted({o.retained_params for o in outcomes})
  return (
    f"| {name} | {losses.mean():.4f} ± {losses.std():.4f} | {'/'.join(map(str, params))} | " + " | ".join(ranks) + " |"
  )


def study(seeds: Sequence[int], steps: int = STEPS) -> str:
  """The study's markdown: per plant, equal-budget table and lambda sweep (loss relative to the base model's)."""
  header = (
    "| method | loss / base loss (mean ± std) | retained params | "
    + " | ".join(MODULES)
    + " |\n"
    + "|---" * (3 + len(MODULES))
    + "|"
  )
  out = []
  for plant in PLANTS.values():
    problems = [planted_problem(plant, s) for s in seeds]
    bases = np.mean([base_loss(p) for p in problems])
    planted_max = max(plant.ranks)
    lines = [
      f"### Plant `{plant.name}`: planted ranks "
      + ", ".join(f"{m} {k}" for m, k in zip(MODULES, plant.ranks))
      + f" (strengths {', '.join(f'{s:g}' for s in plant.strengths)}); base loss {bases:.3f}",
      "",
      "Equal budget (SoRA at r_max 8 steered to the parameters of uniform LoRA r; ranks per seed):",
      "",
      header,
    ]

    def runs(make, rank=RANK_MAX):
      return [run_linen(p, make(), steps, rank=rank, seed=s) for p, s in zip(problems, seeds)]

    for r in (1, 2, 4):
      lines.append(_row(f"LoRA r={r}", runs(lambda: optimizer("lora", steps), rank=r), bases))
      for gate in ("gradient", "adam"):
        lines.append(
          _row(f"SoRA budget {r}/8, {gate}", runs(lambda: optimizer(gate, steps, target=r / RANK_MAX)), bases)
        )
    lines.append(
      _row(f"LoRA r={planted_max} (planted max)", runs(lambda: optimizer("lora", steps), rank=planted_max), bases)
    )
    lines += ["", "Lambda sweep of `sora_proximal` (r_max 8):", "", header]
    for gate, lams in (
      ("gradient", (0.1, 0.3, 1.0)),
      ("sgd", (0.01, 0.03, 0.1)),
      ("adam", (0.1, 0.3, 1.0, 3.0)),
      ("adam_metric", (0.03, 0.3)),
    ):
      for lam in lams:
        lines.append(_row(f"{gate}, lambda {lam:g}", runs(lambda: optimizer(gate, steps, lam=lam)), bases))
    for lam in (0.3, 1.0):
      lines.append(
        _row(
          f"gradient, lambda {lam:g}, refit from 70 %",
          runs(lambda: optimizer("gradient", steps, lam=lam, refit=REFIT)),
          bases,
        )
      )
    out.append("\n".join(lines))
  return "\n\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m train.planted", description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
  args = parser.parse_args(argv)
  started = time.time()
  text = study(args.seeds, args.steps)
  stamp = (
    f"`python -m train.planted --seeds {' '.join(map(str, args.seeds))} --steps {args.steps}`, "
    f"{platform.machine()} CPU x{jax.local_device_count()} ({jax.default_backend()}), "
    f"{datetime.date.today().isoformat()}, {time.time() - started:.0f} s"
  )
  print(text + "\n\n" + stamp)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n\n" + stamp + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
