"""Training metrics: TensorBoard event files, a JSON-lines log, and a console progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path


class _NoProgress:

  def update(self, n):
    pass

  def set_postfix(self, **kwargs):
    pass

  def close(self):
    pass


def read_jsonl(path: str | Path) -> list[dict]:
  """The records of a JSON-lines file such as ``workdir/metrics.jsonl`` ([] if it is absent).

  A last line that does not parse (a process killed while writing it) is left out; a broken
  line before the last is an error.
  """
  path = Path(path)
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = [json.loads(line) for line in lines[:-1]]
  try:
    records += [json.loads(line) for line in lines[-1:]]
  except json.JSONDecodeError:
    pass
  return records


def _drop_rows_after(path: Path, step: int) -> None:
  """Rewrites ``path`` (atomically) with its rows up to ``step``; also drops a partly written
  last line, which the next appended row would otherwise continue."""
  if not path.exists():
    return
  rows = [row for row in read_jsonl(path) if row["step"] <= step]
  temporary = path.with_suffix(".jsonl.tmp")
  temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
  temporary.replace(path)


class MetricWriter:
  """Writes scalars to ``workdir/tensorboard`` (tensorboardX) and ``workdir/metrics.jsonl``.

  Only the main process writes (``enabled``); other processes get no-ops. Rows are appended to
  an existing ``metrics.jsonl``; a run resumed from the checkpoint at ``from_step`` keeps the
  rows up to that step and drops later ones: those steps are trained again and logged anew.
  TensorBoard's event files are append-only; the new one tells TensorBoard to hide the old
  events after ``from_step``.
  """

  def __init__(self, workdir: str | Path, enabled: bool = True, from_step: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if from_step is not None:
      _drop_rows_after(workdir / "metrics.jsonl", from_step)
    # purge_step: a SessionLog.START event at from_step + 1, on which TensorBoard hides the
    # earlier processes' events from that step on, as the JSON-lines log drops them.
    purge_step = None if from_step is None else from_step + 1
    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"), purge_step=purge_step)
    self.jsonl = open(workdir / "metrics.jsonl", "a")

  def write_config(self, config) -> None:
    if self.enabled:
      self.tensorboard.add_text("config", "```\n" + str(config) + "\n```", 0)

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    record = {"step": step, "time": time.time(), **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(record) + "\n")
    self.jsonl.flush()

  def progress(self, total: int, initial: int, enabled: bool = True):
    """A tqdm bar with rate and ETA (nothing on other processes or when disabled)."""
    if not (self.enabled and enabled):
      return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()
      self.jsonl.close()
