"""`python -m train.pareto [config.yaml] [key=value ...] [--quick]`: SoRA against LoRA at equal adapter budgets.

For the same number of retained adapter parameters, is a learned-rank adapter better than a plain LoRA of smaller rank?
The study trains, on the trainer's task (default: the built-in MiniLM-L6 + WordNet run):

  lora r=k       plain LoRA at each rank k of `lora_ranks`                     (k * (in + out) params per module)
  sora budget=b  SoRA at r_max = `rank_max` steered to each budget b of `budgets` (adapter.target_fraction = b; the
                 default budgets 1/8, 1/4, 1/2, 3/4 are the parameter counts of LoRA r = 1, 2, 4 at r_max = 8, and 6)
  sora lambda    SoRA at r_max with the trainer's lambda and no budget (the default run's recipe)

Every method gets the same learning-rate sweep (`learning_rates`, the A/B/head rate; SoRA's gate rate stays
`optim.gate_learning_rate`) and the same steps. The learning rate is chosen per method on the validation metric of the
first seed only; the other seeds run at that rate. Reported: retained adapter parameters, validation and test metric,
mean and standard deviation over seeds, for the final step's parameters (no best-checkpoint selection, which would see
the validation set once more). Output under `output_dir` (default runs/pareto):

  runs/<method>_lr<rate>_seed<seed>/   each run's trainer output (results.json: a finished run, skipped on a rerun;
                                       without it the run resumes from its checkpoint) and printout (run.log)
  pareto.json   every run and the table        pareto.md   the table as markdown        pareto.png   the picture

Runs share one compiled training step per adapter shape (learning rates, lambda, budget and the dropout key enter the
step as arrays) through JAX's persistent compilation cache in `<output_dir>/jax_cache`.

  python -m train.pareto            # the full study: 9 methods x (2 learning rates + 2 more seeds) = 36 runs
  python -m train.pareto --quick    # 5 methods, 1 seed, 1 learning rate, 100 steps: a few minutes
  python -m train.pareto learning_rates=[1e-3] seeds=[0] lora_ranks=[2,8] budgets=[0.25]
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from train import cli
from train.config import (
  ConfigError,
  RunConfig,
  apply_overrides,
  check as check_ranges,
  load_with_section,
  section_help_text,
  setting,
  to_dict,
)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  seeds: tuple[int, ...] = setting((0, 1, 2), "seeds; each method's learning rate is chosen on the first", ">=0")
  learning_rates: tuple[float, ...] = setting(
    (1e-3, 2e-3), "the sweep of optim.learning_rate, the same for every method", ">0"
  )
  lora_ranks: tuple[int, ...] = setting((1, 2, 4, 8), "LoRA ranks", ">0")
  budgets: tuple[float, ...] = setting(
    (0.125, 0.25, 0.5, 0.75), "SoRA budgets (adapter.target_fraction at rank_max)", "0..1"
  )
  rank_max: int = setting(8, "SoRA's r_max", ">0")
  default_lambda: bool = setting(True, "also SoRA at adapter.sparse_lambda without a budget")


DEFAULT_OUTPUT_DIR = "runs/pareto"
# Each run evaluates once, at its end (validation and test), writes one checkpoint (resume after a kill), and no PEFT
# export; the table reports the final step's parameters for every method.
RUN_DEFAULTS = {
  "output_dir": DEFAULT_OUTPUT_DIR,
  "train.max_steps": 300,
  "train.eval_every": 10**9,
  "train.save_every": 100,
  "train.keep_checkpoints": 1,
  "train.final_params": "last",
  "train.progress": False,
  "export_peft": False,
}
# --quick: the same methods at fewer points, one seed and one learning rate, a third of the steps.
QUICK = {"seeds": (0,), "learning_rates": (2e-3,), "lora_ranks": (1, 8), "budgets": (0.125, 0.5)}
QUICK_RUN = {"train.max_steps": 100, "data.max_eval_examples": 500}


def load_configs(
  path: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False
) -> tuple[RunConfig, StudyConfig]:
  """Defaults (`--quick`'s on top), the YAML file (trainer sections plus a `study:` section), then `key=value`
  overrides; keys of the study are `study.<name>` or the bare name, every other key goes to the trainer."""
  config, study = load_with_section(
    path, overrides, "study", StudyConfig, dict(RUN_DEFAULTS, **(QUICK_RUN if quick else {})), QUICK if quick else None
  )
  if not study.seeds or not study.learning_rates:
    raise ConfigError("the study needs at least one seed and one learning rate")
  if any(b == 0 for b in study.budgets):
    raise ConfigError("a budget of 0 keeps no adapter; give budgets in (0, 1]")
  return config, study


@dataclasses.dataclass(frozen=True)
class Method:
  """One method of the study: its name, its family (one line of the picture) and its trainer overrides."""

  name: str
  family: str  # "lora", "sora budget" or "sora lambda": one line (or point) of the picture per family
  overrides: dict


def methods(study: StudyConfig) -> list[Method]:
  out = [Method(f"lora_r{r}", "lora", {"adapter.method": "lora", "adapter.rank": r}) for r in study.lora_ranks]
  out += [
    Method(
      f"sora_budget{b:g}",
      "sora budget",
      {"adapter.method": "sora", "adapter.rank": study.rank_max, "adapter.target_fraction": b},
    )
    for b in study.budgets
  ]
  if study.default_lambda:
    out.append(Method("sora_lambda", "sora lambda", {"adapter.method": "sora", "adapter.rank": study.rank_max}))
  return out


def _run_dir(output_dir: str, method: Method, learning_rate: float, seed: int) -> str:
  return os.path.join(output_dir, "runs", f"{method.name}_lr{learning_rate:g}_seed{seed}")


def _read(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _run_one(config: RunConfig, method: Method, learning_rate: float, seed: int, output_dir: str) -> dict:
  """Runs (or reads back) one training run; returns its record for the table."""
  from train import loop

  directory = _run_dir(output_dir, method, learning_rate, seed)
  results = _read(os.path.join(directory, "results.json"))
  record_path = os.path.join(directory, "study_run.json")
  run_config = apply_overrides(
    config,
    {**method.overrides, "optim.learning_rate": learning_rate, "seed": seed, "output_dir": directory, "resume": True},
  )
  check_ranges(run_config)
  changed = "" if results is None else _differs(results["config"], to_dict(run_config))
  if changed:
    raise ConfigError(
      f"{directory} holds a finished run with other settings ({changed}); use another output_dir or delete it"
    )
  if results is None:
    started = time.time()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "run.log"), "a") as log, contextlib.redirect_stdout(log):
      results = loop.run(run_config)  # its printout (rank report, metrics) goes to run.log
    if results is None:
      raise RuntimeError(f"run {directory} was aborted (train.abort_at_step); rerun to continue")
    with open(record_path, "w") as f:
      json.dump({"wall_time_s": time.time() - started}, f)
  wall = (_read(record_path) or {}).get("wall_time_s")
  metrics = results["metrics"]
  return {
    "method": method.name,
    "family": method.family,
    "learning_rate": learning_rate,
    "seed": seed,
    "retained_params": results.get("retained_params"),
    "max_params": results.get("max_params"),
    "validation": _main_metric(metrics, "validation"),
    "test": _main_metric(metrics, "test"),
    "metric": _metric_name(metrics),
    "budget": results.get("budget"),
    "wall_time_s": wall,
    "directory": directory,
  }


def _differs(done: dict, wanted: dict) -> str:
  """The first training setting in which a finished run's config differs from the one asked for ('' if none)."""
  for section in ("model", "data", "adapter", "optim", "train"):
    for key, value in wanted[section].items():
      if key in ("progress", "abort_at_step"):
        continue
      old = done.get(section, {}).get(key)
      if (list(old) if isinstance(old, tuple) else old) != (list(value) if isinstance(value, tuple) else value):
        return f"{section}.{key}: {old!r}, now {value!r}"
  return "seed" if done.get("seed") != wanted["seed"] else ""


def _metric_name(metrics: dict) -> str:
  return next(iter(metrics)).split("/", 1)[1]


def _main_metric(metrics: dict, prefix: str) -> Optional[float]:
  """The first metric of the first split named `prefix...` (the task's main metric comes first)."""
  for key, value in metrics.items():
    if key.split("/", 1)[0].startswith(prefix):
      return value
  return None


def _mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(records: list[dict], study: StudyConfig) -> list[dict]:
  """One row per method: the chosen learning rate and mean +- std over seeds at it."""
  rows = []
  first = study.seeds[0]
  for method in dict.fromkeys(r["method"] for r in records):
    sweep = [r for r in records if r["method"] == method and r["seed"] == first]
    best = max(sweep, key=lambda r: -np.inf if r["validation"] is None else r["validation"])
    chosen = [r for r in records if r["method"] == method and r["learning_rate"] == best["learning_rate"]]
    row = {
      "method": method,
      "family": best["family"],
      "learning_rate": best["learning_rate"],
      "seeds": [r["seed"] for r in chosen],
      "metric": best["metric"],
      "sweep": {f"{r['learning_rate']:g}": r["validation"] for r in sweep},
    }
    for key in ("retained_params", "validation", "test"):
      row[key], row[key + "_std"] = _mean_std([r[key] for r in chosen])
    row["max_params"] = best["max_params"]
    row["cut_ranks"] = [r["budget"]["cut_ranks"] for r in chosen if r.get("budget")]
    rows.append(row)
  return rows


def markdown_table(rows: list[dict], rank_max: int) -> str:
  """The table as markdown: method, retained params (% of r_max), chosen lr, validation and test mean +- std."""
  metric = rows[0]["metric"] if rows else "metric"
  lines = [
    f"| method | retained adapter params (% of r={rank_max}) | learning rate | validation {metric} | "
    f"test {metric} | seeds |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  fmt = lambda m, s: "-" if m is None else f"{m:.4f} ± {s:.4f}"  # noqa: E731
  for row in rows:
    share = "" if not row["max_params"] else f" ({100 * row['retained_params'] / _full(row, rank_max):.1f} %)"
    lines.append(
      f"| {row['method']} | {row['retained_params']:.0f}{share} | {row['learning_rate']:g} | "
      f"{fmt(row['validation'], row['validation_std'])} | {fmt(row['test'], row['test_std'])} | "
      f"{len(row['seeds'])} |"
    )
  return "\n".join(lines) + "\n"


def _full(row: dict, rank_max: int) -> float:
  """Adapter parameters at rank r_max for this model (a LoRA row's max_params is at its own rank)."""
  if row["family"] == "lora":
    rank = int(row["method"].removeprefix("lora_r"))
    return row["max_params"] * rank_max / rank
  return row["max_params"]


def run_study(config: RunConfig, study: StudyConfig) -> dict:
  """Runs (or resumes) every run, then writes pareto.json, pareto.md and pareto.png; returns the table."""
  import jax
  from tqdm.auto import tqdm
  from train import plots

  output_dir = config.output_dir
  os.makedirs(output_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(output_dir, "jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  started = time.time()
  plan = methods(study)
  first, rest = study.seeds[0], study.seeds[1:]
  total = len(plan) * (len(study.learning_rates) + len(rest))
  records = []
  with tqdm(total=total, desc="pareto runs", dynamic_ncols=True) as bar:

    def step(method, rate, seed):
      bar.set_postfix_str(f"{method.name} lr={rate:g} seed={seed}")
      records.append(_run_one(config, method, rate, seed, output_dir))
      bar.update(1)

    for method in plan:  # the sweep on the first seed
      for rate in study.learning_rates:
        step(method, rate, first)
    for method in plan:  # the other seeds at each method's chosen rate
      sweep = [r for r in records if r["method"] == method.name]
      rate = max(sweep, key=lambda r: -np.inf if r["validation"] is None else r["validation"])["learning_rate"]
      for seed in rest:
        step(method, rate, seed)
  rows = summarize(records, study)
  runs_wall = sum(r["wall_time_s"] or 0.0 for r in records)
  table = {
    "task": config.data.task,
    "model": config.model.name,
    "steps": config.train.max_steps,
    "study": dataclasses.asdict(study),
    "rows": rows,
    "runs": records,
    "wall_time_s_this_call": time.time() - started,
    "runs_wall_time_s": runs_wall,
    "config": to_dict(config),
  }
  with open(os.path.join(output_dir, "pareto.json"), "w") as f:
    json.dump(table, f, indent=2, default=str)
  markdown = markdown_table(rows, study.rank_max)
  with open(os.path.join(output_dir, "pareto.md"), "w") as f:
    f.write(markdown)
  picture = plots.plot_pareto(
    rows,
    os.path.join(output_dir, "pareto.png"),
    title=f"{config.data.task}, {config.model.name}, {config.train.max_steps} steps, {len(study.seeds)} seed(s)",
  )
  print(markdown)
  print(f"runs' wall time {runs_wall / 60:.1f} min (this call {table['wall_time_s_this_call'] / 60:.1f} min)")
  for path in ("pareto.json", "pareto.md"):
    print(f"wrote {os.path.join(output_dir, path)}")
  print(f"wrote {picture}")
  return table


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.main(
    argv,
    doc=__doc__,
    flags=("--quick",),
    run=run_study,
    load=lambda path, overrides, flags: load_configs(path, overrides, quick="--quick" in flags),
    help_text=lambda: section_help_text("study", StudyConfig, RUN_DEFAULTS, "the study"),
  )


if __name__ == "__main__":
  sys.exit(main())
