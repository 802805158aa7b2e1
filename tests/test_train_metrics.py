"""GLUE metrics against hand-computed values."""

import math

import numpy as np
import scipy.stats
import pytest

from train import metrics


def test_matthews_correlation():
  labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
  preds = np.array([1, 1, 0, 0, 0, 1, 1, 0])
  tp, tn, fp, fn = 3, 3, 1, 1
  expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  assert metrics.compute("cola", preds, labels) == pytest.approx({"mcc": expected})


def test_accuracy_and_f1():
  labels = np.array([1, 0, 1, 1, 0])
  preds = np.array([1, 1, 1, 0, 0])
  precision, recall = 2 / 3, 2 / 3
  out = metrics.compute("mrpc", preds, labels)
  assert out == pytest.approx({"accuracy": 3 / 5, "f1": 2 * precision * recall / (precision + recall)})
  assert metrics.compute("qqp", preds, labels) == out
  assert metrics.compute("rte", preds, labels) == pytest.approx({"accuracy": 0.6})


def test_pearson_spearman():
  labels = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
  preds = np.array([0.0, 2.0, 1.0, 3.0, 5.0])
  p = np.corrcoef(preds, labels)[0, 1]
  ranks = np.array([0, 2, 1, 3, 4], float)
  s = np.corrcoef(ranks, labels)[0, 1]
  assert metrics.compute("stsb", preds, labels) == pytest.approx({"pearson": p, "spearman": s})


def test_predictions_and_main_metric():
  logits = np.array([[0.1, 0.9], [2.0, -1.0]])
  np.testing.assert_array_equal(metrics.predictions(logits, regression=False), [1, 0])
  np.testing.assert_array_equal(metrics.predictions(logits, regression=True), [0.1, 2.0])
  assert metrics.main_metric("cola") == "mcc" and metrics.main_metric("stsb") == "pearson"
  assert metrics.main_metric("mnli") == "accuracy"


def test_regression_tasks_use_correlations():
  """A local task with num_labels=1 is scored like STS-B (Pearson, Spearman), not with accuracy."""
  rng = np.random.default_rng(0)
  preds, labels = rng.normal(size=20), rng.normal(size=20)
  out = metrics.compute("local", preds, labels, regression=True)
  assert out == pytest.approx(
    {"pearson": scipy.stats.pearsonr(preds, labels)[0], "spearman": scipy.stats.spearmanr(preds, labels)[0]}
  )
  assert metrics.main_metric("local", regression=True) == "pearson"
