"""`python -m train.pareto [config.yaml] [key=value ...] [--quick]`: SoRA against tuned baselines at equal budgets.

For the same number of retained adapter parameters, does a learned rank allocation beat the baselines a researcher
would use instead? At each budget b (a fraction of the adapter parameters at rank r_max; the default budgets 1/8 and
1/4 at r_max = 8 are the parameters of uniform LoRA r = 1 and r = 2) the study trains three arms on the trainer's task
(default: the built-in MiniLM-L6 + WordNet run; `configs/glue/rotten_tomatoes.yaml` for the second task):

  lora_r{b r_max}   plain LoRA at the budget's uniform rank
  sora_budget{b}    SoRA at r_max steered to the budget (adapter.target_fraction = b, budget mode)
  truncate{b}       LoRA at r_max trained the same steps, then cut by singular values to the budget
                    (`sora_jax.truncate`: each module's best rank-k approximation, one global threshold); no step
                    is trained after the cut, so the LoRA r_max runs give this arm for free
  trunc_train{b}    LoRA at r_max cut the same way at 70 % of the steps, its kept factors trained for the other 30 %
                    (`adapter.truncate_at=0.7`, `train.cut`): the strongest baseline on the planted problems

and the paper's own form: `sora_lambda` (SoRA at r_max with the trainer's sparse_lambda, no budget) against `lora_r
{r_max}`. Each arm picks its learning rate from `learning_rates` on the validation metric of the first seed (SoRA's
gate rate moves with it: optim.gate_learning_rate = `gate_rate_scale` x the rate); the other seeds run at the chosen
rate. A seed fixes the data order and the initialisation, the same for every arm, so arms are compared seed by seed:
the paired difference SoRA - baseline with its 95 % Student-t interval (`train.study_stats`). Reported for the final
step's parameters (no best-checkpoint selection, which would see the validation set once more). Output under
`output_dir` (default runs/pareto):

  runs/<method>_lr<rate>_seed<seed>/   each run's trainer output (results.json: a finished run, read back on a rerun;
                                       without it the run resumes from its checkpoint), printout (run.log) and, for
                                       LoRA r_max, truncated.json (the truncation arm's metrics)
  pareto.json   every run, the rows and the comparisons     pareto.md   the tables as markdown     pareto.png   the picture

Runs share one compiled training step per adapter shape (learning rates, lambda, budget and the dropout key enter the
step as arrays) through JAX's persistent compilation cache in `<output_dir>/jax_cache`.

  python -m train.pareto            # the full study: 8 trained methods x (3 learning rates + 4 more seeds) = 56 runs
  python -m train.pareto --quick    # one budget, one learning rate, two seeds, 100 steps: a few minutes
  python -m train.pareto configs/glue/rotten_tomatoes.yaml output_dir=runs/pareto_rotten_tomatoes
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Optional, Sequence

from train import cli, study_stats
from train.config_help import section_help_text
from train.jsonio import write_json
from train.settings import FINISHED_RUN_FREE, setting_changes
from train.config import (
  ConfigError,
  RunConfig,
  apply_overrides,
  check as check_ranges,
  load_with_section,
  setting,
  to_dict,
)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  seeds: tuple[int, ...] = setting(
    (0, 1, 2, 3, 4), "paired seeds; each arm's learning rate is chosen on the first", ">=0"
  )
  learning_rates: tuple[float, ...] = setting(
    (1e-3, 2e-3, 4e-3), "the sweep of optim.learning_rate, each arm choosing its own on the first seed", ">0"
  )
  gate_rate_scale: float = setting(
    25.0, "SoRA arms: optim.gate_learning_rate = this x the swept rate (0: keep optim.gate_learning_rate)", ">=0"
  )
  budgets: tuple[float, ...] = setting(
    (0.125, 0.25), "budgets as fractions of the adapter params at rank_max (each x rank_max is a LoRA rank)", "0..1"
  )
  rank_max: int = setting(8, "r_max of SoRA and of the LoRA that is truncated", ">0")
  truncate: bool = setting(True, "the truncation arm (LoRA r_max, then sora_jax.truncate to each budget)")
  truncate_train: bool = setting(True, "the truncate-then-train arm (LoRA r_max cut at truncate_at, then trained)")
  truncate_at: float = setting(0.7, "the truncate-then-train arm: fraction of the steps at the cut", "0..1")
  paper_form: bool = setting(True, "also SoRA at adapter.sparse_lambda (no budget) against LoRA r_max")


DEFAULT_OUTPUT_DIR = "runs/pareto"
# Each run trains 200 steps, evaluates once, at its end (validation and test), writes one checkpoint (resume after a
# kill), and no PEFT export; the tables report the final step's parameters for every arm. STUDY_RUN holds over a YAML
# file's values (the study's own protocol, the same on every task); key=value overrides still win.
RUN_DEFAULTS = {"output_dir": DEFAULT_OUTPUT_DIR}
STUDY_RUN = {
  "train.max_steps": 200,
  "train.eval_every": 10**9,
  "train.save_every": 100,
  "train.keep_checkpoints": 1,
  "train.final_params": "last",
  "train.progress": False,
  "export_peft": False,
}
# --quick: one budget, one learning rate, two seeds (a paired difference needs two), half the steps.
QUICK = {"seeds": (0, 1), "learning_rates": (2e-3,), "budgets": (0.125,)}
QUICK_RUN = {"data.max_eval_examples": 500}
QUICK_STEPS = 100


def load_configs(
  path: Optional[str] = None, overrides: Sequence[str] = (), quick: bool = False
) -> tuple[RunConfig, StudyConfig]:
  """Defaults (`--quick`'s on top), the YAML file (trainer sections plus a `study:` section), the study's run
  settings, then `key=value` overrides; keys of the study are `study.<name>` or the bare name, every other key goes
  to the trainer."""
  fixed = [
    f"{key}={value}" for key, value in dict(STUDY_RUN, **({"train.max_steps": QUICK_STEPS} if quick else {})).items()
  ]
  config, study = load_with_section(
    path,
    fixed + list(overrides),
    "study",
    StudyConfig,
    dict(RUN_DEFAULTS, **(QUICK_RUN if quick else {})),
    QUICK if quick else None,
  )
  if not study.seeds or not study.learning_rates:
    raise ConfigError("the study needs at least one seed and one learning rate")
  if len(set(study.seeds)) != len(study.seeds):
    raise ConfigError(f"study.seeds {list(study.seeds)} repeats a seed; give distinct seeds")
  for fraction in study.budgets:
    rank = fraction * study.rank_max
    if not 0 < fraction < 1 or abs(rank - round(rank)) > 1e-9:
      raise ConfigError(
        f"study.budgets: {fraction:g} x rank_max {study.rank_max} = {rank:g} is not a LoRA rank in 1..rank_max-1; "
        "give budgets k / rank_max"
      )
  return config, study


@dataclasses.dataclass(frozen=True)
class Method:
  """One trained method of the study: its name, its family (one line of the picture), its trainer overrides, and the
  budgets its final parameters are truncated to (the truncation arm)."""

  name: str
  family: str  # "lora", "sora budget" or "sora lambda"
  overrides: dict
  budget_fraction: Optional[float] = None
  truncate_to: tuple[float, ...] = ()


def methods(study: StudyConfig) -> list[Method]:
  """The trained methods: per budget uniform LoRA and SoRA's budget mode; LoRA r_max (truncated to every budget,
  and the paper form's baseline) and SoRA at its lambda."""
  lora = lambda r, **kw: Method(f"lora_r{r}", "lora", {"adapter.method": "lora", "adapter.rank": r}, **kw)  # noqa: E731
  out = []
  for fraction in study.budgets:
    out.append(lora(round(fraction * study.rank_max), budget_fraction=fraction))
    out.append(
      Method(
        f"sora_budget{fraction:g}",
        "sora budget",
        {"adapter.method": "sora", "adapter.rank": study.rank_max, "adapter.target_fraction": fraction},
        budget_fraction=fraction,
      )
    )
    if study.truncate_train:
      out.append(
        Method(
          f"trunc_train{fraction:g}",
          "truncate, then train",
          {
            "adapter.method": "lora",
            "adapter.rank": study.rank_max,
            "adapter.truncate_at": study.truncate_at,
            "adapter.truncate_fraction": fraction,
          },
          budget_fraction=fraction,
        )
      )
  if study.paper_form:
    out.append(Method("sora_lambda", "sora lambda", {"adapter.method": "sora", "adapter.rank": study.rank_max}))
  if study.truncate or study.paper_form:
    out.append(lora(study.rank_max, truncate_to=tuple(study.budgets) if study.truncate else ()))
  return out


def arm_names(study: StudyConfig) -> list[str]:
  """Every reported arm: the trained methods, and truncate{b} per budget."""
  names = [m.name for m in methods(study)]
  return names + ([f"truncate{b:g}" for b in study.budgets] if study.truncate else [])


def _run_dir(output_dir: str, method: Method, learning_rate: float, seed: int) -> str:
  return os.path.join(output_dir, "runs", f"{method.name}_lr{learning_rate:g}_seed{seed}")


def _read(path: str, required: bool = True) -> Optional[dict]:
  """The JSON object in `path`, None if there is none; a file that is not one is an error naming it (`required`) or
  treated as absent (a bookkeeping file, rewritten by the next run)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      value = json.load(f)
    if isinstance(value, dict):
      return value
  except (OSError, ValueError):
    pass
  if not required:
    return None
  raise ConfigError(f"{path} is not a JSON object (damaged?); delete it and rerun to train that run again")


def _run_config(config: RunConfig, study: StudyConfig, method: Method, rate: float, seed: int, directory: str):
  overrides = {**method.overrides, "optim.learning_rate": rate, "seed": seed, "output_dir": directory, "resume": True}
  if method.overrides["adapter.method"] == "sora" and study.gate_rate_scale > 0:
    overrides["optim.gate_learning_rate"] = study.gate_rate_scale * rate
  run_config = apply_overrides(config, overrides)
  check_ranges(run_config)
  return run_config


def _train(run_config: RunConfig, method: Method, directory: str) -> dict:
  """Trains one run (resuming from its checkpoint); the truncation arm's metrics go to truncated.json first."""
  from train import loop, truncation

  def truncate(experiment, outcome):
    if method.truncate_to:
      cut = truncation.evaluate_truncations(experiment, outcome.params, method.truncate_to)
      write_json(os.path.join(directory, "truncated.json"), cut)

  started = time.time()
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "run.log"), "a") as log, contextlib.redirect_stdout(log):
    results = loop.run(run_config, after_fit=truncate)  # its printout (rank report, metrics) goes to run.log
  if results is None:
    raise RuntimeError(f"run {directory} was aborted (train.abort_at_step); rerun to continue")
  write_json(os.path.join(directory, "study_run.json"), {"wall_time_s": time.time() - started})
  return results


def _run_one(
  config: RunConfig, study: StudyConfig, method: Method, rate: float, seed: int, output_dir: str
) -> list[dict]:
  """Runs (or reads back) one training run; returns its records: the method's, and one per truncation budget."""
  directory = _run_dir(output_dir, method, rate, seed)
  run_config = _run_config(config, study, method, rate, seed, directory)
  results = _read(os.path.join(directory, "results.json"))
  changed = "" if results is None else "; ".join(setting_changes(results["config"], run_config, free=FINISHED_RUN_FREE))
  if changed:
    raise ConfigError(
      f"{directory} holds a finished run with other settings ({changed}); use another output_dir or delete it"
    )
  truncated = _read(os.path.join(directory, "truncated.json"), required=False)
  if results is None or (method.truncate_to and (truncated is None or set(truncated) != _keys(method.truncate_to))):
    results = _train(run_config, method, directory)  # a finished run without the truncation arm resumes at its end
    truncated = _read(os.path.join(directory, "truncated.json"))
  wall = (_read(os.path.join(directory, "study_run.json"), required=False) or {}).get("wall_time_s")
  metrics = results["metrics"]
  base = {"learning_rate": rate, "seed": seed, "metric": _metric_name(metrics), "wall_time_s": wall}
  records = [
    dict(
      base,
      arm=method.name,
      family=method.family,
      budget_fraction=method.budget_fraction,
      retained_params=results.get("retained_params"),
      max_params=results.get("max_params"),
      validation=_main_metric(metrics, "validation"),
      test=_main_metric(metrics, "test"),
      cut_ranks=(results.get("budget") or {}).get("cut_ranks"),
      directory=directory,
    )
  ]
  for fraction in method.truncate_to:
    cut = truncated[f"{fraction:g}"]
    records.append(
      dict(
        base,
        arm=f"truncate{fraction:g}",
        family="truncate",
        budget_fraction=fraction,
        retained_params=cut["retained_params"],
        max_params=cut["max_params"],
        validation=_main_metric(cut["metrics"], "validation"),
        test=_main_metric(cut["metrics"], "test"),
        directory=directory,
      )
    )
  return records


def _keys(fractions: Sequence[float]) -> set:
  return {f"{f:g}" for f in fractions}


def _metric_name(metrics: dict) -> str:
  return next(iter(metrics)).split("/", 1)[1]


def _main_metric(metrics: dict, prefix: str) -> Optional[float]:
  """The first metric of the first split named `prefix...` (the task's main metric comes first)."""
  for key, value in metrics.items():
    if key.split("/", 1)[0].startswith(prefix):
      return value
  return None


def summarize(records: list[dict], study: StudyConfig) -> list[dict]:
  """One row per arm (`train.study_stats.arm_row`): the chosen learning rate and mean +- std over seeds at it."""
  rows = []
  for arm in arm_names(study):
    mine = [r for r in records if r["arm"] == arm]
    if mine:
      rows.append(study_stats.arm_row(arm, mine, study.seeds[0]))
  return rows


def _schedule(study: StudyConfig, records: list[dict]) -> list[tuple[Method, float]]:
  """(method, rate) pairs the later seeds need: each trained arm's chosen rate, and for each truncation arm LoRA
  r_max at the truncation arm's own chosen rate."""
  first = study.seeds[0]
  wanted = []
  for method in methods(study):
    arms = [method.name] + [f"truncate{b:g}" for b in method.truncate_to]
    for arm in arms:
      rate = study_stats.best_rate([r for r in records if r["arm"] == arm], first)
      if rate is not None and (method, rate) not in wanted:
        wanted.append((method, rate))
  return wanted


def run_study(config: RunConfig, study: StudyConfig) -> dict:
  """Runs (or resumes) every run, then writes pareto.json, pareto.md and pareto.png; returns the table."""
  import jax
  from tqdm.auto import tqdm

  output_dir = config.output_dir
  os.makedirs(output_dir, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(output_dir, "jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  started = time.time()
  plan = methods(study)
  first, rest = study.seeds[0], study.seeds[1:]
  records: list[dict] = []
  done: set = set()
  with tqdm(total=len(plan) * (len(study.learning_rates) + len(rest)), desc="pareto runs", dynamic_ncols=True) as bar:

    def step(method, rate, seed):
      if (method.name, rate, seed) in done:
        return
      bar.set_postfix_str(f"{method.name} lr={rate:g} seed={seed}")
      records.extend(_run_one(config, study, method, rate, seed, output_dir))
      done.add((method.name, rate, seed))
      bar.update(1)

    for method in plan:  # the sweep on the first seed
      for rate in study.learning_rates:
        step(method, rate, first)
    later = _schedule(study, records)
    bar.total = len(plan) * len(study.learning_rates) + len(later) * len(rest)
    for seed in rest:  # seed by seed, so that a partial study holds complete pairs
      for method, rate in later:
        step(method, rate, seed)
  return _write_outputs(config, study, records, time.time() - started)


def _write_outputs(config: RunConfig, study: StudyConfig, records: list[dict], this_call_s: float) -> dict:
  from train import plots

  output_dir = config.output_dir
  rows = summarize(records, study)
  compared = study_stats.comparisons(rows, study.budgets, study.rank_max)
  runs_wall = sum(r["wall_time_s"] or 0.0 for r in records if not r["arm"].startswith("truncate"))
  table = {
    "task": config.data.task,
    "model": config.model.name,
    "steps": config.train.max_steps,
    "study": dataclasses.asdict(study),
    "rows": rows,
    "comparisons": compared,
    "runs": records,
    "wall_time_s_this_call": this_call_s,
    "runs_wall_time_s": runs_wall,
    "config": to_dict(config),
  }
  write_json(os.path.join(output_dir, "pareto.json"), table)
  text = study_stats.markdown(rows, compared, study.rank_max)
  with open(os.path.join(output_dir, "pareto.md"), "w") as f:
    f.write(text)
  picture = plots.plot_pareto(
    rows,
    os.path.join(output_dir, "pareto.png"),
    title=f"{config.data.task}, {config.model.name}, {config.train.max_steps} steps, {len(study.seeds)} seed(s)",
  )
  print(text)
  for entry in compared:
    print(f"{entry['comparison']}: {entry['arm']} {entry['verdict']} against {entry['best_baseline']} (test)")
  print(f"runs' wall time {runs_wall / 60:.1f} min (this call {this_call_s / 60:.1f} min)")
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
