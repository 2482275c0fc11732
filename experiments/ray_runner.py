"""Trains the runs a study pass asked for, as Ray tasks, and stores each record as it lands.

One task per run (:func:`train`): Ray schedules them on the resources each asks for (1 CPU
by default, or a GPU or a fraction of one), retries a task whose worker process died
(``max_retries``; the retry resumes from the run's orbax checkpoints in ``workdir/<key>``),
and the driver writes each record to the run store the moment its task returns, so an
interrupted invocation loses no finished run. A Python error in a run is not retried: it is
logged with its traceback, the run is left out of the tables, and the others go on.

Local by default: ``ray.init()`` starts Ray on this machine with nothing to set up. On several
machines, start a Ray cluster and pass its address (``--ray_address=HOST:6379``): each node
needs the repository at the same path and its packages, and ``--workdir`` on a filesystem all
nodes share, so a retried run finds its checkpoints. Records land on the driver's machine.

A multi-device run (host devices, for the Gram's multi-device modes) gets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` through Ray's runtime environment,
which sets it before the task's process imports JAX; every task runs in a fresh process.
A one-device task that asks for one CPU or less also gets single-threaded XLA CPU kernels
(:data:`SINGLE_THREAD_XLA_FLAGS`): XLA's thread pool is sized to the machine's cores, so runs
packed one per core would each start a pool of all of them and contend for the cores.

Stopping: Ctrl-C, SIGTERM or ``deadline`` writes ``workdir/STOP``; each running task then
sends itself SIGTERM, so the training loop saves a checkpoint at its current step and stops
(the run is resumed by the next invocation); queued tasks are cancelled (those of runs
with a folder in ``workdir`` return without training).

Where a checkpoint left half-way would be lost (a machine whose ``workdir`` does not outlive
the invocation), ``expected_seconds`` makes a task that starts too late to end before the
deadline return at once instead (``deferred``): the next invocation trains it from the start,
and the slot goes to a run that fits.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ray

from experiments import run_process, runs

STOP_FILE = "STOP"
# One thread for XLA's CPU kernels. Two eq. 8 training runs side by side on 2 cores, the same
# config, 15 timed steps each after 2 warm-up steps (2026-12-07, machine otherwise idle):
# median step 3.31 s / 3.31 s with these flags against 3.59 s / 3.67 s without (compile
# 30 s vs 32 s); throughput about 1.1× for the studies' one-CPU runs.
SINGLE_THREAD_XLA_FLAGS = ("--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1")
# Environment variables a run reads (data folders, offline switches), passed to every task
# so that nodes of a cluster see the driver's.
_PASSED_ENV_PREFIXES = ("NEARPROX_", "HF_", "JAX_")


@dataclasses.dataclass
class Outcome:
  """What one :func:`train` call did, by run key."""

  trained: list[str] = dataclasses.field(default_factory=list)
  failed: dict[str, str] = dataclasses.field(default_factory=dict)
  stopped: list[str] = dataclasses.field(default_factory=list)  # checkpointed, to resume
  deferred: list[str] = dataclasses.field(default_factory=list)  # not started: would not end
  interrupted: str | None = None  # why the invocation was stopped (None: it was not)


def _sigterm_on(stop_file: Path, finished: threading.Event) -> None:
  """Sends this process SIGTERM once ``stop_file`` exists, unless the run finished first."""
  while not finished.wait(2.0):
    if stop_file.exists():
      os.kill(os.getpid(), signal.SIGTERM)
      return


@ray.remote(max_calls=1)  # a fresh process per run: its own XLA_FLAGS, no memory carried over
def _train_task(
    request: runs.Request,
    workdir: str,
    end_by: float | None = None,
    expected_seconds: float | None = None,
) -> dict:
  stop_file = Path(workdir) / STOP_FILE
  if stop_file.exists():
    return {"status": "not started"}
  if end_by is not None and expected_seconds is not None:
    left = end_by - time.time()
    if expected_seconds > left:
      return {
          "status": "deferred",
          "message": f"{request.label}: expected to take about {expected_seconds / 60:.0f} min, "
          f"{max(left, 0) / 60:.0f} min left before the stop; left for the next invocation",
      }
  (Path(workdir) / request.key).mkdir(parents=True, exist_ok=True)  # started (see train)
  config = runs.apply_overrides(request.config, {"progress": False})  # the driver reports it
  finished = threading.Event()
  threading.Thread(target=_sigterm_on, args=(stop_file, finished), daemon=True).start()
  try:
    result = run_process.execute(
        config,
        Path(workdir) / request.key,
        request.attack,
        request.label,
        request.key,
        request.devices,
    )
  except run_process.RunPreempted as stopped:
    return {"status": "stopped", "message": str(stopped)}
  finally:
    finished.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a late notice must not kill the result
  return {"status": "done", "result": result}


def saved_step(workdir: Path, key: str) -> int:
  """The step of run ``key``'s latest checkpoint in ``workdir`` (0: none)."""
  saved = workdir / key / "checkpoints"
  steps = [int(p.name) for p in saved.iterdir() if p.name.isdigit()] if saved.is_dir() else []
  return max(steps, default=0)


def in_order(
    requests: list[runs.Request], workdir: Path, first: Sequence[str] = ()
) -> list[tuple[runs.Request, int]]:
  """(request, step of its checkpoint or 0): the runs stopped with a checkpoint first, the
  furthest along first (their steps count only once they end), then those whose label
  contains one of ``first``, then the rest in request order."""
  steps = {r.key: saved_step(workdir, r.key) for r in requests}
  done = lambda r: steps[r.key] / r.config.num_train_steps
  later = lambda r: not asked_first(r, first)
  return [(r, steps[r.key]) for r in sorted(requests, key=lambda r: (-done(r), later(r)))]


def asked_first(request: runs.Request, first: Sequence[str]) -> bool:
  return any(part in request.label for part in first)


def this_pass(requests: list[runs.Request], first: Sequence[str]) -> list[runs.Request]:
  """The runs a pass of the driver trains: while any run is labelled with one of ``first``,
  those alone, so that the runs their results decide (a tuning's reported runs, asked for
  only once the tuning is complete) join the next pass ahead of everything else; then all."""
  return [r for r in requests if asked_first(r, first)] or requests


def runtime_env(devices: int, cpus: float = 1.0) -> dict:
  """The task's environment: the repository on ``PYTHONPATH``, the driver's commit and run
  settings, for ``devices`` > 1 that many host devices on the CPU backend, and for a
  one-device run with ``cpus`` ≤ 1 single-threaded XLA CPU kernels (module docstring)."""
  env = {k: v for k, v in os.environ.items() if k.startswith(_PASSED_ENV_PREFIXES)}
  env["PYTHONPATH"] = os.pathsep.join(
      p for p in (str(run_process.REPO), os.environ.get("PYTHONPATH")) if p
  )
  env[run_process.COMMIT_ENV] = run_process.git_commit()
  # The run's own host device count, whatever the driver's environment forces.
  flags = [
      f
      for f in os.environ.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count")
  ]
  flags.append(f"--xla_force_host_platform_device_count={devices}")
  if cpus <= 1 and devices == 1:  # host devices share the pool: left as they were
    flags += [f for f in SINGLE_THREAD_XLA_FLAGS if f not in flags]
  if devices > 1:
    env["JAX_PLATFORMS"] = "cpu"  # the multi-device study is about host devices
  env["XLA_FLAGS"] = " ".join(flags)
  return {"env_vars": env}


def task_options(
    request: runs.Request, cpus: float, gpus: float, max_retries: int, memory_gib: float = 0.0
) -> dict:
  """Ray options of ``request``'s task. ``memory_gib`` > 0 reserves that much of Ray's memory
  resource (its logical share of the node's RAM): Ray then starts no two such runs whose
  reservations exceed it at once, where counting CPUs alone would start two runs whose XLA
  temporaries together exceed the machine's memory (its OOM killer ends one of them)."""
  options = {
      "num_cpus": cpus,
      "num_gpus": gpus,
      "max_retries": max_retries,
      "retry_exceptions": False,
      "runtime_env": runtime_env(request.devices, cpus),
  }
  if memory_gib > 0:
    options["memory"] = int(memory_gib * 2**30)
  return options


def progress_line(label: str, metrics_path: Path, total_steps: int) -> str | None:
  """``[progress] label: step s/N, x s/step, about m min of training left`` from the run's
  ``metrics.jsonl`` (None before its first logged step)."""
  from nearprox.training.metrics_writer import read_jsonl

  if not metrics_path.exists():
    return None
  rows = [row for row in read_jsonl(metrics_path) if "train/step_time" in row]
  if not rows:
    return None
  step, seconds = rows[-1]["step"], rows[-1]["train/step_time"]
  left = max(total_steps - step, 0) * seconds / 60
  return (
      f"[progress] {label}: step {step}/{total_steps}, {seconds:.2f} s/step, "
      f"about {left:.0f} min of training left"
  )


def train(
    requests: list[runs.Request],
    store: runs.RunStore,
    *,
    workdir: Path,
    cpus_per_run: float = 1.0,
    gpus_per_run: float = 0.0,
    max_retries: int = 2,
    deadline: float | None = None,
    progress_seconds: float = 600.0,
    first: Sequence[str] = (),
    memory_gib: Callable[[runs.Request], float] | None = None,
    expected_seconds: Callable[[runs.Request], float | None] | None = None,
    log: Callable[[str], None] = print,
) -> Outcome:
  """Trains ``requests`` in parallel on Ray (``ray.init()`` first if Ray is not running) and
  saves each record to ``store`` as its task returns.

  Runs stopped earlier with a checkpoint go first, then those labelled with one of ``first``
  (:func:`in_order`). ``memory_gib(request)``: the memory a run asks Ray for (:func:`task_options`).
  At ``deadline`` (a ``time.time()``)
  or on Ctrl-C / SIGTERM the running tasks checkpoint and stop (module docstring). With a
  deadline, ``expected_seconds(request)`` (None: unknown, start it) is how long a run takes
  from its start; a run resumed at step s of N is expected to need the share (N − s) / N of it,
  and one whose task starts too late for that is deferred, not started.
  """
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / STOP_FILE).unlink(missing_ok=True)
  if not ray.is_initialized():
    ray.init(include_dashboard=False, log_to_driver=True)
  pending = {}
  for request, step in in_order(requests, workdir, first):
    resumed = f", from its checkpoint at step {step}" if step else ""
    log(f"[run] {request.label} ({request.key}{resumed})")
    memory = memory_gib(request) if memory_gib else 0.0
    task = _train_task.options(
        **task_options(request, cpus_per_run, gpus_per_run, max_retries, memory)
    )
    expected = expected_seconds(request) if expected_seconds and deadline is not None else None
    if expected is not None:
      expected *= 1 - step / request.config.num_train_steps
    pending[task.remote(request, str(workdir), deadline, expected)] = request
  outcome = Outcome()
  stop = _Stopper(workdir, log)
  next_progress = time.time() + progress_seconds
  try:
    while pending:
      if stop.why:
        _drop_unstarted(pending, workdir)
      # Wake for the next progress report, or the deadline while it is still ahead; once
      # stopped, the runs take a while to checkpoint and the loop must not spin meanwhile.
      wake = next_progress
      if deadline is not None and not stop.why:
        wake = min(wake, deadline)
      done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, wake - time.time()))
      if deadline is not None and time.time() >= deadline:
        stop("the deadline")
      if done:
        _collect(done[0], pending.pop(done[0]), store, outcome, log)
      elif time.time() >= next_progress:
        for request in pending.values():
          line = progress_line(
              request.label, workdir / request.key / "metrics.jsonl", request.config.num_train_steps
          )
          if line:
            log(line)
        next_progress = time.time() + progress_seconds
  finally:
    stop.restore()
  outcome.interrupted = stop.why
  return outcome


def _drop_unstarted(pending: dict, workdir: Path) -> None:
  """Cancels the queued tasks of runs that never started (no run folder in ``workdir``), so
  a stop does not wait for a fresh worker per queued run to see the STOP file."""
  for ref, request in list(pending.items()):
    if not (workdir / request.key).exists():
      ray.cancel(ref)
      del pending[ref]


def _collect(ref, request: runs.Request, store, outcome: Outcome, log) -> None:
  """Stores (or reports) what the task of ``request`` returned."""
  try:
    answer = ray.get(ref)
  except ray.exceptions.RayError as error:  # the run raised, or its retries died too
    log(f"[failed] {request.label} ({request.key}):\n{error}")
    outcome.failed[request.key] = request.label
    return
  if answer["status"] == "done":
    result = answer["result"]
    store.save(result)
    outcome.trained.append(request.key)
    report = result["report"]
    metrics = {k: v for k, v in report.items() if k in ("holdout", "dev", "test")}
    # The run's own wall time (every segment, pauses included), not the time since it was
    # queued: a run that waited for a free CPU did not take that long.
    log(
        f"[done] {request.label}: {metrics} step {report['train_step_seconds']:.3f}s, "
        f"{result['wall_seconds']:.0f}s"
    )
  elif answer["status"] == "stopped":
    outcome.stopped.append(request.key)
    log(f"[stopped] {answer['message']}")
  elif answer["status"] == "deferred":
    outcome.deferred.append(request.key)
    log(f"[deferred] {answer['message']}")


class _Stopper:
  """Writes the STOP file on Ctrl-C / SIGTERM (or when called), once; ``restore`` puts the
  previous signal handlers back."""

  def __init__(self, workdir: Path, log):
    self.workdir, self.log, self.why = workdir, log, None
    self.previous = {
        signum: signal.signal(signum, lambda signum, _: self(signal.Signals(signum).name))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }

  def __call__(self, why: str) -> None:
    if self.why is None:
      self.why = why
      self.log(f"[stop] {why}: running runs save a checkpoint and stop; rerun to resume")
      (self.workdir / STOP_FILE).touch()

  def restore(self) -> None:
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
