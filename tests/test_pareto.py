"""`python -m train.pareto`: the learning-rate choice and the table from known records, and `--quick` end to end on the
tiny BERT of conftest.py (table and picture written, a rerun skips finished runs)."""

import json
import os

import pytest

from train import pareto
from train.config import ConfigError

from conftest import tiny_run_args


def _record(method, family, rate, seed, validation, test, retained):
  # A LoRA run's max_params is at its own rank: rank 1 keeps all of its 100.
  return {
    "method": method,
    "family": family,
    "learning_rate": rate,
    "seed": seed,
    "validation": validation,
    "test": test,
    "retained_params": retained,
    "max_params": retained,
    "metric": "accuracy",
    "budget": None,
    "wall_time_s": 1.0,
  }


def test_rate_is_chosen_on_the_first_seed_and_rows_average_the_seeds_at_it():
  study = pareto.StudyConfig(seeds=(0, 1, 2), learning_rates=(1e-3, 2e-3))
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
  table = pareto.markdown_table([row], rank_max=8)
  assert "| lora_r1 | 100 (12.5 %) | 0.002 | 0.7000 ± 0.1000 | 0.6000 ± 0.1000 | 3 |" in table


def test_methods_cover_lora_ranks_budgets_and_the_default_lambda():
  names = [m.name for m in pareto.methods(pareto.StudyConfig())]
  assert names == [
    "lora_r1",
    "lora_r2",
    "lora_r4",
    "lora_r8",
    "sora_budget0.125",
    "sora_budget0.25",
    "sora_budget0.5",
    "sora_budget0.75",
    "sora_lambda",
  ]


def test_bad_study_keys_are_one_clear_error():
  with pytest.raises(ConfigError, match="unknown study key"):
    pareto.load_configs(None, ["study.rank=3"])
  with pytest.raises(ConfigError, match="budgets"):
    pareto.load_configs(None, ["budgets=[0.5, 1.5]"])


@pytest.mark.slow
def test_quick_study_writes_table_and_picture_and_resumes(tiny, tmp_path, monkeypatch):
  args = [
    "--quick",
    *tiny_run_args(tiny, tmp_path),
    "train.max_steps=6",
    "optim.learning_rate=1e-2",
    "lora_ranks=[1]",
    "budgets=[0.5]",
    "learning_rates=[1e-2]",
  ]
  assert pareto.main(args) == 0
  table = json.loads((tmp_path / "pareto.json").read_text())
  assert [r["method"] for r in table["rows"]] == ["lora_r1", "sora_budget0.5", "sora_lambda"]
  lora, budget, _ = table["rows"]
  assert lora["retained_params"] == 1 * (8 * 64 + 4 * 80)  # rank 1 on 12 modules: 8 of 32 + 32, 4 of 32 + 48
  assert budget["retained_params"] <= 0.5 * budget["max_params"]
  assert (tmp_path / "pareto.png").stat().st_size > 10_000
  assert "sora_budget0.5" in (tmp_path / "pareto.md").read_text()

  # A rerun reads the finished runs back and trains nothing.
  from train import loop

  monkeypatch.setattr(loop, "run", lambda config: pytest.fail("a finished run was trained again"))
  assert pareto.main(args) == 0
  assert json.loads((tmp_path / "pareto.json").read_text())["rows"] == table["rows"]
  assert len(os.listdir(tmp_path / "runs")) == 3
