"""Pictures of a sparsifying run, as PNG (matplotlib, Agg backend; no display needed).

    memorization_generalization.png  memorization and generalization (% of the reference) against retained adapter
                                                                      parameters, one point per stage, labelled with its lambda.
    rank_heatmap.png                 active rank per layer (rows) and module type (columns), one panel per stage end.
    rank_over_steps.png              active rank per layer (rows) at each stage's last step (columns), one panel
                                     per module type.
    pareto.png                       `train.pareto`: test (or validation) metric against retained adapter parameters,
                                     one line per method, error bars of one standard deviation over seeds.

Ranks come as {module name: rank}, with the module names of `sora_jax.rank_report` rows: the '/'-joined module path
(`bert/encoder/layer_3/attention/self/query`), or `path[layer]` for a stacked (nn.scan) module.

    python -m train.plots RUN_DIR    # redraws a staged run's three pictures from RUN_DIR/stages.json
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Short labels for the six dense kernels of a BERT/DeBERTa block, in block order.
_TYPE_LABELS = {
  "attention/self/query": "query",
  "attention/self/query_proj": "query",
  "attention/self/key": "key",
  "attention/self/key_proj": "key",
  "attention/self/value": "value",
  "attention/self/value_proj": "value",
  "attention/output/dense": "attn out",
  "intermediate/dense": "ffn in",
  "output/dense": "ffn out",
}
_TYPE_ORDER = ("query", "key", "value", "attn out", "ffn in", "ffn out")


def split_module(name: str) -> tuple[int, str]:
  """`.../layer_3/attention/self/query` or `.../layer/attention/self/query[3]` -> (3, "query")."""
  stacked = re.fullmatch(r"(.*)\[(\d+)\]", name)
  if stacked:
    path, layer = stacked.group(1), int(stacked.group(2))
    kind = re.split(r"(?:^|/)layer(?:/|$)", path, maxsplit=1)[-1]
  else:
    found = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", name)
    if found is None:
      return -1, name  # not inside a layer (e.g. a pooler): its own row
    layer, kind = int(found.group(1)), name[found.end() :]
  kind = kind.removesuffix("/kernel")
  return layer, _TYPE_LABELS.get(kind, kind)


def module_order(name: str) -> tuple[int, int, str]:
  """Sort key: layer, then the block order of the module type."""
  layer, kind = split_module(name)
  return layer, _TYPE_ORDER.index(kind) if kind in _TYPE_ORDER else len(_TYPE_ORDER), kind


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[int], list[str], np.ndarray]:
  """{module: rank} -> (layers, module types, ranks (layers, types)); a missing cell is NaN."""
  cells = {split_module(name): rank for name, rank in ranks.items()}
  layers = sorted({layer for layer, _ in cells})
  found = {kind for _, kind in cells}
  kinds = [k for k in _TYPE_ORDER if k in found] + sorted(found - set(_TYPE_ORDER))
  grid = np.full((len(layers), len(kinds)), np.nan)
  for (layer, kind), rank in cells.items():
    grid[layers.index(layer), kinds.index(kind)] = rank
  return layers, kinds, grid


def _layer_label(layer: int) -> str:
  return "other" if layer < 0 else str(layer)


def plot_memorization(stages: Sequence[Mapping], path: str, title: Optional[str] = None) -> str:
  """Memorization and generalization (% of the reference) against retained params, one point per stage.

  Each stage needs `retained_params`, `lambda`, `memorization`, `generalization` (percent; None is skipped).
  """
  fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
  retained = np.array([s["retained_params"] for s in stages], float)
  for key, marker in (("memorization", "o"), ("generalization", "s")):
    values = np.array([np.nan if s.get(key) is None else s[key] for s in stages], float)
    ax.plot(retained, values, marker=marker, label=key)
  for s in stages:
    y = s.get("memorization")
    if y is not None:
      ax.annotate(
        f"λ={s['lambda']:.3g}",
        (s["retained_params"], y),
        textcoords="offset points",
        xytext=(4, 6),
        fontsize=7,
        color="0.3",
      )
  ax.set_xlabel("retained adapter parameters")
  ax.set_ylabel("% of reference metric")
  if len(retained) and retained.max() > retained.min():
    ax.invert_xaxis()  # stages progress to the right: fewer parameters
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title or "memorization and generalization across sparsifying stages", fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _heatmap(ax, grid: np.ndarray, rank_max: int, annotate: bool):
  image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=rank_max, aspect="auto", interpolation="nearest")
  if annotate:
    for (i, j), value in np.ndenumerate(grid):
      if not np.isnan(value):
        ax.text(
          j,
          i,
          f"{int(value)}",
          ha="center",
          va="center",
          fontsize=7,
          color="white" if value < 0.6 * rank_max else "black",
        )
  return image


def plot_rank_stages(stages: Sequence[Mapping], path: str, rank_max: int) -> str:
  """Active rank per layer x module type at the end of each stage; each stage needs `ranks` and `lambda`."""
  n = len(stages)
  cols = min(n, 4)
  rows = -(-n // cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(3.2 * cols + 0.8, 3.0 * rows + 0.4), dpi=120, squeeze=False, layout="constrained"
  )
  image = None
  for ax, stage in zip(axes.flat, stages):
    layers, kinds, grid = rank_grid(stage["ranks"])
    image = _heatmap(ax, grid, rank_max, annotate=grid.size <= 120)
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(layers)), [_layer_label(x) for x in layers], fontsize=7)
    ax.set_title(f"stage {stage['stage']}  λ={stage['lambda']:.3g}", fontsize=9)
    ax.set_ylabel("layer", fontsize=8)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  if image is not None:
    fig.colorbar(image, ax=axes, label="active rank", shrink=0.8)
  fig.suptitle("active rank at the end of each stage", fontsize=10)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_rank_over_steps(
  records: Sequence[tuple[int, Mapping[str, int]]], path: str, rank_max: int, title: Optional[str] = None
) -> str:
  """Active rank per layer over steps, one panel per module type. records: [(step, {module: rank})]."""
  if not records:
    raise ValueError("no rank records to plot")
  records = sorted(records, key=lambda r: r[0])
  steps = [step for step, _ in records]
  grids = [rank_grid(ranks) for _, ranks in records]
  layers, kinds, _ = grids[-1]
  cube = np.full((len(kinds), len(layers), len(steps)), np.nan)  # (type, layer, step)
  for t, (l_, k_, grid) in enumerate(grids):
    for i, layer in enumerate(l_):
      for j, kind in enumerate(k_):
        if layer in layers and kind in kinds:
          cube[kinds.index(kind), layers.index(layer), t] = grid[i, j]
  cols = min(len(kinds), 3)
  rows = -(-len(kinds) // cols)
  fig, axes = plt.subplots(
    rows, cols, figsize=(3.6 * cols + 0.8, 2.6 * rows + 0.4), dpi=120, squeeze=False, layout="constrained"
  )
  image = None
  ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 5)).round().astype(int))
  for ax, kind, grid in zip(axes.flat, kinds, cube):
    image = _heatmap(ax, grid, rank_max, annotate=False)
    ax.set_title(kind, fontsize=9)
    ax.set_yticks(range(len(layers)), [_layer_label(x) for x in layers], fontsize=7)
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("layer", fontsize=8)
  for ax in list(axes.flat)[len(kinds) :]:
    ax.axis("off")
  if image is not None:
    fig.colorbar(image, ax=axes, label="active rank", shrink=0.8)
  fig.suptitle(title or "active rank over training steps", fontsize=10)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)
  return path


def plot_pareto(rows: Sequence[Mapping], path: str, title: Optional[str] = None) -> str:
  """Metric against retained adapter parameters: one line per `family` (LoRA ranks, SoRA budgets, truncations), a lone point
  for a family with one row (SoRA at its lambda); x and y error bars are one standard deviation over seeds. Uses
  the test metric where every row has one, else validation."""
  split = "test" if all(r.get("test") is not None for r in rows) else "validation"
  fig, ax = plt.subplots(figsize=(7, 4.5))
  markers = {"lora": "o", "sora budget": "s", "sora lambda": "*", "truncate": "^", "truncate, then train": "v"}
  for family in dict.fromkeys(r["family"] for r in rows):
    group = sorted((r for r in rows if r["family"] == family), key=lambda r: r["retained_params"])
    x = [r["retained_params"] for r in group]
    y = [r[split] for r in group]
    ax.errorbar(
      x,
      y,
      xerr=[r["retained_params_std"] for r in group],
      yerr=[r[f"{split}_std"] for r in group],
      marker=markers.get(family, "o"),
      markersize=9 if family == "sora lambda" else 6,
      capsize=3,
      linestyle="-" if len(group) > 1 else "none",
      label=family,
    )
  ax.set_xscale("log", base=2)
  ax.set_xlabel("retained adapter parameters (mean over seeds)")
  metric = rows[0]["metric"] if rows else ""
  ax.set_ylabel(f"{split} {metric} (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def stage_rank_records(table: Mapping) -> list[tuple[int, dict]]:
  """[(step, {module: rank})] at the end of each stage of a `stages.json` table, steps counted over the whole run."""
  ends = np.cumsum([s["steps"] for s in table["stages"]])
  return [(int(end), s["ranks"]) for end, s in zip(ends, table["stages"])]


def plot_stage_table(table: Mapping, directory: str) -> list[str]:
  """Writes the three pictures of a `stages.json` table into `directory`; returns their paths."""
  stages = table["stages"]
  return [
    plot_memorization(stages, os.path.join(directory, "memorization_generalization.png")),
    plot_rank_stages(stages, os.path.join(directory, "rank_heatmap.png"), table["rank_max"]),
    plot_rank_over_steps(
      stage_rank_records(table),
      os.path.join(directory, "rank_over_steps.png"),
      table["rank_max"],
      title="active rank over the staged run's steps",
    ),
  ]


def main(argv: Sequence[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) != 1:
    raise SystemExit("usage: python -m train.plots RUN_DIR  (a staged run's directory, with stages.json)")
  table_path = os.path.join(argv[0], "stages.json")
  if not os.path.exists(table_path):
    raise SystemExit(f"{table_path} does not exist: give the output_dir of a python -m train.sparsify run")
  with open(table_path) as f:
    for path in plot_stage_table(json.load(f), argv[0]):
      print(path)


if __name__ == "__main__":
  main()
