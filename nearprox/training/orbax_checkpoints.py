"""Orbax checkpoints of the training state: every N steps (or minutes), keep k, resume, fall back.

A save is atomic (orbax writes a temporary directory and renames it), so an interrupted save
leaves no checkpoint behind. A checkpoint that is there but cannot be read (a corrupted or
truncated file) is skipped with a warning, the previous one is restored instead, and the
unreadable one is deleted: orbax saves no step at or below its newest one, so a kept broken
checkpoint would block the saves of the steps trained again. :func:`restore_latest` reads a
workdir's checkpoints outside a training (the translate command) and deletes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)
DIRNAME = "checkpoints"  # in a training workdir


def _now() -> datetime.datetime:
  return datetime.datetime.now(datetime.UTC)


@dataclasses.dataclass(kw_only=True)
class MinutesSinceSaveOrStart(ocp.checkpoint_managers.ContinuousCheckpointingPolicy):
  """orbax's time-based policy (decided on the primary host, told to the others), with the
  clock also started when the policy is made: orbax alone saves at the first step when no
  checkpoint exists, and at the first step after resuming from one older than the interval."""

  started: datetime.datetime = dataclasses.field(default_factory=_now)

  def should_save(self, step, previous_steps, *, context) -> bool:
    previous = list(previous_steps)
    if not previous or previous[-1].time < self.started:
      start = ocp.checkpoint_manager.CheckpointInfo(step=step.step, time=self.started, metrics=None)
      previous.append(start)  # a save-time without a checkpoint: the clock's start
    return super().should_save(step, previous, context=context)


class Checkpoints:
  """Saves the state into ``directory`` every ``every`` steps, and also at the first step
  ``minutes`` after the previous save (or after this object was made) when ``minutes`` is
  given; keeps the last ``keep``."""

  def __init__(self, directory: str | Path, every: int, keep: int, minutes: float | None = None):
    if every < 1 or keep < 1:
      raise ValueError(f"checkpoint_every and keep_checkpoints must be >= 1, got {every}, {keep}")
    if minutes is not None and not minutes > 0:
      raise ValueError(f"checkpoint_minutes must be > 0 or None, got {minutes}")
    policies = ocp.checkpoint_managers
    when = [policies.FixedIntervalPolicy(every)]
    if minutes is not None:
      when.append(MinutesSinceSaveOrStart(minimum_interval_secs=round(minutes * 60)))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, save_decision_policy=policies.AnySavePolicy(when)
    )
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore_latest(self, template):
    """The newest readable checkpoint, shaped like ``template``; ``template`` if none.
    Unreadable checkpoints newer than the one restored are deleted."""
    restored, step, unreadable = _newest_readable(self.manager, template)
    if restored is not None:
      logger.info("resumed from the checkpoint at step %d", step)
    for step in unreadable:
      self.manager.delete(step)
    return template if restored is None else restored


def restore_latest(directory: str | Path, template) -> tuple[Any, int] | None:
  """(state, step) of the newest readable checkpoint in ``directory``, shaped like
  ``template`` (arrays or ``jax.ShapeDtypeStruct``); None when there is none. Read only:
  unreadable checkpoints are skipped with a warning and kept (a training may own them)."""
  directory = Path(directory).absolute()
  if not directory.is_dir():
    return None
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(directory, options=options)
  try:
    restored, step, _ = _newest_readable(manager, template)
  finally:
    manager.close()
  return None if restored is None else (restored, step)


def _newest_readable(manager, template):
  """(the newest checkpoint that restores, or None; its step; the newer unreadable steps)."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), template)
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # noqa: BLE001 — any unreadable checkpoint: try an older one
      logger.warning(
          "checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
          step,
          manager.directory,
          type(error).__name__,
          str(error)[:200],
      )
      unreadable.append(step)
      continue
    return restored, step, unreadable
  return None, None, unreadable
