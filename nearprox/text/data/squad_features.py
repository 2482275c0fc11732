"""SQuAD window features: questions of a :class:`~nearprox.text.data.squad.SquadSplit` →
fixed-shape arrays for training and evaluation.

**Features** (:func:`encode_squad`, as Hugging Face's ``run_qa.py``
``prepare_train_features``/``prepare_validation_features``): question (left-stripped,
cut to ``max_question_length`` tokens) + context, truncated on the context side only
(``truncation="only_second"``); a context longer than the window is split into
overlapping windows of ``max_length`` tokens, consecutive windows sharing ``doc_stride``
context tokens (the tokenizer's ``stride``; note that Google's original ``run_squad.py``
``doc_stride`` is the step between windows instead). Each window is one feature:

| array | shape | meaning |
|---|---|---|
| ``input_ids``, ``attention_mask``, ``token_type_ids`` | [F, T] int32 | tokens (padded) |
| ``start_positions``, ``end_positions`` | [F] int32 | answer's first/last token; 0 ([CLS]) when the window does not hold the whole answer (and for impossible questions) |
| ``example_index`` | [F] int32 | the feature's question (row of ``split.examples``) |
| ``offsets`` | [F, T, 2] int32 | character span ``[begin, end)`` of each context token in the context; -1 for question, special and padding tokens |

Training labels use each question's first answer (as ``run_qa.py``). The features are cached
on disk like :func:`nearprox.text.data.encode` (same cache root, ``tokenized/squad-<key>.npz``),
keyed by a SHA-256 of the tokenizer's fingerprint, the parameters and the content of every
example (id, question, context, answers, so also of the file and the article split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nearprox.text.data.encoding import (
    TOKEN_KEYS,
    default_cache_dir,
    read_cached_arrays,
    tokenizer_fingerprint,
    write_cached_arrays,
)
from nearprox.text.data.squad import SquadSplit
from nearprox.text.data.tasks import DataError

LABEL_KEYS = ("start_positions", "end_positions")
_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class SquadFeatures:
  """The windows of a :class:`SquadSplit` (arrays: module docstring; F windows, T tokens)."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_type_ids: np.ndarray
  start_positions: np.ndarray
  end_positions: np.ndarray
  example_index: np.ndarray
  offsets: np.ndarray

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def max_length(self) -> int:
    return int(self.input_ids.shape[1])

  def context_mask(self) -> np.ndarray:
    """[F, T] bool: the context tokens (those a predicted span may use)."""
    return self.offsets[..., 0] >= 0

  def arrays(self) -> dict[str, np.ndarray]:
    """The model inputs and span labels, for :func:`nearprox.text.data.batches`.

    A batch's ``index`` is then the feature row: ``example_index[index]`` its question and
    ``offsets[index]`` its character map (kept on the host, out of the batches).
    """
    return {key: getattr(self, key) for key in TOKEN_KEYS + LABEL_KEYS}


def encode_squad(
    split: SquadSplit,
    tokenizer: Any,
    max_length: int = 384,
    doc_stride: int = 128,
    *,
    max_question_length: int = 64,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    chunk_size: int = 1024,
) -> SquadFeatures:
  """Tokenizes ``split`` into overlapping-window features (module docstring), cached.

  Args:
    split: the questions.
    tokenizer: a fast Hugging Face tokenizer (offset mappings) that pads on the right.
    max_length: tokens per window T.
    doc_stride: context tokens shared by consecutive windows of one question.
    max_question_length: questions are cut to this many tokens (Google's ``max_query_length``).
    cache_dir: cache root (files in ``<cache_dir>/tokenized/``); default
      :func:`nearprox.text.data.default_cache_dir`.
    use_cache: False to tokenize without reading or writing the cache.
    chunk_size: questions per tokenizer call.
  """
  for name, value, low in (
      ("max_length", max_length, 8),
      ("max_question_length", max_question_length, 1),
      ("chunk_size", chunk_size, 1),
      ("doc_stride", doc_stride, 0),
  ):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
  if doc_stride >= max_length - 4:
    raise ValueError(
        f"doc_stride={doc_stride} must be smaller than max_length - 4 = {max_length - 4}"
    )
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError("encode_squad needs a fast tokenizer (offset mappings)")
  if getattr(tokenizer, "padding_side", "right") != "right":
    raise ValueError("encode_squad needs a tokenizer that pads on the right (question first)")
  params = dict(
      max_length=int(max_length),
      doc_stride=int(doc_stride),
      max_question_length=int(max_question_length),
  )
  path = None
  if use_cache:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "tokenized" / f"squad-{squad_cache_key(split, tokenizer, **params)}.npz"
    features = _load(path, len(split), int(max_length))
    if features is not None:
      return features
  features = _tokenize(split, tokenizer, chunk_size=int(chunk_size), **params)
  if path is not None:
    write_cached_arrays(path, dataclasses.asdict(features))
  return features


def squad_cache_key(split: SquadSplit, tokenizer: Any, **params) -> str:
  """SHA-256 hex of everything :func:`encode_squad`'s arrays depend on."""
  digest = hashlib.sha256()
  header = {
      "format": _CACHE_FORMAT,
      "tokenizer": tokenizer_fingerprint(tokenizer),
      "params": {k: int(v) for k, v in sorted(params.items())},
      "num_examples": len(split),
  }
  digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
  for example in split.examples:
    record = [
        example.id,
        example.question,
        example.context,
        list(example.answers),
        list(example.answer_starts),
        example.is_impossible,
    ]
    blob = json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass")
    digest.update(len(blob).to_bytes(8, "little"))
    digest.update(blob)
  return digest.hexdigest()


def _truncated_questions(split: SquadSplit, tokenizer, max_length, doc_stride, max_question_length):
  """Left-stripped questions, cut after their ``max_question_length``-th token.

  Raises ValueError if a question leaves a window no more than ``doc_stride`` context tokens
  (the windows could not advance).
  """
  questions = [example.question.lstrip() for example in split.examples]
  tokens = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
  special = tokenizer.num_special_tokens_to_add(pair=True)
  longest, longest_length = 0, -1
  for i, offsets in enumerate(tokens["offset_mapping"]):
    if len(offsets) > max_question_length:
      questions[i] = questions[i][: offsets[max_question_length - 1][1]]
    length = min(len(offsets), max_question_length)
    if length > longest_length:
      longest, longest_length = i, length
  room = max_length - longest_length - special
  if doc_stride >= room:
    raise ValueError(
        f"{split.source}: question {split.examples[longest].id} has {longest_length} tokens, "
        f"which leaves {room} context tokens per window of max_length={max_length}; "
        f"doc_stride={doc_stride} must be smaller (lower doc_stride or max_question_length, "
        f"or raise max_length)"
    )
  return questions


def _tokenize(split, tokenizer, *, max_length, doc_stride, max_question_length, chunk_size):
  questions = _truncated_questions(split, tokenizer, max_length, doc_stride, max_question_length)
  examples = split.examples
  parts = []
  for begin in range(0, len(examples), chunk_size):
    stop = min(begin + chunk_size, len(examples))
    tokens = tokenizer(
        questions[begin:stop],
        [example.context for example in examples[begin:stop]],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    part = {}
    for key in TOKEN_KEYS:
      if key == "token_type_ids" and key not in tokens:  # tokenizers without segments
        part[key] = np.zeros_like(part["input_ids"])
        continue
      part[key] = np.asarray(tokens[key], np.int32)
      if part[key].ndim != 2 or part[key].shape[1] != max_length:
        raise ValueError(
            f"tokenizer returned {key} of shape {part[key].shape}; expected [F, {max_length}]"
        )
    count = part["input_ids"].shape[0]
    part["example_index"] = np.asarray(tokens["overflow_to_sample_mapping"], np.int32) + begin
    sequence = np.array(
        [[-1 if s is None else s for s in tokens.sequence_ids(f)] for f in range(count)], np.int8
    )
    offsets = np.asarray(tokens["offset_mapping"], np.int32).reshape(count, max_length, 2)
    offsets[sequence != 1] = -1
    part["offsets"] = offsets
    parts.append(part)
  arrays = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
  _check_windows(split, arrays, tokenizer)
  arrays.update(_span_labels(split, arrays["example_index"], arrays["offsets"]))
  return SquadFeatures(**arrays)


def _check_windows(split: SquadSplit, arrays, tokenizer) -> None:
  context = arrays["offsets"][..., 0] >= 0
  empty = np.flatnonzero(~context.any(axis=1))
  if empty.size:
    example = split.examples[arrays["example_index"][empty[0]]]
    raise DataError(
        f"{split.source}: question {example.id}: the context of article {example.title!r} "
        f"tokenizes to no tokens ({example.context[:60]!r})"
    )
  cls = getattr(tokenizer, "cls_token_id", None)
  if cls is not None and not np.all(arrays["input_ids"][:, 0] == cls):
    raise ValueError("encode_squad needs the tokenizer's [CLS] token first in every window")


def _span_labels(split: SquadSplit, example_index, offsets) -> dict[str, np.ndarray]:
  """First/last token of each question's first answer per window; 0 where not inside it."""
  answerable = np.array([not e.is_impossible for e in split.examples])
  first_start = np.array([e.answer_starts[0] if e.answers else 0 for e in split.examples])
  first_end = first_start + np.array(
      [len(e.answers[0]) if e.answers else 0 for e in split.examples]
  )
  begin, end = first_start[example_index, None], first_end[example_index, None]
  context = offsets[..., 0] >= 0
  positions = np.arange(offsets.shape[1])
  # The answer's first token: the last context token starting at or before the answer's
  # first character; its last token: the first context token ending at or after its end.
  start = np.where(context & (offsets[..., 0] <= begin), positions, -1).max(axis=1)
  stop = np.where(context & (offsets[..., 1] >= end), positions, offsets.shape[1]).min(axis=1)
  first = np.argmax(context, axis=1)
  last = offsets.shape[1] - 1 - np.argmax(context[:, ::-1], axis=1)
  rows = np.arange(len(example_index))
  inside = (
      answerable[example_index]
      & (offsets[rows, first, 0] <= begin[:, 0])
      & (offsets[rows, last, 1] >= end[:, 0])
  )
  return {
      "start_positions": np.where(inside, start, 0).astype(np.int32),
      "end_positions": np.where(inside, stop, 0).astype(np.int32),
  }


_FEATURE_KEYS = tuple(field.name for field in dataclasses.fields(SquadFeatures))


def _load(path: Path, num_examples: int, max_length: int) -> SquadFeatures | None:
  """The cached features, or None if absent or unusable (then recomputed and rewritten)."""
  arrays = read_cached_arrays(path, _FEATURE_KEYS)
  if arrays is None:
    return None
  count = arrays["input_ids"].shape[0]
  shapes = {key: (count, max_length) for key in TOKEN_KEYS}
  shapes.update({key: (count,) for key in LABEL_KEYS + ("example_index",)})
  shapes["offsets"] = (count, max_length, 2)
  for key, shape in shapes.items():
    if arrays[key].shape != shape or arrays[key].dtype != np.int32:
      return None
  index = arrays["example_index"]
  if count == 0 or index.min() < 0 or index.max() >= num_examples:
    return None
  return SquadFeatures(**arrays)


def feature_answer_texts(split: SquadSplit, features: SquadFeatures) -> list[str | None]:
  """The context text under each feature's labelled span (None where it points at [CLS])."""
  texts: list[str | None] = []
  for row in range(len(features)):
    start, end = int(features.start_positions[row]), int(features.end_positions[row])
    if start == 0 and end == 0:
      texts.append(None)
      continue
    context = split.examples[features.example_index[row]].context
    texts.append(context[features.offsets[row, start, 0] : features.offsets[row, end, 1]])
  return texts


__all__ = [
    "LABEL_KEYS",
    "TOKEN_KEYS",
    "SquadFeatures",
    "encode_squad",
    "feature_answer_texts",
    "squad_cache_key",
]
