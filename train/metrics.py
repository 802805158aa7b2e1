"""GLUE metrics from predictions, computed with scikit-learn and SciPy.

CoLA: Matthews correlation; STS-B and any regression task: Pearson and Spearman; MRPC and QQP: accuracy and F1; the
rest: accuracy.
Each task's `main` metric (the one used to keep the best checkpoint) follows the SoRA paper's tables.
"""

from __future__ import annotations

import numpy as np
import scipy.stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

METRICS = {
  "cola": ("mcc",),
  "stsb": ("pearson", "spearman"),
  "mrpc": ("accuracy", "f1"),
  "qqp": ("accuracy", "f1"),
}


def metric_names(task: str, regression: bool = False) -> tuple[str, ...]:
  return METRICS["stsb"] if regression else METRICS.get(task, ("accuracy",))


def main_metric(task: str, regression: bool = False) -> str:
  return "pearson" if regression else {"cola": "mcc", "stsb": "pearson"}.get(task, "accuracy")


def predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
  """logits: (n, num_labels) -> class ids (n,), or scores (n,) for regression."""
  logits = np.asarray(logits)
  return logits[:, 0] if regression else logits.argmax(-1)


def compute(task: str, preds: np.ndarray, labels: np.ndarray, regression: bool = False) -> dict[str, float]:
  """preds: class ids or scores (n,); labels: (n,). Returns {metric name: value}."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  out = {}
  for name in metric_names(task, regression):
    if name == "mcc":
      out[name] = matthews_corrcoef(labels, preds)
    elif name == "pearson":
      out[name] = scipy.stats.pearsonr(preds, labels)[0]
    elif name == "spearman":
      out[name] = scipy.stats.spearmanr(preds, labels)[0]
    elif name == "f1":
      out[name] = f1_score(labels, preds)
    elif name == "accuracy":
      out[name] = accuracy_score(labels, preds)
  return {k: float(v) for k, v in out.items()}
