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
  """The records of a JSON-lines file such as ``workdir/metrics.jsonl`` ([] if it is absent)."""
  path = Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricWriter:
  """Writes scalars to ``workdir/tensorboard`` (tensorboardX) and ``workdir/metrics.jsonl``.

  Only the main process writes (``enabled``); other processes get no-ops. A run resumed from
  the checkpoint at ``from_step`` keeps the JSON-lines rows up to that step and drops later
  ones: those steps are trained again and logged anew.
  """

  def __init__(self, workdir: str | Path, enabled: bool = True, from_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(workdir / "metrics.jsonl")
    if any(row["step"] > from_step for row in rows):
      kept = "".join(json.dumps(row) + "\n" for row in rows if row["step"] <= from_step)
      (workdir / "metrics.jsonl").write_text(kept)
    self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))
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
