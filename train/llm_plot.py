"""The kept SoRA ranks of a decoder LLM as a heat map: layers (rows) x the seven projections (columns), PNG.

Module names are those of `sora_jax.rank_report` rows on a Tunix Llama3 / Qwen3 (`layers/3/attn/q_proj/w`,
`layers/3/mlp/down_proj/kernel`); each cell is the number of nonzero gates of that projection in that layer.
"""

from __future__ import annotations

import re
from typing import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NAME = re.compile(r"(?:.*/)?layers/(\d+)/(?:attn|mlp)/(\w+)/\w+")


def rank_grid(ranks: Mapping[str, int]) -> np.ndarray:
  """{module: rank} -> (layers, 7) ranks in `PROJECTIONS` order; a projection without an adapter is NaN."""
  cells = {}
  for name, rank in ranks.items():
    match = _NAME.fullmatch(name)
    if match is None or match[2] not in PROJECTIONS:
      raise ValueError(f"{name!r} is not a projection of a Tunix decoder layer (layers/<i>/attn|mlp/<proj>/<w>)")
    cells[int(match[1]), PROJECTIONS.index(match[2])] = rank
  grid = np.full((max(layer for layer, _ in cells) + 1, len(PROJECTIONS)), np.nan)
  for (layer, column), rank in cells.items():
    grid[layer, column] = rank
  return grid


def plot_rank_map(ranks: Mapping[str, int], rank_max: int, path: str, title: str) -> str:
  """Writes the heat map of `ranks` (see the module docstring) to `path`; returns `path`."""
  grid = rank_grid(ranks)
  fig, ax = plt.subplots(figsize=(4.6, 0.19 * len(grid) + 1.6), dpi=120, layout="constrained")
  image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=rank_max, aspect="auto", interpolation="nearest")
  for (i, j), value in np.ndenumerate(grid):
    if not np.isnan(value):
      color = "white" if value < 0.6 * rank_max else "black"
      ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=6, color=color)
  ax.set_xticks(range(len(PROJECTIONS)), [p.removesuffix("_proj") for p in PROJECTIONS], fontsize=7)
  ax.set_yticks(range(len(grid)), [str(i) for i in range(len(grid))], fontsize=6)
  ax.set_xlabel("projection", fontsize=8)
  ax.set_ylabel("layer", fontsize=8)
  ax.set_title(title, fontsize=8)
  fig.colorbar(image, ax=ax, label=f"kept rank (of {rank_max})", shrink=0.6)
  fig.savefig(path)
  plt.close(fig)
  return path
