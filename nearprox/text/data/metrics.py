"""Classification metrics on NumPy arrays, with a 0/1 mask for padded rows.

Every function takes integer ``labels`` [N], integer ``predictions`` [N] (or logits
[N, C], reduced with ``argmax``) and an optional ``mask`` [N]: rows with mask 0 are
padding (see :func:`nearprox.text.data.batches`) and are left out entirely, so a padded
evaluation set gives exactly the numbers of the unpadded one.

Definitions (TP, FP, FN, TN counted over unmasked rows; C the confusion matrix with
C[t, p] = #{true t, predicted p}):

* accuracy  = #{label = prediction} / N
* F1        = 2·TP / (2·TP + FP + FN) for the positive class (0 when that is 0/0,
  the convention of scikit-learn's ``zero_division=0``); GLUE's MRPC metric.
* macro F1  = mean over classes of the one-vs-rest F1.
* Matthews correlation (Gorodkin's multiclass form, equal to
  (TP·TN − FP·FN)/sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) for two classes; GLUE's CoLA
  metric; Matthews 1975):

      MCC = (c·s − Σ_k p_k t_k) / sqrt((s² − Σ_k p_k²)(s² − Σ_k t_k²))

  with s = N, c = trace(C), t_k = Σ_p C[k, p] (true counts), p_k = Σ_t C[t, k]
  (predicted counts); 0 when the denominator is 0 (a constant prediction or label).
"""

from __future__ import annotations

import numpy as np


def _prepare(labels, predictions, mask):
  """Validates shapes, reduces logits to labels and applies the mask."""
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [N], got {labels.shape}")
  if predictions.ndim == 2:
    predictions = np.argmax(predictions, axis=-1)
  if predictions.shape != labels.shape:
    raise ValueError(
        f"predictions must have shape {labels.shape} (or logits [N, C]), got "
        f"{np.shape(predictions)}"
    )
  if mask is None:
    keep = np.ones(labels.shape, dtype=bool)
  else:
    mask = np.asarray(mask)
    if mask.shape != labels.shape:
      raise ValueError(f"mask must have shape {labels.shape}, got {mask.shape}")
    keep = mask != 0
  if not keep.any():
    raise ValueError("mask selects no examples; metrics are undefined")
  return labels[keep].astype(np.int64), predictions[keep].astype(np.int64)


def confusion_matrix(labels, predictions, num_labels: int, mask=None) -> np.ndarray:
  """C[t, p] = number of unmasked rows with label t and prediction p."""
  labels, predictions = _prepare(labels, predictions, mask)
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.min() < 0 or values.max() >= num_labels:
      raise ValueError(
          f"{name} must lie in [0, {num_labels}), got " f"[{values.min()}, {values.max()}]"
      )
  counts = np.zeros((num_labels, num_labels), dtype=np.int64)
  np.add.at(counts, (labels, predictions), 1)
  return counts


def accuracy(labels, predictions, mask=None) -> float:
  """Fraction of unmasked rows whose prediction equals the label."""
  labels, predictions = _prepare(labels, predictions, mask)
  return float(np.mean(labels == predictions))


def f1_score(labels, predictions, mask=None, positive_label: int = 1) -> float:
  """Binary F1 of ``positive_label``: 2TP / (2TP + FP + FN), 0 for 0/0."""
  labels, predictions = _prepare(labels, predictions, mask)
  return _f1(labels, predictions, positive_label)


def _f1(labels, predictions, positive_label):
  true_pos = np.sum((predictions == positive_label) & (labels == positive_label))
  false_pos = np.sum((predictions == positive_label) & (labels != positive_label))
  false_neg = np.sum((predictions != positive_label) & (labels == positive_label))
  denominator = 2 * true_pos + false_pos + false_neg
  return float(2 * true_pos / denominator) if denominator else 0.0


def macro_f1(labels, predictions, num_labels: int, mask=None) -> float:
  """Unweighted mean over the ``num_labels`` classes of one-vs-rest F1."""
  labels, predictions = _prepare(labels, predictions, mask)
  return float(np.mean([_f1(labels, predictions, k) for k in range(num_labels)]))


def matthews_corrcoef(labels, predictions, mask=None) -> float:
  """Matthews correlation coefficient (multiclass form; see module docstring)."""
  labels, predictions = _prepare(labels, predictions, mask)
  num_labels = int(max(labels.max(), predictions.max())) + 1
  if min(labels.min(), predictions.min()) < 0:
    raise ValueError("labels and predictions must be non-negative class indices")
  counts = np.zeros((num_labels, num_labels), dtype=np.float64)
  np.add.at(counts, (labels, predictions), 1.0)
  true_counts = counts.sum(axis=1)
  pred_counts = counts.sum(axis=0)
  total = counts.sum()
  correct = np.trace(counts)
  numerator = correct * total - pred_counts @ true_counts
  denominator = np.sqrt(
      (total**2 - pred_counts @ pred_counts) * (total**2 - true_counts @ true_counts)
  )
  return float(numerator / denominator) if denominator > 0 else 0.0
