"""Orbax checkpoints of the training state: every N steps (or minutes), keep k, resume, fall back.

A save is atomic (orbax writes a temporary directory and renames it), so an interrupted save
leaves no checkpoint behind. A checkpoint that is there but cannot be read (a corrupted or
truncated file) is skipped with a warning, the previous one is restored instead, and the
unreadable one is deleted: orbax saves no step at or below its newest one, so a kept broken
checkpoint would block the saves of the steps trained again.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)


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
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), template)
    restored, unreadable = template, []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as error:  # noqa: BLE001 — any unreadable checkpoint: try an older one
        logger.warning(
            "checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
            step,
            self.manager.directory,
            type(error).__name__,
            str(error)[:200],
        )
        unreadable.append(step)
        continue
      logger.info("resumed from the checkpoint at step %d", step)
      break
    for step in unreadable:
      self.manager.delete(step)
    return restored
