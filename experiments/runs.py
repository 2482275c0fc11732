"""One training run of the reproduce pipeline: resolve, execute (or reuse), store.

A run is a training config (a mode's base config from ``experiments/configs/<mode>.py`` plus
a study's overrides), the number of host devices it needs, and optionally a robustness
evaluation of its final parameters. Its result file ``<out>/runs/<key>.json`` is named by a
hash of exactly these, so two studies asking for the same config share one run, and a
rerun of ``reproduce.py`` skips every run whose file exists (resume after an interruption).

Result file fields: ``key``, ``label``, ``config`` (the resolved config), ``devices``,
``report`` (``nearprox.training.train.train_and_evaluate``'s report without the params),
``history`` (the rows of ``metrics.jsonl``: train/loss, train/step_time, train/gram/*,
dev/<metric> …), ``attack`` (rows of :func:`nearprox.text.robustness.attack_accuracy` or
None), ``wall_seconds`` and ``machine``.

Multi-device runs execute in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count``
must be set before JAX is imported): ``python experiments/reproduce.py --run-spec spec.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
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


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]):
  """A copy of ``config`` with dotted-key overrides applied (``"optimizer.name": "sgd"``)."""
  config = ml_collections.ConfigDict(config.to_dict())  # unlocked deep copy
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      if name not in node:
        raise ValueError(f"override {dotted!r}: config has no field {name!r}")
      node = node[name]
    if leaf not in node:
      raise ValueError(f"override {dotted!r}: config has no field {leaf!r}")
    node[leaf] = value
  return config


def run_key(config: ml_collections.ConfigDict, devices: int, attack: Attack | None) -> str:
  """Hash of everything that decides a run's numbers (not its label)."""
  settings = config.to_dict()
  for where_not_what in ("data_dir", "progress"):  # machine-specific, not the numbers
    settings.pop(where_not_what, None)
  payload = json.dumps(
      {
          "config": settings,
          "devices": devices,
          "attack": dataclasses.asdict(attack) if attack else None,
      },
      sort_keys=True,
      default=str,
  )
  return hashlib.sha1(payload.encode()).hexdigest()[:12]


def git_commit() -> str:
  """HEAD's hash, with ``+dirty`` when tracked files differ from it."""
  try:
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout
    return head + ("+dirty" if dirty.strip() else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def machine() -> dict[str, Any]:
  """Platform, CPU count and JAX devices of this process."""
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
  }


def _read_history(path: Path) -> list[dict]:
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _attack(config, params, attack: Attack) -> list[dict]:
  import jax

  from nearprox.text import data, models, robustness
  from nearprox.training import train

  task = data.get_task(config.task)
  model, _, tokenizer = train.create_model(config, task.num_labels, jax.random.key(0))
  eval_config = apply_overrides(config, {"max_eval_examples": attack.examples})
  dev = train.load_splits(eval_config, tokenizer)["dev"]
  batches = list(data.batches(dev, config.eval_batch_size, shuffle=False))
  return robustness.attack_accuracy(
      models.bert_logits_fn(model),
      params,
      batches,
      attack.epsilons,
      hidden_size=model.config.hidden_size,
      num_steps=attack.num_steps,
  )


def execute(
    config, workdir: Path, attack: Attack | None, label: str, key: str, devices: int
) -> dict:
  """Trains in this process (and attacks); returns the result dict."""
  import jax

  from nearprox.training import train

  if workdir.exists():
    shutil.rmtree(workdir)  # a partial run restarts from step 0 (no checkpoints)
  started = time.time()
  report = train.train_and_evaluate(config, workdir)
  params = report.pop("params")
  if report.get("preempted"):  # SIGTERM: store nothing partial; a rerun resumes here
    raise SystemExit(
        f"run {label} stopped by SIGTERM at step {report['steps']}; rerun "
        "experiments/reproduce.py to resume"
    )
  rows = _attack(config, params, attack) if attack else None
  result = {
      "key": key,
      "label": label,
      "config": config.to_dict(),
      "devices": devices,
      "report": report,
      "history": _read_history(workdir / "metrics.jsonl"),
      "attack": rows,
      "wall_seconds": time.time() - started,
      "machine": machine(),
      "commit": git_commit(),
  }
  del params
  shutil.rmtree(workdir, ignore_errors=True)
  jax.clear_caches()
  gc.collect()
  return result


def write_json(path: Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(value, indent=1, default=float))
  tmp.replace(path)  # atomic: an interrupted write never leaves a half file to "resume"


def execute_spec_file(spec_path: str) -> None:
  """The ``--run-spec`` entry point (a fresh process whose XLA_FLAGS are already set)."""
  spec = json.loads(Path(spec_path).read_text())
  config = ml_collections.ConfigDict(spec["config"])
  attack = Attack(**spec["attack"]) if spec["attack"] else None
  result = execute(
      config, Path(spec["workdir"]), attack, spec["label"], spec["key"], spec["devices"]
  )
  write_json(Path(spec["result"]), result)


class Executor:
  """Runs (or reuses) training runs for the studies, one at a time.

  Args:
    base_config: the mode's config; every run is ``base_config`` + overrides.
    out: results directory of the mode; run files go to ``out/runs``.
    workdir: scratch directory for checkpoints/metrics while a run trains.
    allow_new: False (``--report-only``): only existing results are returned.
    deadline: a ``time.time()`` after which no new run starts (results still load).
    log: a print-like function.
  """

  def __init__(
      self,
      base_config,
      out: Path,
      workdir: Path,
      allow_new: bool = True,
      deadline: float | None = None,
      log: Callable[[str], None] = print,
  ):
    self.base_config = base_config
    self.out = Path(out)
    self.workdir = Path(workdir)
    self.allow_new = allow_new
    self.deadline = deadline
    self.log = log
    self.requested: list[str] = []  # keys, in order of first request
    self.missing: dict[str, str] = {}  # key -> label of runs that do not exist

  def run(
      self, label: str, overrides: dict[str, Any], devices: int = 1, attack: Attack | None = None
  ) -> dict | None:
    """The result of the run, training it first when needed and allowed; else None."""
    config = apply_overrides(self.base_config, overrides)
    key = run_key(config, devices, attack)
    path = self.out / "runs" / f"{key}.json"
    if key not in self.requested:
      self.requested.append(key)
    if path.exists():
      return json.loads(path.read_text())
    if key in self.missing:  # failed or skipped earlier in this invocation
      return None
    if not self.allow_new or (self.deadline is not None and time.time() > self.deadline):
      self.missing[key] = label
      return None
    self.log(f"[run] {label} ({key}) ...")
    started = time.time()
    try:
      if devices == 1:
        result = execute(config, self.workdir / key, attack, label, key, devices)
        write_json(path, result)
      else:
        self._execute_subprocess(config, key, label, devices, attack, path)
    except Exception:  # one broken run must not lose the others' tables
      self.log(f"[failed] {label} ({key}):\n{traceback.format_exc()}")
      self.missing[key] = label + " (failed)"
      return None
    result = json.loads(path.read_text())
    report = result["report"]
    metrics = {k: v for k, v in report.items() if k in ("dev", "test")}
    self.log(
        f"[done] {label}: {metrics} step {report['train_step_seconds']:.3f}s, "
        f"{time.time() - started:.0f}s"
    )
    return result

  def _execute_subprocess(self, config, key, label, devices, attack, path) -> None:
    spec = {
        "config": config.to_dict(),
        "attack": dataclasses.asdict(attack) if attack else None,
        "label": label,
        "key": key,
        "devices": devices,
        "workdir": str(self.workdir / key),
        "result": str(path),
    }
    spec_path = self.workdir / f"{key}.spec.json"
    write_json(spec_path, spec)
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"  # the study is about host (CPU) devices
    command = [
        sys.executable,
        str(REPO / "experiments" / "reproduce.py"),
        "--run-spec",
        str(spec_path),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0 or not path.exists():
      raise RuntimeError(
          f"run {label} on {devices} host devices failed "
          f"(exit {completed.returncode}):\n{completed.stderr[-3000:]}"
      )
