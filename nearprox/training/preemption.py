"""SIGTERM during training (preemptible VMs, TPU pods): the loop's checkpoint-and-stop notice
and the exception raised for work after the final checkpoint (:mod:`nearprox.training.train`).
"""

import contextlib
import signal

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """SIGTERM arrived inside :func:`stop_on_sigterm`."""


@contextlib.contextmanager
def preemption_notice():
  """Yields ``reached(step)``, to be called at every training step: True when the loop should
  save a checkpoint at ``step`` and stop.

  One process: True once SIGTERM has arrived (a handler records it). Several processes
  (``jax.distributed``): JAX's preemption service owns SIGTERM; a notice to any process
  reaches all of them, and ``reached`` turns True on all of them at the same step (one past
  the largest any of them had reached), so their collectives and checkpoint saves match. A
  handler of our own would stop each process at its own step and leave the others waiting
  at a collective.
  """
  if jax.process_count() > 1:
    yield multihost_utils.reached_preemption_sync_point
    return
  received = []
  previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
  try:
    yield lambda step: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stop_on_sigterm():
  """Turns SIGTERM into :class:`Preempted` raised where the work is (outside the training
  loop, which instead finishes its step and checkpoints it): for work after the final
  checkpoint, which a rerun resumed from it redoes.

  Several processes: does nothing. JAX's preemption service keeps SIGTERM
  (:func:`preemption_notice`), and a process that stopped alone mid-evaluation would leave
  the others waiting at a collective; they all finish the work unless killed, and a rerun
  redoes it from the final checkpoint.
  """
  if jax.process_count() > 1:
    yield
    return

  def stop(*_):
    raise Preempted("SIGTERM")

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
