"""Several ``reproduce --claim_runs`` processes training one run store at once.

On a GPU with room for several runs, or on a CPU where single-core workers do more steps per
second in total than one process using every core (experiments/bench_workers.py), N worker
processes share the run store; each takes a run by claiming it (:class:`runs.Executor`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from experiments.run_process import PREEMPTED_EXIT_CODE, REPO


def cpu_shares(workers: int) -> list[list[int]]:
  """The CPUs this process may use, split into ``workers`` disjoint, nearly equal shares
  (in order); more workers than CPUs is an error, since shares would overlap."""
  cpus = sorted(os.sched_getaffinity(0))
  if workers > len(cpus):
    raise ValueError(f"cannot pin {workers} workers to {len(cpus)} CPUs (one CPU each at least)")
  return [cpus[i * len(cpus) // workers : (i + 1) * len(cpus) // workers] for i in range(workers)]


def pinned_prefixes(workers: int) -> list[list[str]]:
  """``taskset`` command prefixes putting process i on the i-th of :func:`cpu_shares`."""
  taskset = shutil.which("taskset")
  if taskset is None:
    raise RuntimeError("pinning processes needs `taskset` (util-linux), not found on PATH")
  return [[taskset, "--cpu-list", ",".join(map(str, share))] for share in cpu_shares(workers)]


def run_workers(
    command: list[str],
    workers: int,
    runs_dir: Path,
    deadline: float | None,
    log: Callable[[str], None] = print,
    poll_seconds: float = 5.0,
    pin: bool = False,
) -> bool:
  """Runs ``command`` (a ``reproduce --claim_runs`` invocation) in ``workers`` processes at
  once until none has anything left to do; True when a signal stopped them (see below).

  ``pin``: worker i runs on the i-th share of this process's CPUs (:func:`cpu_shares`, through
  ``taskset``), so XLA sizes its thread pool to that share instead of every worker using
  every core. On a CPU several single-core workers do more steps per second in total than
  one process using all cores; each run records the cores it had (its ``machine``).

  A process that ends is started again unless no run landed in ``runs_dir`` during its pass
  (it found nothing to train: the rest was claimed by others or waits for a choice); a run
  landing later wakes such idle workers, since it may decide a stage (a tuning choice) that
  opens new runs. No process starts after ``deadline`` (``time.time()``; None: none), and each
  gets ``--stop_after`` for the time left. At the deadline the processes still running get
  SIGTERM: a run in training saves a checkpoint at its current step and stops (a later
  invocation resumes it), so the deadline bounds the sitting, not only the starts.

  Stopping by hand: SIGTERM or SIGINT (Ctrl-C) to this process does the same as the
  deadline at once: SIGTERM to every worker, none starts again, and this returns True once
  they have saved their checkpoints. The workers run in their own sessions, so a Ctrl-C in
  the terminal reaches only this process, which stops them with SIGTERM (a SIGINT would cut
  a run short without its checkpoint). A worker that exits after a SIGTERM sent to it alone
  (status ``PREEMPTED_EXIT_CODE``) is not started again in this invocation.
  """
  count = lambda: sum(1 for _ in runs_dir.glob("*.json"))
  prefix = pinned_prefixes(workers) if pin else [[] for _ in range(workers)]
  running: dict[int, tuple[subprocess.Popen, int]] = {}
  idle: set[int] = set()  # found nothing to train; started again when a run lands
  halted: set[int] = set()  # stopped by a SIGTERM of their own; never started again
  signalled: list[int] = []
  previous = {
      s: signal.signal(s, lambda received, _: signalled.append(received))
      for s in (signal.SIGTERM, signal.SIGINT)
  }
  stopped = False
  try:
    while True:
      past_deadline = deadline is not None and time.time() >= deadline
      if (signalled or past_deadline) and running and not stopped:
        reason = (
            f"{signal.Signals(signalled[0]).name} received" if signalled else "the deadline passed"
        )
        log(
            f"[workers] {reason}: SIGTERM to {len(running)} running worker(s); their runs save "
            "a checkpoint and resume from it in the next invocation"
        )
        for process, _ in running.values():
          process.send_signal(signal.SIGTERM)
        stopped = True
      for i in range(workers):
        left = None if deadline is None else deadline - time.time()
        if i in running or i in idle or i in halted or signalled or stopped:
          continue
        if left is not None and left <= 0:
          continue
        stop = [] if left is None else [f"--stop_after={left / 60:.3f}"]
        process = subprocess.Popen([*prefix[i], *command, *stop], cwd=REPO, start_new_session=True)
        running[i] = (process, count())
      if not running:
        return bool(signalled)
      time.sleep(poll_seconds)
      for i, (process, stored_before) in list(running.items()):
        if process.poll() is None:
          continue
        del running[i]
        if process.returncode == PREEMPTED_EXIT_CODE and not stopped:
          log(
              f"[worker {i}] stopped by a SIGTERM sent to it (its run saved a checkpoint); "
              "not started again in this invocation"
          )
          halted.add(i)
          continue
        if process.returncode and not stopped:
          log(f"[worker {i}] exited with status {process.returncode}")
        if count() == stored_before:
          idle.add(i)
        else:
          idle.clear()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
