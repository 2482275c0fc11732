"""A training run's progress as log lines, for studies whose runs train without a progress bar.

Several workers share one log (experiments/workers.py), where a bar's carriage returns would
interleave; instead, while a run trains, a line like

    [progress] optimizers:sst2:adamw:seed=0: step 340/600, 4.61 s/step, about 20 min of training left

is logged every few minutes from the run's ``metrics.jsonl`` (the rows the trainer writes
every ``log_every`` steps), whichever process trains it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path


def latest_training_row(metrics_path: Path) -> dict | None:
  """The last row of ``metrics.jsonl`` with a training step time (None: none yet)."""
  from nearprox.training.metrics_writer import read_jsonl  # imports JAX: only once training

  rows = [row for row in read_jsonl(metrics_path) if "train/step_time" in row]
  return rows[-1] if rows else None


def progress_line(label: str, row: dict, total_steps: int) -> str:
  """The log line for a run at ``row`` (a ``metrics.jsonl`` row) of ``total_steps``."""
  seconds = row["train/step_time"]
  left = max(total_steps - row["step"], 0) * seconds / 60
  return (
      f"[progress] {label}: step {row['step']}/{total_steps}, {seconds:.2f} s/step, "
      f"about {left:.0f} min of training left"
  )


@contextlib.contextmanager
def logged_progress(
    label: str,
    metrics_path: Path,
    total_steps: int,
    log: Callable[[str], None],
    every_seconds: float | None,
) -> Iterator[None]:
  """Logs :func:`progress_line` every ``every_seconds`` (None: never) while the body runs, when
  the run has logged a training step since the last line."""
  if every_seconds is None:
    yield
    return
  done = threading.Event()

  def report() -> None:
    last_step = None
    while not done.wait(every_seconds):
      row = latest_training_row(metrics_path)
      if row is not None and row["step"] != last_step:
        log(progress_line(label, row, total_steps))
        last_step = row["step"]

  thread = threading.Thread(target=report, name=f"progress {label}", daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()
