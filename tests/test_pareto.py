"""`python -m train.pareto`: the learning-rate choice and the table from known records, and `--quick` end to end on the
tiny BERT of conftest.py (table and picture written, a rerun skips finished runs)."""

import json
import os

import numpy as np
import pytest

from train import pareto, study_stats
from train.config import ConfigError

from conftest import tiny_run_args


def _record(arm, family, rate, seed, validation, test, retained):
  return {
    "arm": arm,
    "family": family,
    "learning_rate": rate,
    "seed": seed,
    "validation": validation,
    "test": test,
    "retained_params": retained,
    "max_params": retained,
    "metric": "accuracy",
    "wall_time_s": 1.0,
  }


def test_rate_is_chosen_on_the_first_seed_and_rows_average_the_seeds_at_it():
  study = pareto.StudyConfig(seeds=(0, 1, 2), learning_rates=(1e-3, 2e-3), budgets=(0.125,))
  records = [
    _record("lora_r1", "lora", 1e-3, 0, 0.70, 0.60, 100),
    _record("lora_r1", "lora", 2e-3, 0, 0.80, 0.50, 100),
    _record("lora_r1", "lora", 2e-3, 1, 0.60, 0.70, 100),
    _record("lora_r1", "lora", 2e-3, 2, 0.70, 0.60, 100),
    # a later seed at the other rate must not count
    _record("lora_r1", "lora", 1e-3, 1, 0.99, 0.99, 100),
  ]
  (row,) = pareto.summarize(records, study)
  assert row["learning_rate"] == 2e-3 and row["seeds"] == [0, 1, 2]
  assert row["validation"] == pytest.approx(0.7) and row["validation_std"] == pytest.approx(0.1)
  assert row["test"] == pytest.approx(0.6) and row["test_std"] == pytest.approx(0.1)
  assert row["sweep"] == {"0.001": 0.70, "0.002": 0.80}


def test_paired_difference_is_the_student_t_interval_over_common_seeds():
  # SoRA - LoRA per seed: +0.01, +0.02, +0.03 (seed 3 only in one arm: left out); t_{0.975, 2} = 4.302653 (tables).
  sora = {"per_seed": {str(s): {"test": t, "validation": 0.5} for s, t in enumerate([0.61, 0.62, 0.63, 0.9])}}
  lora = {"per_seed": {str(s): {"test": t, "validation": 0.5} for s, t in enumerate([0.60, 0.60, 0.60])}}
  diff = study_stats.paired_difference(sora, lora, "test")
  assert diff["n"] == 3 and diff["mean"] == pytest.approx(0.02) and diff["std"] == pytest.approx(0.01)
  half = 4.302653 * 0.01 / np.sqrt(3)
  assert diff["low"] == pytest.approx(0.02 - half, abs=1e-6) and diff["high"] == pytest.approx(0.02 + half, abs=1e-6)
  assert study_stats.verdict(diff) == "ties"  # the interval [-0.005, 0.045] holds 0
  tight = study_stats.paired_difference(
    {"per_seed": {str(s): {"test": 0.62 + 1e-3 * s} for s in range(3)}},
    {"per_seed": {str(s): {"test": 0.60} for s in range(3)}},
    "test",
  )
  assert study_stats.verdict(tight) == "wins"
  assert study_stats.verdict(study_stats.paired_difference(lora, {"per_seed": {}}, "test")) == "n/a"


def test_comparisons_pick_the_best_baseline_on_validation_not_test():
  seeds = range(3)
  row = lambda arm, val, test: {  # noqa: E731
    "arm": arm,
    "validation": val,
    "per_seed": {str(s): {"validation": val + 1e-3 * s, "test": test + 1e-3 * s * s} for s in seeds},
  }
  rows = [row("lora_r1", 0.70, 0.80), row("truncate0.125", 0.75, 0.60), row("sora_budget0.125", 0.72, 0.70)]
  (entry,) = study_stats.comparisons(rows, budgets=(0.125,), rank_max=8)
  assert entry["best_baseline"] == "truncate0.125"  # higher validation, although lower test
  assert entry["against"]["truncate0.125"]["test"]["mean"] == pytest.approx(0.10)
  assert entry["verdict"] == "wins"


def test_methods_cover_each_budget_the_truncated_lora_and_the_paper_form():
  study = pareto.StudyConfig()
  names = [m.name for m in pareto.methods(study)]
  assert names == [
    "lora_r1",
    "sora_budget0.125",
    "trunc_train0.125",
    "lora_r2",
    "sora_budget0.25",
    "trunc_train0.25",
    "sora_lambda",
    "lora_r8",
  ]
  assert pareto.methods(study)[2].overrides["adapter.truncate_at"] == 0.7
  assert pareto.methods(study)[-1].truncate_to == (0.125, 0.25)
  assert pareto.arm_names(study)[-2:] == ["truncate0.125", "truncate0.25"]


def test_bad_study_keys_are_one_clear_error():
  with pytest.raises(ConfigError, match="unknown study key"):
    pareto.load_configs(None, ["study.rank=3"])
  with pytest.raises(ConfigError, match="budgets"):
    pareto.load_configs(None, ["budgets=[0.5, 1.5]"])
  with pytest.raises(ConfigError, match="not a LoRA rank"):
    pareto.load_configs(None, ["budgets=[0.2]"])
  with pytest.raises(ConfigError, match="repeats a seed"):
    pareto.load_configs(None, ["seeds=[1, 1]"])


@pytest.mark.slow
def test_quick_study_writes_tables_and_picture_and_resumes(tiny, tmp_path, monkeypatch):
  args = [
    "--quick",
    *tiny_run_args(tiny, tmp_path),
    "train.max_steps=6",
    "budgets=[0.5]",
    "learning_rates=[1e-2]",
  ]
  assert pareto.main(args) == 0
  table = json.loads((tmp_path / "pareto.json").read_text())
  rows = {r["arm"]: r for r in table["rows"]}
  assert list(rows) == ["lora_r4", "sora_budget0.5", "trunc_train0.5", "sora_lambda", "lora_r8", "truncate0.5"]
  assert all(r["seeds"] == [0, 1] for r in rows.values())
  rank_cost = 8 * 64 + 4 * 80  # one rank on 12 modules: 8 of 32 + 32, 4 of 32 + 48
  assert rows["lora_r4"]["retained_params"] == 4 * rank_cost
  assert rows["sora_budget0.5"]["retained_params"] <= 0.5 * rows["sora_budget0.5"]["max_params"]
  # the truncation arm: at most the budget, and within one rank of the most expensive module of it
  assert 4 * rank_cost - 80 <= rows["truncate0.5"]["retained_params"] <= 4 * rank_cost
  assert 0 < rows["trunc_train0.5"]["retained_params"] <= 4 * rank_cost  # cut at 70 %, then trained: still cut
  assert [(c["comparison"], c["best_baseline"]) for c in table["comparisons"]][1] == ("paper form", "lora_r8")
  budget = table["comparisons"][0]
  assert set(budget["against"]) == {"lora_r4", "truncate0.5", "trunc_train0.5"}
  assert budget["against"]["lora_r4"]["validation"]["n"] == 2  # the tiny task has no test split
  assert (tmp_path / "pareto.png").stat().st_size > 10_000
  assert "truncate0.5" in (tmp_path / "pareto.md").read_text()

  # A rerun reads the finished runs back and trains nothing.
  from train import loop

  monkeypatch.setattr(loop, "fit", lambda *a, **k: pytest.fail("a finished run was trained again"))
  assert pareto.main(args) == 0
  assert json.loads((tmp_path / "pareto.json").read_text())["rows"] == table["rows"]
  assert len(os.listdir(tmp_path / "runs")) == 10
