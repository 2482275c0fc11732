"""SQuAD extractive question answering: the official JSON files → questions, split by article.

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

The window features the model trains on: :mod:`nearprox.text.data.squad_features`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

from nearprox.text.data.tasks import DataError, canonical_split, located

SQUAD_DIR_ENV = "NEARPROX_SQUAD_DIR"
EVAL_FRACTION = 0.25
TRAIN_FILENAMES = ("train-v1.1.json", "train-v2.0.json")
DEV_FILENAMES = ("dev-v1.1.json", "dev-v2.0.json")


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


__all__ = [
    "DEV_FILENAMES",
    "EVAL_FRACTION",
    "SQUAD_DIR_ENV",
    "TRAIN_FILENAMES",
    "QAExample",
    "SquadSplit",
    "article_is_held_out",
    "load_squad",
    "read_squad_json",
    "split_by_article",
    "squad_dir",
    "squad_files",
]
