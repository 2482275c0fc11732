"""Several classification tasks trained together: the task mix, the mixed batches, the scores.

**Sampling rule.** Every example of a training batch draws its task independently, task t
with probability

    p_t = n_t^{1/T} / Σ_s n_s^{1/T},

n_t the number of task t's training examples and T > 0 the temperature: T = 1 samples in
proportion to the data set sizes (every training example equally often), T → ∞ uniformly
over tasks (``float("inf")`` is allowed), T = 2 in proportion to √n_t. (Temperature sampling
as in multilingual translation, Arivazhagan et al. 2019, "Massively Multilingual Neural
Machine Translation in the Wild", arXiv 1907.05019; the mixing-rate survey of Raffel et al.
2020, T5, §3.5.2.) Within a task the examples come without replacement, epoch by epoch:
task t's e-th pass is a seeded permutation of its examples, continued across batches.

Everything is a pure function of (seed, step): step s's task draws come from
``default_rng([seed, 1, s])`` and task t's e-th permutation from ``default_rng([seed, 2, t,
e])``, so every host builds the same global batches and a run resumed at step s (which
replays the cheap task draws of the steps before it) sees the batches an uninterrupted run
would have seen.

**Scores.** Each task is evaluated on its own splits with its own metrics, reported under
``"<task>/<metric>"`` (``"sst2/accuracy"``, ``"mrpc/f1"``, ...), plus ``"mean"``: the mean of
the tasks' official (first) metrics, on a split that every task has (dev).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from nearprox.text.data.batching import host_slice
from nearprox.text.data.tasks import DataError, Task, get_task

MULTITASK = "multitask"  # config.task of a multi-task run; config.tasks names the tasks
MEAN = "mean"


def task_probabilities(sizes: Sequence[int], temperature: float) -> np.ndarray:
  """p_t = n_t^{1/T} / Σ_s n_s^{1/T} (module docstring); T = inf gives the uniform mix."""
  sizes = np.asarray(sizes, np.float64)
  if sizes.ndim != 1 or len(sizes) == 0 or (sizes <= 0).any():
    raise ValueError(f"sizes must be positive counts, got {sizes.tolist()}")
  check_temperature(temperature)
  if math.isinf(temperature):
    return np.full(len(sizes), 1.0 / len(sizes))
  # In logs: n^{1/T} overflows float64 for large n and small T.
  logits = np.log(sizes) / temperature
  weights = np.exp(logits - logits.max())
  return weights / weights.sum()


def check_temperature(temperature) -> None:
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
    raise ValueError(f"the task temperature must be a number > 0, got {temperature!r}")
  if not temperature > 0:  # also rejects NaN
    raise ValueError(f"the task temperature must be > 0 (1: proportional), got {temperature!r}")


@dataclasses.dataclass(frozen=True)
class MultiTask:
  """Classification tasks trained together on one encoder (``config.task = "multitask"``).

  Attributes:
    tasks: the tasks, in task-id order (example i of task ``tasks[t]`` has task id t).
    temperature: the sampling temperature T of :func:`task_probabilities`.

  Like a :class:`~nearprox.text.data.Task` it has a ``name`` ("multitask"), a ``kind``
  ("classification": each example's loss is its own head's cross-entropy), ``num_labels``
  (the widest head: the width of the padded logits) and ``metric_names``.
  """

  tasks: tuple[Task, ...]
  temperature: float

  name = MULTITASK
  kind = "classification"

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(task.name for task in self.tasks)

  @property
  def heads(self) -> tuple[tuple[str, int], ...]:
    """(task name, number of classes) per task: the model's heads."""
    return tuple((task.name, task.num_labels) for task in self.tasks)

  @property
  def num_labels(self) -> int:
    return max(task.num_labels for task in self.tasks)

  @property
  def display_name(self) -> str:
    return "multi-task (" + " + ".join(task.display_name for task in self.tasks) + ")"

  @property
  def description(self) -> str:
    return f"{self.display_name}, task sampling temperature {self.temperature:g}"

  @property
  def metric_names(self) -> tuple[str, ...]:
    """``"mean"``, then every task's ``"<task>/<metric>"``."""
    return (MEAN, *(f"{t.name}/{m}" for t in self.tasks for m in t.metric_names))

  @property
  def primary_metric(self) -> str:
    return MEAN

  def scores(self, by_task: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Flat ``{"<task>/<metric>": v}`` of each evaluated task's metrics, with ``"mean"`` of
    their official metrics when every task was evaluated."""
    flat = {f"{name}/{metric}": value for name, s in by_task.items() for metric, value in s.items()}
    if set(by_task) == set(self.names):
      flat[MEAN] = float(np.mean([by_task[t.name][t.primary_metric] for t in self.tasks]))
    return flat


def get_multitask(names: Sequence[str], temperature: float) -> MultiTask:
  """The :class:`MultiTask` of the named classification tasks; DataError/ValueError for an
  unknown or repeated name, fewer than two tasks, a task that is not classification (QA,
  translation), or a temperature ≤ 0."""
  if isinstance(names, str):
    raise DataError(f"the tasks of a multi-task run are a list of names, got the string {names!r}")
  names = tuple(names)
  if len(names) < 2:
    raise DataError(f"a multi-task run needs at least two tasks, got {names}")
  if len(set(names)) != len(names):
    raise DataError(f"the tasks of a multi-task run must differ, got {names}")
  tasks = tuple(get_task(name) for name in names)
  other = [t.name for t in tasks if t.kind != "classification"]
  if other:
    raise DataError(f"multi-task runs mix classification tasks; {other} are not classification")
  check_temperature(temperature)
  return MultiTask(tasks, float(temperature))


def mixed_batches(
    arrays: Mapping[str, np.ndarray],
    probabilities: Sequence[float],
    batch_size: int,
    *,
    seed: int = 0,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields the global batches of steps ``start_step``, ``start_step + 1``, ... (forever).

  ``arrays``: every task's training examples in one set of arrays with a common leading
  axis, ``arrays["task_ids"]`` the task of each row; ``probabilities[t]``: task t's share
  (:func:`task_probabilities`). A batch holds the arrays' rows, ``mask`` (all 1: nothing is
  padded) and ``index`` (the row in ``arrays``, which keys each example's randomness), and on
  several hosts this process's block of rows (``batching.host_slice``).
  """
  probabilities = np.asarray(probabilities, np.float64)
  task_ids = np.asarray(arrays["task_ids"])
  rows_of = [np.flatnonzero(task_ids == t) for t in range(len(probabilities))]
  empty = [t for t, rows in enumerate(rows_of) if len(rows) == 0]
  if empty:
    raise ValueError(f"tasks {empty} have no training rows")
  if not np.isclose(probabilities.sum(), 1.0) or (probabilities < 0).any():
    raise ValueError(f"probabilities must be a distribution, got {probabilities.tolist()}")
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be positive and divisible by {process_count}")
  streams = [_TaskStream(rows, seed, t) for t, rows in enumerate(rows_of)]
  step = 0
  while True:
    tasks = np.random.default_rng([seed, 1, step]).choice(
        len(probabilities), size=batch_size, p=probabilities
    )
    rows = np.empty(batch_size, np.int64)
    for t, stream in enumerate(streams):
      picked = np.flatnonzero(tasks == t)
      taken = stream.take(len(picked))
      if step >= start_step:
        rows[picked] = taken
    if step >= start_step:
      batch = {key: np.asarray(value)[rows] for key, value in arrays.items()}
      batch["mask"] = np.ones(batch_size, np.float32)
      batch["index"] = rows.astype(np.int32)
      yield host_slice(batch, process_index, process_count) if process_count > 1 else batch
    step += 1


class _TaskStream:
  """One task's rows, epoch after epoch, each epoch a seeded permutation."""

  def __init__(self, rows: np.ndarray, seed: int, task: int):
    self.rows, self.seed, self.task = rows, seed, task
    self.epoch, self.position, self.order = -1, len(rows), None

  def take(self, count: int) -> np.ndarray:
    out = []
    while count > 0:
      if self.position == len(self.rows):
        self.epoch, self.position = self.epoch + 1, 0
        rng = np.random.default_rng([self.seed, 2, self.task, self.epoch])
        self.order = self.rows[rng.permutation(len(self.rows))]
      part = self.order[self.position : self.position + count]
      out.append(part)
      self.position += len(part)
      count -= len(part)
    return np.concatenate(out) if out else np.zeros(0, np.int64)
