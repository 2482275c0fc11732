"""What one process does to train one run: train (or resume), attack, time, record.

:func:`execute` trains a resolved config in this process with
``nearprox.training.train.train_and_evaluate`` and returns the run's result, which
``experiments.runs.RunStore`` stores as ``<out>/runs/<key>.json``. Its fields: ``key``,
``label``, ``config`` (the resolved config), ``devices``, ``report``
(``train_and_evaluate``'s report without the params), ``history`` (the rows of
``metrics.jsonl``: train/loss, train/step_time, train/gram/*, dev/<metric> …; the report's
``predicted_classes`` counts, per evaluated split, the examples the final model assigns to
each class: a single non-zero count is a collapsed run), ``attack`` (rows of
:func:`nearprox.text.robustness.attack_accuracy` or None), ``segments`` (one per process that
trained the run and stopped or finished it: ``from_step``, ``to_step``,
``train_step_seconds``, ``wall_seconds`` including any time the process was paused,
``cpu_seconds`` = its user + system time over all threads, pauses excluded, ``machine``,
``commit``), ``wall_seconds`` and ``cpu_seconds`` (the segments' sums; a process killed
without SIGTERM, or crashed, leaves no segment: a gap between one segment's ``to_step`` and
the next one's ``from_step`` shows untimed steps), ``machine`` (of the segment that trained
the most steps, whose step time the report carries) and ``commit`` (of the process that
finished the run).

A run stopped by SIGTERM saves a checkpoint, records its segment and raises
:class:`RunPreempted`; the next :func:`execute` of the same key resumes there.
:mod:`experiments.ray_runner` calls :func:`execute` in a Ray task, whose process gets a
multi-device run's ``XLA_FLAGS`` from Ray's runtime environment before JAX is imported.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import ml_collections

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Attack:
  """Embedding-space PGD evaluation of the final params on ``examples`` dev examples."""

  epsilons: tuple[float, ...]
  num_steps: int
  examples: int


def write_json(path: Path, value) -> None:
  """``value`` as indented JSON at ``path``, written to a temporary file and renamed."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers sharing a store never collide
  tmp.write_text(json.dumps(value, indent=1, default=float))
  tmp.replace(path)  # atomic: an interrupted write never leaves a half file to "resume"


def _git(*args: str) -> str:
  command = ["git", "-C", str(REPO), *args]
  return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


COMMIT_ENV = "NEARPROX_GIT_COMMIT"


def git_commit() -> str:
  """``$NEARPROX_GIT_COMMIT`` when set (a copy of the tree on another machine, whose ``.git``
  may be absent or stale), else HEAD's hash with ``+dirty`` when tracked files differ from
  it, else ``unknown``."""
  if os.environ.get(COMMIT_ENV):
    return os.environ[COMMIT_ENV]
  try:
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return _git("rev-parse", "--short=12", "HEAD") + ("+dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine() -> dict[str, Any]:
  """Platform, CPU count, JAX devices and float32 matmul precision of this process."""
  import jax

  cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
      "platform": platform.platform(),
      "processor": platform.processor() or platform.machine(),
      "cpus": cpus,
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": len(jax.devices()),
      "device_kind": jax.devices()[0].device_kind,
      # GPUs may run float32 matmuls in TF32 unless this says "highest".
      "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
      # 1: single-threaded XLA CPU kernels (experiments.ray_runner.SINGLE_THREAD_XLA_FLAGS);
      # None: XLA's default pool of every core. Step times compare only within one.
      "xla_cpu_threads": xla_cpu_threads(),
  }


def xla_cpu_threads() -> int | None:
  """The intra-op thread count ``XLA_FLAGS`` sets for XLA's CPU kernels (None: not set)."""
  for flag in os.environ.get("XLA_FLAGS", "").split():
    if flag.lstrip("-").startswith("intra_op_parallelism_threads="):
      return int(flag.split("=", 1)[1])
  return None


def threads_label(machine: dict) -> str:
  """ ", 1 XLA thread" for a run whose machine record names its XLA CPU thread count, else ""
  (XLA's default pool, and records from before the field)."""
  threads = machine.get("xla_cpu_threads")
  return f", {threads} XLA thread{'' if threads == 1 else 's'}" if threads else ""


def host(machine: dict) -> str | None:
  """The host platform a run's machine record names (kernel build and architecture, without
  the C library suffix; None if unrecorded): CPU hosts with equal core counts still differ in
  speed, and this is the finest name of a host that every run file records."""
  platform = machine.get("platform")
  return platform.split("-with-")[0] if platform else None


class RunPreempted(Exception):
  """A run stopped by SIGTERM after saving a checkpoint (not a failure: rerun to resume)."""


def _segment(report: dict, started: float, cpu_started: float) -> dict:
  """What one process of a run did: the steps it trained, its times, machine and commit."""
  return {
      "from_step": report["start_step"],
      "to_step": report["steps"],
      "train_step_seconds": report["train_step_seconds"],
      "wall_seconds": time.time() - started,
      "cpu_seconds": cpu_seconds() - cpu_started,
      "machine": machine(),
      "commit": git_commit(),
  }


def cpu_seconds() -> float:
  """User + system CPU time of this process, all threads (it does not advance while the
  process is stopped, unlike the wall clock)."""
  times = os.times()
  return times.user + times.system


def _attack(config, params, attack: Attack) -> list[dict]:
  """Accuracy of the final params under the embedding-space PGD attack, on
  ``attack.examples`` dev examples."""
  import jax

  from nearprox.text import data, models, robustness
  from nearprox.training import train

  task = data.get_task(config.task)
  model, _, tokenizer = train.create_model(config, task.num_labels, jax.random.key(0))
  eval_config = ml_collections.ConfigDict(config.to_dict())
  eval_config.max_eval_examples = attack.examples
  dev = train.load_splits(eval_config, tokenizer)["dev"]
  return robustness.attack_accuracy(
      models.bert_logits_fn(model),
      params,
      list(data.batches(dev, config.eval_batch_size, shuffle=False)),
      attack.epsilons,
      hidden_size=model.config.hidden_size,
      num_steps=attack.num_steps,
  )


def execute(
    config, workdir: Path, attack: Attack | None, label: str, key: str, devices: int
) -> dict:
  """Trains in this process (and attacks); returns the result dict.

  ``workdir`` is named by the run's key, so checkpoints found there belong to this config
  (whatever commit wrote them, as for a stored run): a run stopped by SIGTERM resumes from its
  latest checkpoint. A stopped process appends its segment to ``workdir/segments.json`` and
  raises :class:`RunPreempted`. The result's step time and machine are those of the segment
  that trained the most steps; its wall and CPU times add up all segments.
  """
  import jax

  from nearprox.training import metrics_writer, preemption, train

  started, cpu_started = time.time(), cpu_seconds()
  report = train.train_and_evaluate(config, workdir)
  params = report.pop("params")
  segments_path = workdir / "segments.json"
  earlier = json.loads(segments_path.read_text()) if segments_path.exists() else []
  if report["start_step"] == 0:  # no checkpoint was resumed: earlier segments did not count
    earlier = []
  rows = None
  if attack and not report["preempted"]:
    try:
      with preemption.stop_on_sigterm():  # the final state is checkpointed: a rerun attacks it
        rows = _attack(config, params, attack)
    except preemption.Preempted:
      report["preempted"] = True
  if report["preempted"]:  # SIGTERM: store nothing partial; a rerun resumes here
    write_json(segments_path, earlier + [_segment(report, started, cpu_started)])
    raise RunPreempted(
        f"run {label} stopped by SIGTERM at step {report['steps']} (checkpoint in {workdir}); "
        "rerun python -m experiments.reproduce to resume"
    )
  segments = earlier + [_segment(report, started, cpu_started)]
  longest = max(reversed(segments), key=lambda s: s["to_step"] - s["from_step"])
  report["train_step_seconds"] = longest["train_step_seconds"]
  result = {
      "key": key,
      "label": label,
      "config": config.to_dict(),
      "devices": devices,
      "report": report,
      "history": metrics_writer.read_jsonl(workdir / "metrics.jsonl"),
      "attack": rows,
      "wall_seconds": sum(s["wall_seconds"] for s in segments),
      "cpu_seconds": sum(s["cpu_seconds"] for s in segments),
      "segments": segments,
      "machine": longest["machine"],
      "commit": segments[-1]["commit"],
  }
  del params
  shutil.rmtree(workdir, ignore_errors=True)
  jax.clear_caches()
  gc.collect()
  return result
