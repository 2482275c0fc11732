"""Extractive QA scoring: window logits → answer text → SQuAD exact match and F1.

**Post-processing** (:func:`postprocess_predictions`, as Hugging Face's
``utils_qa.postprocess_qa_predictions``): a question's answer is the best span over all of
its windows. In each window the candidates are the ``n_best_size`` tokens of highest start
logit and the ``n_best_size`` of highest end logit; a span (s, e) is valid when both are
context tokens, e ≥ s and e − s + 1 ≤ ``max_answer_length``, and scores
``start_logits[s] + end_logits[e]``. The best valid span of the best window is mapped back
to the original context characters through the window's offsets:
``context[offsets[s][0] : offsets[e][1]]``. ``n_best_size=None`` takes every token as a
candidate (the exact best valid span; Hugging Face's rule equals it whenever its n-best
lists hold that span). A question with no valid span predicts "" (Hugging Face writes
"empty"). With unanswerable questions (SQuAD v2.0), the null score is the smallest
``start_logits[0] + end_logits[0]`` ([CLS]) over the question's windows, and the answer is
"" when that exceeds the best span's score by more than ``null_score_diff_threshold``.

**Metrics** (:func:`squad_metrics`; the official ``evaluate-v1.1.py``/``evaluate-v2.0.py``):
answers are normalized (lowercase; punctuation removed; the articles a/an/the removed as
words; whitespace collapsed); exact match is 1 when the normalized prediction equals the
normalized gold answer; F1 is the harmonic mean of the precision and recall of the
normalized whitespace tokens (multiset overlap). Each question takes the maximum over its
gold answers, and the scores are averaged over all questions; a question without a
prediction scores 0 (as the official scripts). Like the rest of
:mod:`nearprox.text.data.metrics` the scores are fractions in [0, 1]; the official scripts
print 100× them. For v1.1 an empty normalized prediction or gold answer has F1 0 (official
v1.1); with ``with_negative=True`` (v2.0) F1 is 1 when both are empty and 0 when only one is.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ------------------------------------------------------------------------------ metrics


def normalize_answer(text: str) -> str:
  """The official SQuAD normalization: lower, drop punctuation and articles, fix whitespace."""
  text = text.lower()
  text = "".join(ch for ch in text if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
  """1.0 if the normalized texts are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str, *, with_negative: bool = False) -> float:
  """Token F1 of the normalized texts (empty texts: module docstring)."""
  predicted = normalize_answer(prediction).split()
  gold = normalize_answer(ground_truth).split()
  if with_negative and (not predicted or not gold):
    return float(predicted == gold)
  common = collections.Counter(predicted) & collections.Counter(gold)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision = same / len(predicted)
  recall = same / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    with_negative: bool = False,
) -> dict[str, float]:
  """``{"exact_match", "f1"}`` averaged over the questions of ``references``, in [0, 1].

  Args:
    predictions: question id → predicted text (ids absent here score 0; extra ids are
      ignored).
    references: question id → gold answers (``[""]`` for an unanswerable question).
    with_negative: SQuAD v2.0 scoring of empty answers (module docstring).
  """
  if not references:
    raise ValueError("references is empty; metrics are undefined")
  exact = f1 = 0.0
  for qid, golds in references.items():
    if isinstance(golds, str) or not golds:
      raise ValueError(f"question {qid}: references must be a non-empty list of answers")
    if qid not in predictions:
      continue
    prediction = predictions[qid]
    exact += max(exact_match_score(prediction, gold) for gold in golds)
    f1 += max(f1_score(prediction, gold, with_negative=with_negative) for gold in golds)
  return {"exact_match": exact / len(references), "f1": f1 / len(references)}


def evaluate_predictions(split, predictions: Mapping[str, str]) -> dict[str, float]:
  """:func:`squad_metrics` of ``predictions`` against a :class:`~nearprox.text.data.squad.SquadSplit`."""
  return squad_metrics(predictions, split.references(), with_negative=split.with_negative)


# ------------------------------------------------------------------------------ spans


def best_spans(
    start_logits,
    end_logits,
    context_mask,
    *,
    n_best_size: int | None = 20,
    max_answer_length: int = 30,
    chunk_size: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per window, the best valid span (module docstring): (start [F], end [F], score [F]).

  Args:
    start_logits, end_logits: [F, T].
    context_mask: [F, T] bool, True on context tokens.
    n_best_size: candidates per window for the start and for the end (None: all).
    max_answer_length: the longest span, in tokens.
    chunk_size: windows scored at once (bounds the [chunk, T, max_answer_length] scores).

  Windows without a valid span get start = end = -1 and score -inf.
  """
  start_logits = np.asarray(start_logits, np.float32)
  end_logits = np.asarray(end_logits, np.float32)
  context_mask = np.asarray(context_mask, bool)
  if start_logits.ndim != 2 or start_logits.shape != end_logits.shape:
    raise ValueError(
        f"start and end logits must both be [F, T], got {start_logits.shape} and "
        f"{end_logits.shape}"
    )
  if context_mask.shape != start_logits.shape:
    raise ValueError(f"context_mask must be {start_logits.shape}, got {context_mask.shape}")
  if max_answer_length < 1:
    raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}")
  if n_best_size is not None and n_best_size < 1:
    raise ValueError(f"n_best_size must be >= 1 or None, got {n_best_size}")
  num, length = start_logits.shape
  span = min(max_answer_length, length)
  starts = np.full(num, -1, np.int64)
  ends = np.full(num, -1, np.int64)
  scores = np.full(num, -np.inf, np.float32)
  for begin in range(0, num, chunk_size):
    rows = slice(begin, min(begin + chunk_size, num))
    s_logit, e_logit, valid = start_logits[rows], end_logits[rows], context_mask[rows]
    # Candidate starts, ascending (ties go to the earliest span); score[c, i, d] =
    # start[c, s_i] + end[c, s_i + d] for d < span, valid when both ends are candidates.
    s_idx = _top_n(s_logit, n_best_size)
    e_ok = valid & _top_n_mask(e_logit, n_best_size)
    pad = ((0, 0), (0, span - 1))
    e_index = s_idx[:, :, None] + np.arange(span)  # [C, n, span], < T + span - 1
    e_pad = np.take_along_axis(
        np.pad(e_logit, pad, constant_values=-np.inf)[:, None, :], e_index, axis=2
    )
    e_ok_pad = np.take_along_axis(
        np.pad(e_ok, pad, constant_values=False)[:, None, :], e_index, axis=2
    )
    s_ok = np.take_along_axis(valid, s_idx, axis=1)
    ok = s_ok[:, :, None] & e_ok_pad
    score = np.where(ok, np.take_along_axis(s_logit, s_idx, axis=1)[:, :, None] + e_pad, -np.inf)
    flat = score.reshape(score.shape[0], -1)
    best = np.argmax(flat, axis=1)
    best_score = flat[np.arange(flat.shape[0]), best]
    found = np.isfinite(best_score)
    i, d = np.divmod(best, span)
    s = s_idx[np.arange(len(i)), i]
    starts[rows] = np.where(found, s, -1)
    ends[rows] = np.where(found, s + d, -1)
    scores[rows] = np.where(found, best_score, -np.inf)
  return starts, ends, scores


def _top_n(logits: np.ndarray, n: int | None) -> np.ndarray:
  """[C, n]: the columns of each row's n largest logits, ascending (all T if n is None)."""
  rows, length = logits.shape
  if n is None or n >= length:
    return np.broadcast_to(np.arange(length), (rows, length))
  return np.sort(np.argpartition(-logits, n - 1, axis=1)[:, :n], axis=1)


def _top_n_mask(logits: np.ndarray, n: int | None) -> np.ndarray:
  """[C, T] bool: True at each row's n largest logits (everywhere if n is None)."""
  mask = np.zeros(logits.shape, bool)
  np.put_along_axis(mask, _top_n(logits, n), True, axis=1)
  return mask


def postprocess_predictions(
    split,
    features,
    start_logits,
    end_logits,
    *,
    n_best_size: int | None = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, str]:
  """Question id → predicted answer text, from the logits of every window (module docstring).

  Args:
    split: the :class:`~nearprox.text.data.squad.SquadSplit` the features were made from.
    features: its :class:`~nearprox.text.data.squad_features.SquadFeatures` (``example_index``,
      ``offsets``; row f of the logits is feature f).
    start_logits, end_logits: [F, T] model outputs for every feature, in feature order.
    n_best_size, max_answer_length: span candidates (:func:`best_spans`).
    null_score_diff_threshold: v2.0 only (``split.with_negative``): predict "" when the
      null score exceeds the best span's score by more than this.
  """
  start_logits = np.asarray(start_logits, np.float32)
  end_logits = np.asarray(end_logits, np.float32)
  expected = features.offsets.shape[:2]
  if start_logits.shape != expected or end_logits.shape != expected:
    raise ValueError(
        f"logits must be [F, T] = {expected} (one row per feature), got "
        f"{start_logits.shape} and {end_logits.shape}"
    )
  offsets = features.offsets
  starts, ends, scores = best_spans(
      start_logits,
      end_logits,
      offsets[..., 0] >= 0,
      n_best_size=n_best_size,
      max_answer_length=max_answer_length,
  )
  num_examples = len(split.examples)
  index = np.asarray(features.example_index, np.int64)
  best_row = np.full(num_examples, -1, np.int64)
  best_score = np.full(num_examples, -np.inf, np.float32)
  null_score = np.full(num_examples, np.inf, np.float32)
  for row in range(len(index)):  # first window wins ties, like a stable sort
    e = index[row]
    if scores[row] > best_score[e]:
      best_score[e], best_row[e] = scores[row], row
  np.minimum.at(null_score, index, start_logits[:, 0] + end_logits[:, 0])
  with_negative = split.with_negative
  predictions = {}
  for e, example in enumerate(split.examples):
    row = best_row[e]
    text = ""
    if row >= 0:
      text = example.context[offsets[row, starts[row], 0] : offsets[row, ends[row], 1]]
    if with_negative and null_score[e] > best_score[e] + null_score_diff_threshold:
      text = ""
    predictions[example.id] = text
  return predictions


__all__ = [
    "best_spans",
    "evaluate_predictions",
    "exact_match_score",
    "f1_score",
    "normalize_answer",
    "postprocess_predictions",
    "squad_metrics",
]
