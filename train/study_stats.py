"""The statistics of `train.pareto`: per-arm learning-rate choice, mean and spread over seeds, paired differences.

Every arm of the study is a list of run records ({"arm", "learning_rate", "seed", "validation", "test", ...}). Its
learning rate is chosen on the validation metric of the first seed only; its row averages the seeds at that rate.
Two arms are compared seed by seed (the same seed gives both arms the same data order), on the seeds both ran:

  d_s = m_s(arm) - m_s(baseline),   mean d +- t_{0.975, n-1} * std(d) / sqrt(n)   (a 95 % Student-t interval)

An interval that excludes 0 is a difference the seeds support; one that includes 0 is a tie at this many seeds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
  """Mean and sample standard deviation (ddof 1; 0 for one value) of the values that are not None."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def best_rate(records: Sequence[dict], first_seed: int) -> Optional[float]:
  """The learning rate of the best validation metric among `records` of `first_seed` (None if none ran)."""
  sweep = [r for r in records if r["seed"] == first_seed and r["validation"] is not None]
  if not sweep:
    return None
  return max(sweep, key=lambda r: r["validation"])["learning_rate"]


def arm_row(arm: str, records: Sequence[dict], first_seed: int) -> dict:
  """One arm's row: its chosen rate, the first seed's sweep, and mean +- std over the seeds at the chosen rate."""
  rate = best_rate(records, first_seed)
  chosen = sorted((r for r in records if r["learning_rate"] == rate), key=lambda r: r["seed"])
  first = chosen[0] if chosen else records[0]
  row = {
    "arm": arm,
    "family": first["family"],
    "budget": first.get("budget_fraction"),
    "learning_rate": rate,
    "seeds": [r["seed"] for r in chosen],
    "metric": first["metric"],
    "sweep": {f"{r['learning_rate']:g}": r["validation"] for r in records if r["seed"] == first_seed},
    "max_params": first.get("max_params"),
  }
  for key in ("retained_params", "validation", "test"):
    row[key], row[key + "_std"] = mean_std([r[key] for r in chosen])
  row["per_seed"] = {str(r["seed"]): {"validation": r["validation"], "test": r["test"]} for r in chosen}
  return row


def t_quantile(n: int, level: float = 0.975) -> float:
  """Student's t quantile with n - 1 degrees of freedom (n >= 2)."""
  from scipy import stats

  return float(stats.t.ppf(level, n - 1))


def paired_difference(arm: dict, baseline: dict, key: str) -> Optional[dict]:
  """Paired difference arm - baseline of `key` ("validation" or "test") over the seeds both rows hold: mean, std,
  the 95 % interval and the seeds; None with fewer than two common seeds."""
  seeds = [s for s in arm["per_seed"] if s in baseline["per_seed"]]
  pairs = [(arm["per_seed"][s][key], baseline["per_seed"][s][key]) for s in seeds]
  diffs = [a - b for a, b in pairs if a is not None and b is not None]
  if len(diffs) < 2:
    return None
  mean, std = mean_std(diffs)
  half = t_quantile(len(diffs)) * std / math.sqrt(len(diffs))
  return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": len(diffs), "seeds": seeds}


def verdict(diff: Optional[dict]) -> str:
  """'wins', 'loses' or 'ties' by whether the 95 % interval of a paired difference excludes 0."""
  if diff is None:
    return "n/a"
  if diff["low"] > 0:
    return "wins"
  if diff["high"] < 0:
    return "loses"
  return "ties"


def comparisons(rows: Sequence[dict], budgets: Sequence[float], rank_max: int) -> list[dict]:
  """For each budget: SoRA's budget arm against each baseline at that budget (uniform LoRA, truncation, truncation
  then training) and against the best baseline (the one of higher mean validation metric); then the paper's form,
  SoRA at its lambda against LoRA r_max. Differences on validation and test."""
  by_arm = {row["arm"]: row for row in rows}
  out = []

  def compare(label, sora_arm, baseline_arms):
    sora = by_arm.get(sora_arm)
    baselines = [by_arm[b] for b in baseline_arms if b in by_arm and by_arm[b]["validation"] is not None]
    if sora is None or not baselines:
      return
    best = max(baselines, key=lambda r: r["validation"])
    entry = {"comparison": label, "arm": sora_arm, "best_baseline": best["arm"], "against": {}}
    for baseline in baselines:
      entry["against"][baseline["arm"]] = {
        split: paired_difference(sora, baseline, split) for split in ("validation", "test")
      }
    entry["verdict"] = verdict(entry["against"][best["arm"]]["test"])
    out.append(entry)

  for fraction in budgets:
    rank = fraction * rank_max
    baselines = [f"lora_r{rank:g}", f"truncate{fraction:g}", f"trunc_train{fraction:g}"]
    compare(f"budget {fraction:g}", f"sora_budget{fraction:g}", baselines)
  compare("paper form", "sora_lambda", [f"lora_r{rank_max}"])
  return out


def format_diff(diff: Optional[dict]) -> str:
  if diff is None:
    return "-"
  return f"{diff['mean']:+.4f} [{diff['low']:+.4f}, {diff['high']:+.4f}]"


def markdown(rows: Sequence[dict], compared: Sequence[dict], rank_max: int) -> str:
  """The arms' table (chosen rate, the sweep, mean +- std) and the paired differences, as markdown."""
  metric = rows[0]["metric"] if rows else "metric"
  fmt = lambda m, s: "-" if m is None else f"{m:.4f} ± {s:.4f}"  # noqa: E731
  lines = [
    f"| arm | retained adapter params | learning rate (validation {metric} at each rate, first seed) | "
    f"validation {metric} | test {metric} | seeds |",
    "|---|---:|---|---:|---:|---:|",
  ]
  for row in rows:
    sweep = ", ".join(f"{rate}: {'-' if v is None else f'{v:.4f}'}" for rate, v in row["sweep"].items())
    rate = "-" if row["learning_rate"] is None else f"{row['learning_rate']:g}"
    retained = "-" if row["retained_params"] is None else f"{row['retained_params']:.0f}"
    lines.append(
      f"| {row['arm']} | {retained} | {rate} ({sweep}) | {fmt(row['validation'], row['validation_std'])} | "
      f"{fmt(row['test'], row['test_std'])} | {len(row['seeds'])} |"
    )
  lines += [
    "",
    f"Paired differences (SoRA arm - baseline; mean over seeds [95 % interval]); best baseline = higher mean "
    f"validation {metric}:",
    "",
    "| comparison | SoRA arm | baseline | validation difference | test difference | test verdict |",
    "|---|---|---|---:|---:|---|",
  ]
  for entry in compared:
    for baseline, diffs in entry["against"].items():
      best = " (best)" if baseline == entry["best_baseline"] else ""
      lines.append(
        f"| {entry['comparison']} | {entry['arm']} | {baseline}{best} | {format_diff(diffs['validation'])} | "
        f"{format_diff(diffs['test'])} | {verdict(diffs['test'])} |"
      )
  return "\n".join(lines) + "\n"
