"""SQuAD extractive question answering: the official JSON files → fixed-shape window features.

**Files.** The official SQuAD JSON layout (v1.1 and v2.0)::

    {"version": "1.1", "data": [{"title": ..., "paragraphs": [{"context": ...,
      "qas": [{"id": ..., "question": ..., "answers": [{"text": ..., "answer_start": 0}],
               "is_impossible": false}]}]}]}

Every answer must be ``context[answer_start : answer_start + len(text)]``. A v2.0 question
with ``"is_impossible": true`` has no answers (``plausible_answers`` are ignored); its gold
answer is the empty string. Anything else (invalid JSON, a missing or mistyped field, an
answer that does not match its context, a repeated question id) raises
:class:`~nearprox.text.data.DataError` naming the file and the question id (or the JSON path
``data[i].paragraphs[j].qas[k]`` where there is no id yet).

**Splits.** With the official train and dev files, "train" is the train file and "dev" the
dev file (:func:`load_squad` with ``train_file=`` and ``dev_file=``, or a directory holding
both). With only a dev file (the offline case: ``dev-v1.1.json``), it is split **by article**
into a training part and a held-out evaluation part: article ``title`` is held out ("dev")
iff

    int.from_bytes(sha256(title.encode("utf-8")).digest()[:8], "big") / 2**64 < eval_fraction

(:func:`article_is_held_out`; default ``eval_fraction`` :data:`EVAL_FRACTION` = 0.25). The
rule looks at the title alone, so an article's side never depends on the other articles in
the file, and all paragraphs of an article (every question on them) are on one side. On the
official SQuAD v1.1 dev set it holds out 11 of the 48 articles (346 of 2,067 paragraphs,
1,702 of 10,570 questions) and trains on 37 articles (1,721 paragraphs, 8,868 questions).
Scores from this split compare optimizers within this project, not with the leaderboard.

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
import functools
import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from nearprox.text.data.encoding import default_cache_dir, tokenizer_fingerprint
from nearprox.text.data.tasks import DataError, canonical_split, located

SQUAD_DIR_ENV = "NEARPROX_SQUAD_DIR"
EVAL_FRACTION = 0.25
TRAIN_FILENAMES = ("train-v1.1.json", "train-v2.0.json")
DEV_FILENAMES = ("dev-v1.1.json", "dev-v2.0.json")
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
LABEL_KEYS = ("start_positions", "end_positions")
_CACHE_FORMAT = 1


# ------------------------------------------------------------------------------ examples


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One question on one paragraph.

  Attributes:
    id: the question id (unique in its file).
    title: the article's title.
    context: the paragraph.
    question: the question text.
    answers: gold answer texts (several annotators; may repeat); empty iff impossible.
    answer_starts: character offset of each answer in ``context``.
    is_impossible: a v2.0 question without an answer (gold answer: the empty string).
  """

  id: str
  title: str
  context: str
  question: str
  answers: tuple[str, ...]
  answer_starts: tuple[int, ...]
  is_impossible: bool = False

  @property
  def gold_answers(self) -> list[str]:
    """What the metrics compare against: the answers, or ``[""]`` if impossible."""
    return [""] if self.is_impossible else list(self.answers)


@dataclasses.dataclass(frozen=True)
class SquadSplit:
  """Questions of one split, in file order.

  Attributes:
    name: "train" or "dev".
    examples: the questions.
    source: the file they came from (for messages).
    version: the file's ``version`` field ("1.1", "v2.0", ...).
  """

  name: str
  examples: tuple[QAExample, ...]
  source: str = ""
  version: str = "1.1"

  def __post_init__(self):
    object.__setattr__(self, "examples", tuple(self.examples))
    if not self.examples:
      raise DataError(f"{self.source or 'squad'}: split {self.name!r} has no questions")

  def __len__(self) -> int:
    return len(self.examples)

  @functools.cached_property
  def with_negative(self) -> bool:
    """Whether unanswerable questions are possible (a v2 file, or any impossible question)."""
    return str(self.version).lstrip("v").startswith("2") or any(
        example.is_impossible for example in self.examples
    )

  @property
  def ids(self) -> list[str]:
    return [example.id for example in self.examples]

  @property
  def titles(self) -> list[str]:
    """The articles, in file order, each once."""
    return list(dict.fromkeys(example.title for example in self.examples))

  def references(self) -> dict[str, list[str]]:
    """Question id → gold answers (the ``references`` of :func:`nearprox.text.qa.squad_metrics`)."""
    return {example.id: example.gold_answers for example in self.examples}

  def select(self, indices) -> SquadSplit:
    """The questions at ``indices`` (e.g. :func:`nearprox.text.data.eval_subset`'s)."""
    return dataclasses.replace(self, examples=tuple(self.examples[int(i)] for i in indices))


def read_squad_json(path: str | os.PathLike, name: str = "dev") -> SquadSplit:
  """Every question of one SQuAD JSON file (layout and checks: module docstring)."""
  path = Path(path)
  try:
    raw = path.read_bytes()
  except OSError as error:
    raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
  try:
    document = json.loads(raw.decode("utf-8-sig"))
  except UnicodeDecodeError as error:
    line = raw[: error.start].count(b"\n") + 1
    raise located(path, line, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
  except json.JSONDecodeError as error:
    raise located(
        path, error.lineno, f"not valid JSON: {error.msg} (column {error.colno})"
    ) from None
  if not isinstance(document, dict) or not isinstance(document.get("data"), list):
    raise located(path, None, 'not a SQuAD file: expected a JSON object with a "data" list')
  version = document.get("version", "1.1")
  examples: list[QAExample] = []
  seen: dict[str, str] = {}
  for i, article in enumerate(document["data"]):
    where = f"data[{i}]"
    article = _field(path, where, article, None, dict)
    title = _field(path, where, article, "title", str)
    paragraphs = _field(path, where, article, "paragraphs", list)
    for j, paragraph in enumerate(paragraphs):
      where = f"data[{i}].paragraphs[{j}] (article {title!r})"
      paragraph = _field(path, where, paragraph, None, dict)
      context = _field(path, where, paragraph, "context", str)
      for k, qa in enumerate(_field(path, where, paragraph, "qas", list)):
        where = f"data[{i}].paragraphs[{j}].qas[{k}] (article {title!r})"
        qa = _field(path, where, qa, None, dict)
        qid = _field(path, where, qa, "id", (str, int))
        qid = str(qid)
        if qid in seen:
          raise located(path, None, f"question {qid}: id repeated (first at {seen[qid]})")
        seen[qid] = where
        examples.append(_example(path, f"question {qid}", qa, qid, title, context))
  return SquadSplit(name, tuple(examples), str(path), str(version))


def _field(path, where, container, key, kind):
  """``container[key]`` (or ``container`` itself for key None), checked to be a ``kind``."""
  if key is None:
    value = container
  elif key not in container:
    raise located(path, None, f"{where}: missing field {key!r}")
  else:
    value = container[key]
  if not isinstance(value, kind) or isinstance(value, bool):
    kinds = kind if isinstance(kind, tuple) else (kind,)
    expected = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
    what = f"field {key!r}" if key is not None else "entry"
    raise located(path, None, f"{where}: {what} must be {expected}, got {type(value).__name__}")
  return value


_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer"}


def _example(path, where, qa, qid, title, context) -> QAExample:
  question = _field(path, where, qa, "question", str)
  if not question.strip():
    raise located(path, None, f"{where}: empty question")
  impossible = qa.get("is_impossible", False)
  if not isinstance(impossible, bool):
    raise located(path, None, f"{where}: field 'is_impossible' must be true or false")
  answers = _field(path, where, qa, "answers", list)
  if impossible and answers:
    raise located(path, None, f"{where}: is_impossible is true but it has {len(answers)} answers")
  if not impossible and not answers:
    raise located(path, None, f"{where}: no answers (and not is_impossible)")
  texts, starts = [], []
  for a, answer in enumerate(answers):
    at = f"{where}: answer {a}"
    answer = _field(path, at, answer, None, dict)
    text = _field(path, at, answer, "text", str)
    start = _field(path, at, answer, "answer_start", int)
    if not text.strip():
      raise located(path, None, f"{at}: empty answer text")
    found = context[start : start + len(text)] if start >= 0 else ""
    if found != text:
      raise located(
          path,
          None,
          f"{at}: text {text!r} does not match the context at answer_start={start} "
          f"(context[{start}:{start + len(text)}] = {found!r}; context has {len(context)} "
          f"characters)",
      )
    texts.append(text)
    starts.append(start)
  return QAExample(qid, title, context, question, tuple(texts), tuple(starts), impossible)


# ------------------------------------------------------------------------------ splits


def article_is_held_out(title: str, eval_fraction: float = EVAL_FRACTION) -> bool:
  """Whether the article ``title`` belongs to the held-out evaluation part (module docstring)."""
  if not 0.0 <= eval_fraction <= 1.0:
    raise ValueError(f"eval_fraction must lie in [0, 1], got {eval_fraction!r}")
  digest = hashlib.sha256(title.encode("utf-8", "surrogatepass")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def split_by_article(
    split: SquadSplit, eval_fraction: float = EVAL_FRACTION
) -> tuple[SquadSplit, SquadSplit]:
  """(train, dev): the questions of the kept and of the held-out articles of ``split``."""
  held_out = {title: article_is_held_out(title, eval_fraction) for title in split.titles}
  parts = {}
  for name, side in (("train", False), ("dev", True)):
    examples = tuple(e for e in split.examples if held_out[e.title] == side)
    if not examples:
      raise DataError(
          f"{split.source}: splitting {len(held_out)} articles by title with "
          f"eval_fraction={eval_fraction} leaves no questions for {name!r}"
      )
    parts[name] = dataclasses.replace(split, name=name, examples=examples)
  return parts["train"], parts["dev"]


def squad_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
  """``data_dir``, else ``$NEARPROX_SQUAD_DIR``, else None."""
  if data_dir is not None:
    return Path(data_dir)
  from_env = os.environ.get(SQUAD_DIR_ENV)
  return Path(from_env) if from_env else None


def squad_files(data_dir: str | os.PathLike | None = None) -> tuple[Path | None, Path]:
  """(train file or None, dev file) in ``data_dir`` (default ``$NEARPROX_SQUAD_DIR``).

  ``data_dir`` is a directory holding ``dev-v1.1.json`` or ``dev-v2.0.json`` and optionally
  the matching ``train-v*.json``, or a single JSON file (then split by article).
  """
  root = squad_dir(data_dir)
  if root is None:
    raise DataError(
        f"no SQuAD data: pass data_dir= (a folder with dev-v1.1.json, or the file), set "
        f"${SQUAD_DIR_ENV}, or pass train_file=/dev_file="
    )
  if root.is_file():
    return None, root
  if not root.is_dir():
    raise DataError(f"{root}: no such file or directory")

  def one(names):
    found = [root / name for name in names if (root / name).is_file()]
    if len(found) > 1:
      raise DataError(
          f"{root}: both {found[0].name} and {found[1].name}; pass train_file=/dev_file="
      )
    return found[0] if found else None

  train, dev = one(TRAIN_FILENAMES), one(DEV_FILENAMES)
  if dev is None:
    raise DataError(f"{root}: no {' or '.join(DEV_FILENAMES)}")
  if train is not None and train.name[len("train") :] != dev.name[len("dev") :]:
    raise DataError(f"{root}: {train.name} and {dev.name} are different SQuAD versions")
  return train, dev


def load_squad(
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_file: str | os.PathLike | None = None,
    dev_file: str | os.PathLike | None = None,
    eval_fraction: float = EVAL_FRACTION,
) -> SquadSplit:
  """The "train" or "dev" questions of SQuAD.

  With a train file (``train_file=``, or ``train-v*.json`` in ``data_dir``), "train" reads
  it whole and "dev" reads the dev file whole (the official pair). Without one, the dev file
  is split by article (:func:`split_by_article` with ``eval_fraction``) into "train" (kept
  articles) and "dev" (held-out articles).

  Args:
    split: "train" or "dev" ("validation"/"eval" accepted).
    data_dir: a folder with the files, or one JSON file (:func:`squad_files`); default
      ``$NEARPROX_SQUAD_DIR``. Not read when ``dev_file`` is given.
    train_file, dev_file: explicit files (``train_file`` alone: the dev file from ``data_dir``).
    eval_fraction: the held-out fraction of articles (by title hash) without a train file.
  """
  name = canonical_split(split)
  if name == "test":
    raise DataError("SQuAD has no labeled test split; use 'train' or 'dev'")
  if dev_file is None:
    found_train, dev_file = squad_files(data_dir)
    train_file = train_file if train_file is not None else found_train
  if train_file is not None:
    return read_squad_json(train_file if name == "train" else dev_file, name)
  train, dev = split_by_article(read_squad_json(dev_file), eval_fraction)
  return train if name == "train" else dev


# ------------------------------------------------------------------------------ features


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
    _save(path, dataclasses.asdict(features))
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
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as stored:
      arrays = {key: stored[key] for key in _FEATURE_KEYS}
  except (OSError, KeyError, ValueError, EOFError):
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


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes to a temporary file and renames it (readers never see a partial file)."""
  temporary = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False
    ) as file:
      temporary = Path(file.name)
      np.savez_compressed(file, **arrays)
    os.replace(temporary, path)
  except OSError as error:
    warnings.warn(
        f"could not write tokenization cache {path}: {error}; continuing without it",
        RuntimeWarning,
        stacklevel=3,
    )
    if temporary is not None:
      temporary.unlink(missing_ok=True)


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
    "DEV_FILENAMES",
    "EVAL_FRACTION",
    "SQUAD_DIR_ENV",
    "TRAIN_FILENAMES",
    "QAExample",
    "SquadFeatures",
    "SquadSplit",
    "article_is_held_out",
    "encode_squad",
    "feature_answer_texts",
    "load_squad",
    "read_squad_json",
    "split_by_article",
    "squad_cache_key",
    "squad_dir",
    "squad_files",
]
