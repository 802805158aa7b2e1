"""`python -m train.planted [--seeds 0 1 2] [--steps 600] [--budgets 1 2 4] [--plants ...] [--no-sweep] [--out FILE]`:
rank learning against planted ranks.

An oracle for rank allocation. The teacher is the student's frozen base plus known low-rank changes in some modules:

  h <- h + tanh(h (W_m + D_m)),   D_m = U_m diag(sigma_m) V_m^T of rank k_m (k_m = 0: nothing planted in module m)

over a residual chain of six (width, width) modules m0..m5, full batch, mean squared error on the chain's output. A learned-rank
adapter should give rank to the planted modules (at least k_m) and none to the others. The study compares, for each
budget that a uniform LoRA of rank r = 1, 2, 4 occupies, SoRA steered to that budget against that LoRA, against the
truncation baseline (a LoRA at r_max 8 trained as long, then cut to the budget by `sora_jax.truncate`; or cut at 70 %
of the steps and its truncated factors trained for the other 30 %) and against a LoRA with the largest planted rank
everywhere, and runs `sora_proximal` over a lambda sweep; for each gate update:

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

The builders (`PLANTS`, `planted_problem`, `run_linen`, `run_truncated`, `run_nnx`) are imported by
tests/test_planted.py.
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
  trainable, loss, min_active = _train(problem, config, trainable, frozen, tx, steps)
  return _outcome(config, sora_jax.combine(trainable, frozen), loss, min_active)


def _train(problem: Problem, config, trainable, frozen, tx, steps: int):
  """(trainable after `steps` full-batch steps of `tx`, its loss, the fewest active ranks after any step)."""
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
      return (t, state), _active(t)

    (t, _), active = jax.lax.scan(step, (t, tx.init(t)), None, length=steps)
    return t, loss_fn(t), jnp.min(active, initial=_active(t))

  return train(trainable)


def _active(tree) -> jax.Array:
  """Active ranks over the modules: nonzero gates, or the rank of a pruned module (no gate; zero-size A at rank 0)."""
  counts = [
    jnp.sum(tree[m]["sora_gate"] != 0) if "sora_gate" in tree[m] else tree[m]["sora_a"].shape[-1]
    for m in MODULES
    if m in tree
  ]
  return sum(counts, jnp.zeros([], jnp.int32))


def _outcome(config, params, loss, min_active) -> Outcome:
  report = sora_jax.rank_report(params, config)
  ranks = {row.path: row.rank for row in report.rows}
  return Outcome(float(loss), int(report.retained_params), tuple(ranks.get(m, 0) for m in MODULES), int(min_active))


def uniform_budget(rank: int) -> int:
  """The adapter parameters of a uniform LoRA of `rank` on the six modules: rank * 6 * (WIDTH + WIDTH)."""
  return rank * len(MODULES) * 2 * WIDTH


def run_truncated(
  problem: Problem, budgets: Sequence[int], steps: int = STEPS, *, at: float = 1.0, rank: int = RANK_MAX, seed: int = 0
) -> list[Outcome]:
  """The truncation baseline, one outcome per budget: a LoRA at r_max `rank` (gates fixed at one) trained for
  `round(at * steps)` steps, cut to each budget by `sora_jax.truncate` (best rank-k_m approximation of every module,
  one global singular-value threshold), then its truncated factors trained for the remaining steps with a fresh AdamW
  (none when `at` = 1), so every outcome costs `steps` steps. The LoRA is trained once for all budgets."""
  config = _config(rank)
  first = round(at * steps)
  trainable, frozen = sora_jax.split(sora_jax.init(jax.random.key(seed + 1000), problem.base, config))
  trainable, _, min_active = _train(problem, config, trainable, frozen, optimizer("lora", first), first)
  lora = sora_jax.combine(trainable, frozen)
  out = []
  for budget in budgets:
    cut, _ = sora_jax.truncate(lora, config, budget)
    cut_trainable, cut_frozen = sora_jax.split(cut)
    rest = steps - first
    cut_trainable, loss, cut_active = _train(problem, config, cut_trainable, cut_frozen, optimizer("lora", rest), rest)
    out.append(
      _outcome(config, sora_jax.combine(cut_trainable, cut_frozen), loss, min(int(min_active), int(cut_active)))
    )
  return out


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


def study(
  seeds: Sequence[int],
  steps: int = STEPS,
  *,
  budgets: Sequence[int] = (1, 2, 4),
  plants: Sequence[str] = tuple(PLANTS),
  sweep: bool = True,
) -> str:
  """The study's markdown: per plant, equal-budget table (at the parameters of uniform LoRA r for r in `budgets`) and
  lambda sweep (loss relative to the base model's); `sweep=False` leaves the sweep out."""
  header = (
    "| method | loss / base loss (mean ± std) | retained params | "
    + " | ".join(MODULES)
    + " |\n"
    + "|---" * (3 + len(MODULES))
    + "|"
  )
  out = []
  for plant in (PLANTS[name] for name in plants):
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

    cuts = {
      at: [
        run_truncated(p, [uniform_budget(r) for r in budgets], steps, at=at, seed=s) for p, s in zip(problems, seeds)
      ]
      for at in (1.0, REFIT)
    }
    for i, r in enumerate(budgets):
      lines.append(_row(f"LoRA r={r}", runs(lambda: optimizer("lora", steps), rank=r), bases))
      for gate in ("gradient", "adam"):
        lines.append(
          _row(f"SoRA budget {r}/8, {gate}", runs(lambda: optimizer(gate, steps, target=r / RANK_MAX)), bases)
        )
      lines.append(_row(f"LoRA r_max 8 -> truncate to r={r} budget", [c[i] for c in cuts[1.0]], bases))
      lines.append(
        _row(f"LoRA r_max 8, truncate at 70 % + train 30 %, r={r} budget", [c[i] for c in cuts[REFIT]], bases)
      )
    lines.append(
      _row(f"LoRA r={planted_max} (planted max)", runs(lambda: optimizer("lora", steps), rank=planted_max), bases)
    )
    lines.append(_row(f"LoRA r={RANK_MAX} (r_max, before truncation)", runs(lambda: optimizer("lora", steps)), bases))
    if not sweep:
      out.append("\n".join(lines))
      continue
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
  parser.add_argument(
    "--budgets", type=int, nargs="+", default=[1, 2, 4], help="uniform LoRA ranks r whose budgets are compared"
  )
  parser.add_argument("--plants", nargs="+", choices=sorted(PLANTS), default=list(PLANTS))
  parser.add_argument("--no-sweep", action="store_true", help="leave the lambda sweep out (equal-budget tables only)")
  parser.add_argument("--out", default=None, help="also write the tables to this markdown file")
  args = parser.parse_args(argv)
  bad = [r for r in args.budgets if not 1 <= r <= RANK_MAX]
  if bad:
    parser.error(f"--budgets {bad}: each must be a uniform LoRA rank in 1..{RANK_MAX} (r_max)")
  started = time.time()
  text = study(args.seeds, args.steps, budgets=args.budgets, plants=args.plants, sweep=not args.no_sweep)
  flags = " ".join(
    [f"--seeds {' '.join(map(str, args.seeds))} --steps {args.steps}"]
    + ([f"--budgets {' '.join(map(str, args.budgets))}"] if args.budgets != [1, 2, 4] else [])
    + ([f"--plants {' '.join(args.plants)}"] if args.plants != list(PLANTS) else [])
    + (["--no-sweep"] if args.no_sweep else [])
  )
  stamp = (
    f"`python -m train.planted {flags}`, "
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
