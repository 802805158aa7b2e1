"""`python -m train.sparsify [config.yaml] [key=value ...]`: SoRA's sparsifying scheduler as a staged run.

The official code (`run_glue.py` with `--lambda_schedule`) trains once at the first threshold xi_0, then runs one stage
per further value of a lambda list (`sora_jax.lambda_stages`: linear / log_linear / exp_linear from `start` to
`max_lambda` in `lambda_num` values), each continuing from the previous stage's parameters. After every stage it
evaluates a 1000-example subset of the training set (memorization) and the validation set (generalization), each also
as a percentage of the same metric of the first stage, and logs the retained parameters. We do the same:

  stage 0      `train.epochs` / `train.max_steps` of normal training at lambda_0 (the trainer's `fit`).
  stage k > 0  continues from stage k-1's trainable params (adapters, head) at lambda_k, for `stage_steps` steps
               (or `stage_epochs` epochs; the official code uses 15 epochs), as set by `stage_schedule`:
    fresh      (default) each stage is a full training phase: its own warmup + linear-decay learning rate and fresh
               AdamW moments. The remaining ranks can adapt to the ones switched off, so the curve shows what a model
               of that size can still fit, which is the question the experiment asks.
    official   what the official code does: it hands the stage-0 optimizers, whose linear schedules have already
               decayed to zero, to every later stage, so AdamW moves nothing and only the threshold acts. With an
               update of zero each step is g <- S_lambda(g), so a stage of n steps is computed exactly as n
               applications of `sora_proximal(lambda_k)` to zero updates (no forward or backward pass). This needs
               the official gate update and unscaled threshold (`adapter.gate_update=adam
               adapter.lambda_scaled_by_lr=false`, lambdas as the official ones, e.g. max_lambda=0.015): with
               tau = lr * lambda a decayed learning rate would threshold nothing.
  Reference    memorization and generalization are percentages of stage 0's metric on the same data (the official
               BEST_TRAIN_METRIC / BEST_EVAL_METRIC), i.e. of the model trained before any sparsifying stage; with
               start = 0 that is the dense SoRA model (gates trained, nothing thresholded).
  Monotone     at each stage boundary the rank-one parts of every gate that is exactly zero are cut (their column of
               A and row of B set to zero; the function is unchanged since the gate is zero). A cut rank then has a
               zero gradient in A, B and gate, fresh AdamW moments stay zero, and its update is exactly zero, so a
               switched-off rank stays off and the retained parameters never increase across stages.

Output (under `output_dir`, default runs/sparsify): `stages/stage_<k>/` with the trainer's logs and checkpoints, the
stage's final trainable params as an orbax checkpoint (`params/`) and its record (`stage.json`, written last: a stage
with it is complete and is skipped on a rerun, refused if its settings differ; a stage without it resumes from its
latest trainer checkpoint);
`stages.json` (the table), `memorization_generalization.png`, `rank_heatmap.png` and `rank_over_steps.png`.

  python -m train.sparsify                                   # built-in default: MiniLM-L6 + WordNet, offline
  python -m train.sparsify configs/sparsify/wordnet.yaml lambda_num=5
  # the official gate update, thresholds and stage schedule:
  python -m train.sparsify adapter.gate_update=adam adapter.lambda_scaled_by_lr=false optim.gate_learning_rate=null
      max_lambda=0.015 stage_schedule=official
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from train import cli
from train.config import RunConfig, load_with_section, setting, to_dict
from train.config_help import section_help_text
from train.jsonio import read_json, write_json
from train.settings import setting_changes

STAGE_SCHEDULES = ("fresh", "official")
MEMORIZATION_SPLIT = "train_memorization"


@dataclasses.dataclass(frozen=True)
class SparsifyConfig:
  shape: str = setting("linear", "official lambda_schedule: linear, log_linear or exp_linear")
  start: float = setting(0.0, "lambda_0 (official sparse_lambda_2); stage 0 trains at it; exp_linear needs > 0", ">=0")
  max_lambda: float = setting(1.5, "the last lambda (units of adapter.sparse_lambda)", ">=0")
  lambda_num: int = setting(4, "number of stages, stage 0 included", ">0")
  stage_schedule: str = setting("fresh", "fresh or official (see the module docstring)")
  stage_steps: int = setting(20, "optimizer steps of each stage k > 0", ">0")
  stage_epochs: Optional[float] = setting(
    None, "when set, stages k > 0 last this many epochs instead (official: 15)", ">0"
  )
  memorization_examples: int = setting(500, "training subset evaluated for memorization (official: 1000)", ">0")
  memorization_seed: int = setting(42, "its shuffle seed (official: 42, as datasets' shuffle)")
  evaluate_test: bool = setting(False, "also evaluate the test split(s) after each stage (official: do_predict)")


DEFAULT_OUTPUT_DIR = "runs/sparsify"
# The built-in staged run: the trainer's built-in model and data (MiniLM-L6 + WordNet), sized so that four trainings
# fit in minutes on two CPU cores. gate_init "normal" is the official code's init: gates of spread magnitude reach zero
# one by one under a growing threshold, where gates that all start at one would fall together. Trainer evaluation only
# at a stage's end (the stage evaluation follows it). A YAML file or key=value overrides any of these.
# The gates take the trainer's update (the proximal-gradient step, `adapter.gate_update=gradient`), so the stage
# lambdas are in the units of `adapter.sparse_lambda` (relative to the gate-gradient RMS). The official update and
# thresholds: `adapter.gate_update=adam adapter.lambda_scaled_by_lr=false optim.gate_learning_rate=null
# max_lambda=0.015` (configs/sparsify/rte_official.yaml).
RUN_DEFAULTS = {
  "output_dir": DEFAULT_OUTPUT_DIR,
  "adapter.gate_init": "normal",
  "train.max_steps": 60,
  "train.eval_every": 10**9,
  "data.max_eval_examples": 500,
}


def load_configs(path: Optional[str] = None, overrides: Sequence[str] = ()) -> tuple[RunConfig, SparsifyConfig]:
  """Defaults, then the YAML file (trainer sections plus a `sparsify:` section), then `key=value` overrides.

  Keys of the sparsify section are `sparsify.<name>` or the bare name; every other key goes to the trainer config.
  """
  return load_with_section(path, overrides, "sparsify", SparsifyConfig, RUN_DEFAULTS)


def stage_lambdas(sparsify: SparsifyConfig) -> np.ndarray:
  from sora_jax.schedules import lambda_stages

  return lambda_stages(sparsify.shape, sparsify.start, sparsify.max_lambda, sparsify.lambda_num)


def check(config: RunConfig, sparsify: SparsifyConfig) -> None:
  if config.adapter.method != "sora":
    raise ValueError(
      f"the staged run sparsifies SoRA gates: adapter.method must be 'sora', got {config.adapter.method!r}"
    )
  if config.adapter.target_fraction is not None or config.adapter.target_params is not None:
    raise ValueError(
      "the staged run sets lambda stage by stage; a parameter budget (adapter.target_fraction / "
      "target_params) is for python -m train.glue: drop it here"
    )
  if sparsify.stage_schedule not in STAGE_SCHEDULES:
    raise ValueError(f"stage_schedule must be one of {STAGE_SCHEDULES}, got {sparsify.stage_schedule!r}")
  if sparsify.stage_schedule == "official" and config.adapter.gate_update != "adam":
    raise ValueError(
      "stage_schedule=official replays the official optimizer, whose gates take AdamW's step: set "
      "adapter.gate_update=adam adapter.lambda_scaled_by_lr=false optim.gate_learning_rate=null and the official "
      "stage lambdas (e.g. max_lambda=0.015)"
    )
  if sparsify.stage_schedule == "official" and config.adapter.lambda_scaled_by_lr:
    raise ValueError(
      "stage_schedule=official runs later stages at a learning rate of zero, where a threshold "
      "scaled by the learning rate is zero: set adapter.lambda_scaled_by_lr=false"
    )
  if sparsify.stage_steps < 1 or (sparsify.stage_epochs is not None and sparsify.stage_epochs <= 0):
    raise ValueError("stage_steps and stage_epochs must be positive")
  if sparsify.memorization_examples < 1:
    raise ValueError("memorization_examples must be >= 1")
  stage_lambdas(sparsify)  # shape errors early


# ----------------------------------------------------------------------------------------------------------------
# parameter surgery between stages


def cut_dead_ranks(trainable):
  """Zeroes the column of A and the row of B of every gate entry that is exactly 0 (function unchanged).

  a: (*lead, *in, rank), gate: (*lead, rank), b: (*lead, rank, *out). With A_i = B_i = g_i = 0 every gradient of
  rank i is zero, so with fresh AdamW moments the rank gets a zero update and stays off.
  """
  import jax.numpy as jnp
  from flax import traverse_util
  from sora_jax.adapters import A, B, gate_mask

  flat = dict(traverse_util.flatten_dict(trainable))
  for path in [p for p, is_gate in traverse_util.flatten_dict(gate_mask(trainable)).items() if is_gate]:
    module, gate = path[:-1], flat[path]
    alive = gate != 0
    lead = gate.ndim - 1
    a, b = flat[module + (A,)], flat[module + (B,)]
    n_in, n_out = a.ndim - gate.ndim, b.ndim - gate.ndim
    a_mask = alive.reshape(alive.shape[:lead] + (1,) * n_in + alive.shape[lead:])
    b_mask = alive.reshape(alive.shape + (1,) * n_out)
    flat[module + (A,)] = jnp.where(a_mask, a, jnp.zeros_like(a))
    flat[module + (B,)] = jnp.where(b_mask, b, jnp.zeros_like(b))
  return traverse_util.unflatten_dict(flat)


def threshold_only(trainable, lam: float, steps: int):
  """The official later stage: `steps` optimizer steps whose AdamW update is zero (learning rate decayed to 0),
  so only `sora_proximal(lam)` acts: g <- S_lam(g) per step (S_{steps * lam}(g) in total)."""
  import jax
  import jax.numpy as jnp
  from sora_jax.optim import sora_proximal

  tx = sora_proximal(lam)  # tau = lam, unscaled: the official SparseAdamW

  @jax.jit
  def run(params):
    def body(_, carry):
      params, state = carry
      zero = jax.tree.map(jnp.zeros_like, params)
      updates, state = tx.update(zero, state, params)
      return jax.tree.map(jnp.add, params, updates), state

    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

  return run(trainable)


# ----------------------------------------------------------------------------------------------------------------
# evaluation and records


def add_memorization_split(experiment, examples: int, seed: int) -> int:
  """Adds `train_memorization`: `examples` training examples drawn as datasets' `shuffle(seed).select(range(n))`."""
  from train.data import Encoded

  train = experiment.splits["train"]
  idx = np.random.default_rng(seed).permutation(len(train))[: min(examples, len(train))]
  experiment.splits[MEMORIZATION_SPLIT] = Encoded(
    train.input_ids[idx], train.attention_mask[idx], train.token_type_ids[idx], train.labels[idx]
  )
  return len(idx)


def _percent(value: float, reference: Optional[float]) -> Optional[float]:
  if reference is None or reference == 0 or value is None:
    return None
  return 100.0 * value / reference


def _save_params(directory: str, params) -> None:
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), params, force=True)
  checkpointer.wait_until_finished()
  checkpointer.close()


def _restore_params(directory: str, like):
  import jax
  import orbax.checkpoint as ocp

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
  checkpointer = ocp.StandardCheckpointer()
  restored = checkpointer.restore(os.path.abspath(directory), abstract)
  checkpointer.close()
  return restored


def _host(tree):
  """Host numpy copy of a tree whose leaves may be sharded across hosts."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _write_json(path: str, value) -> None:
  """`train.jsonio.write_json` on process 0 (atomic: a reader sees the old file or the new one)."""
  import jax

  if jax.process_index() == 0:
    write_json(path, value)


def _stage_dir(output_dir: str, k: int) -> str:
  return os.path.join(output_dir, "stages", f"stage_{k:02d}")


# ----------------------------------------------------------------------------------------------------------------
# the staged run


def _reuse_stage(stage_dir: str, stage: dict, config: RunConfig, like) -> tuple[object, dict]:
  """A finished stage's (params, record), after checking that it ran with `stage`'s lambda, steps and schedule and
  the same settings (`train.settings.setting_changes`), and that its params match their checksum."""
  from train.checkpoint import fingerprint

  try:
    record = read_json(os.path.join(stage_dir, "stage.json"))
    record["lambda"], record["steps"], record["schedule"]
  except (ValueError, KeyError, TypeError) as e:  # cut short, edited, or not a record
    raise ValueError(
      f"{stage_dir}/stage.json cannot be read ({type(e).__name__}): delete {stage_dir} to run the stage again"
    ) from None
  lam, steps, schedule = stage["lambda"], stage["steps"], stage["schedule"]
  if (
    not math.isclose(record["lambda"], lam, rel_tol=1e-9, abs_tol=1e-15)
    or record["steps"] != steps
    or record["schedule"] != schedule
  ):
    raise ValueError(
      f"{stage_dir} was run with lambda={record['lambda']}, steps={record['steps']}, "
      f"schedule={record['schedule']}, not lambda={lam}, steps={steps}, "
      f"schedule={schedule}: use another output_dir or delete it"
    )
  changed = setting_changes(record["config"], config) if "config" in record else []
  if changed:
    raise ValueError(
      f"{stage_dir} was run with other settings ({'; '.join(changed)}): use another output_dir or delete it"
    )
  try:
    params = _restore_params(os.path.join(stage_dir, "params"), like)
  except Exception as e:  # orbax/tensorstore raise many types for a damaged or missing file
    raise ValueError(
      f"{stage_dir}/params cannot be read ({type(e).__name__}): delete {stage_dir} to run the stage again"
    ) from None
  saved = record.get("params_checksum")  # stages written before their params were checksummed have none
  if saved is not None and fingerprint(params)[0] != saved:
    raise ValueError(
      f"{stage_dir}/params differ from the checksum saved in its stage.json (damaged data): delete {stage_dir} "
      "to run the stage again"
    )
  return params, record


def _evaluation(experiment, sparsify: SparsifyConfig, splits) -> dict:
  """Every setting that decides what a stage record's numbers mean, beside the run config's keys."""
  return {
    "memorization_examples": len(experiment.splits[MEMORIZATION_SPLIT].labels),
    "memorization_seed": sparsify.memorization_seed,
    "evaluate_test": sparsify.evaluate_test,
    "splits": list(splits),
  }


def _stage_results(experiment, params, splits) -> dict:
  """A stage's numbers: retained parameters, per-module ranks and the metrics on `splits`."""
  from sora_jax import adapters
  from train import loop

  full = adapters.combine(params, experiment.frozen)
  results = loop.evaluate(experiment, full, splits)
  report = adapters.rank_report(_host(full), experiment.sora)
  main, eval_split = experiment.spec.main_metric, experiment.eval_splits[0]
  return {
    "retained_params": report.retained_params,
    "max_params": report.max_params,
    "fraction": report.fraction,
    "ranks": {(r.path if r.layer is None else f"{r.path}[{r.layer}]"): r.rank for r in report.rows},
    "train_metric": results[f"{MEMORIZATION_SPLIT}/{main}"],
    "eval_metric": results[f"{eval_split}/{main}"],
    "metrics": results,
  }


def _evaluated(experiment, record: dict, params, splits, evaluation: dict, stage_dir: str) -> dict:
  """A finished stage's record whose numbers were made under `evaluation`: as it is, or evaluated again (and
  rewritten) when they were made with other evaluation settings; never the old numbers under new labels."""
  if record.get("evaluation") == evaluation:
    print(f"stage {record['stage']}: done before (lambda={record['lambda']:.4g}), skipped")
    return record
  print(
    f"stage {record['stage']}: done before, evaluated with other settings ({record.get('evaluation')}); "
    "evaluating it again"
  )
  record = {**record, **_stage_results(experiment, params, splits), "evaluation": evaluation}
  _write_json(os.path.join(stage_dir, "stage.json"), record)
  return record


def _run_stage(experiment, sparsify: SparsifyConfig, stage: dict, params, stage_dir: str, splits) -> Optional[tuple]:
  """Trains (or thresholds) one stage from `params` and writes its params and record; (params, record), or None
  when the run was aborted (`train.abort_at_step`)."""
  from train import loop
  from train.checkpoint import fingerprint

  started, k, lam, steps = time.time(), stage["stage"], stage["lambda"], stage["steps"]
  if k > 0:
    params = cut_dead_ranks(params)
  if k == 0 or sparsify.stage_schedule == "fresh":
    outcome = loop.fit(
      experiment, output_dir=stage_dir, trainable=params, sparse_lambda=lam, resume=True, total_steps=steps
    )
    if outcome.aborted:
      print(f"stage {k} aborted after step {outcome.step} (train.abort_at_step); rerun to continue")
      return None
    params = outcome.params
  else:
    params = threshold_only(params, lam, steps)
  record = {
    **stage,
    **_stage_results(experiment, params, splits),
    "wall_time_s": time.time() - started,
    "config": to_dict(experiment.config),
    "evaluation": _evaluation(experiment, sparsify, splits),
    "params_checksum": fingerprint(params)[0],
  }
  _save_params(os.path.join(stage_dir, "params"), params)
  _write_json(os.path.join(stage_dir, "stage.json"), record)  # last: marks the stage complete
  return params, record


def _stage_table(experiment, sparsify: SparsifyConfig, lambdas, stages: list, n_memorize: int, started: float) -> dict:
  """stages.json: the stages with memorization and generalization as percentages of stage 0's metrics."""
  main, eval_split = experiment.spec.main_metric, experiment.eval_splits[0]
  reference = {
    "source": "stage 0",
    "metric": main,
    "memorization_split": f"{n_memorize} training examples",
    "generalization_split": eval_split,
    "train_metric": stages[0]["train_metric"],
    "eval_metric": stages[0]["eval_metric"],
  }
  for record in stages:
    record["memorization"] = _percent(record["train_metric"], reference["train_metric"])
    record["generalization"] = _percent(record["eval_metric"], reference["eval_metric"])
  retained = [s["retained_params"] for s in stages]
  return {
    "task": experiment.spec.name,
    "model": experiment.config.model.name,
    "lambdas": [float(x) for x in lambdas],
    "sparsify": dataclasses.asdict(sparsify),
    "rank_max": experiment.sora.rank,
    "max_params": stages[0]["max_params"],
    "reference": reference,
    "retained_non_increasing": all(b <= a for a, b in zip(retained, retained[1:])),
    "wall_time_s": time.time() - started,
    "stages_wall_time_s": sum(s["wall_time_s"] for s in stages),
    "stages": stages,
    "config": to_dict(experiment.config),
  }


def run_stages(config: RunConfig, sparsify: SparsifyConfig) -> Optional[dict]:
  """Runs (or resumes) every stage and writes the table and pictures; returns the table, None when aborted."""
  import jax
  from train import loop, plots, rundir

  check(config, sparsify)
  lambdas = stage_lambdas(sparsify)
  output_dir = config.output_dir
  os.makedirs(output_dir, exist_ok=True)
  rundir.claim(output_dir, resume=True, overwrite=False)  # the lock only (stages resume by design); freed at exit
  started = time.time()
  experiment = loop.build(config)
  n_memorize = add_memorization_split(experiment, sparsify.memorization_examples, sparsify.memorization_seed)
  stage0_steps = experiment.total_steps
  later_steps = (
    sparsify.stage_steps
    if sparsify.stage_epochs is None
    else max(1, math.ceil(sparsify.stage_epochs * experiment.batches.steps_per_epoch))
  )
  splits = (MEMORIZATION_SPLIT,) + experiment.eval_splits + (experiment.test_splits if sparsify.evaluate_test else ())

  params, stages = experiment.trainable, []
  for k, lam in enumerate(lambdas):
    stage = {
      "stage": k,
      "lambda": float(lam),
      "steps": stage0_steps if k == 0 else later_steps,
      "schedule": "initial" if k == 0 else sparsify.stage_schedule,
    }
    stage_dir = _stage_dir(output_dir, k)
    if os.path.exists(os.path.join(stage_dir, "stage.json")):
      params, record = _reuse_stage(stage_dir, stage, config, experiment.trainable)
      record = _evaluated(experiment, record, params, splits, _evaluation(experiment, sparsify, splits), stage_dir)
    else:
      done = _run_stage(experiment, sparsify, stage, params, stage_dir, splits)
      if done is None:
        return None
      params, record = done
    stages.append(record)

  table = _stage_table(experiment, sparsify, lambdas, stages, n_memorize, started)
  _write_json(os.path.join(output_dir, "stages.json"), table)
  if jax.process_index() != 0:
    return table
  pictures = plots.plot_stage_table(table, output_dir)
  print_table(table)
  for path in [os.path.join(output_dir, "stages.json")] + pictures:
    print(f"wrote {path}")
  if not table["retained_non_increasing"]:
    print(f"WARNING: retained parameters increased across stages: {[s['retained_params'] for s in stages]}")
  return table


def print_table(table: dict) -> None:
  """The stage table and the per-module ranks, with rich."""
  from rich.console import Console
  from rich.table import Table

  from train.plots import module_order, split_module

  ref = table["reference"]
  summary = Table(
    title=f"sparsifying stages: {table['task']}, {table['model']}",
    caption=f"mem. = {ref['metric']} on {ref['memorization_split']}, gen. = on "
    f"{ref['generalization_split']}; % = of {ref['source']}",
  )
  for name in ("stage", "lambda", "steps", "retained", "fraction", "ranks", "mem.", "mem. %", "gen.", "gen. %"):
    summary.add_column(name, justify="right", no_wrap=True)
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
  for s in table["stages"]:
    summary.add_row(
      str(s["stage"]),
      f"{s['lambda']:.4g}",
      str(s["steps"]),
      str(s["retained_params"]),
      f"{s['fraction']:.3f}",
      f"{sum(s['ranks'].values())}/{table['rank_max'] * len(s['ranks'])}",
      fmt(s["train_metric"], ".4f"),
      fmt(s["memorization"], ".1f"),
      fmt(s["eval_metric"], ".4f"),
      fmt(s["generalization"], ".1f"),
    )
  ranks = Table(title="active rank per module at the end of each stage")
  ranks.add_column("layer", justify="right")
  ranks.add_column("module")
  for s in table["stages"]:
    ranks.add_column(f"s{s['stage']}", justify="right")
  modules = sorted(table["stages"][0]["ranks"], key=module_order)
  for module in modules:
    layer, kind = split_module(module)
    ranks.add_row(str(layer) if layer >= 0 else "-", kind, *(str(s["ranks"].get(module, "-")) for s in table["stages"]))
  console = Console(width=max(120, Console().width))
  console.print(summary)
  console.print(ranks)


def _load(path: Optional[str], overrides: list[str], _) -> tuple[RunConfig, SparsifyConfig]:
  config, sparsify = load_configs(path, overrides)
  check(config, sparsify)
  return config, sparsify


def main(argv: Optional[Sequence[str]] = None) -> int:
  return cli.main(
    argv,
    doc=__doc__,
    load=_load,
    run=run_stages,
    help_text=lambda: section_help_text("sparsify", SparsifyConfig, RUN_DEFAULTS, "the staged run"),
  )


if __name__ == "__main__":
  sys.exit(main())
