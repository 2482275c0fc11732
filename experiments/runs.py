"""The run store of the reproduce pipeline: resolve a run, reuse it or have it trained, store it.

A run is a training config (a mode's base config from ``experiments/configs/<mode>.py`` plus
a study's overrides), the number of host devices it needs, and optionally a robustness
evaluation of its final parameters. Its result file ``<out>/runs/<key>.json`` (fields:
:mod:`experiments.run_process`, which trains it) is named by a hash of exactly these, so two
studies asking for the same config share one run, and a rerun of ``experiments.reproduce``
skips every run whose file exists and resumes a run stopped by SIGTERM from its checkpoint.

A robustness evaluation only reads a run's final parameters, so a stored run with one also
answers a request for the same run without it; and a run that some study will ask for with
an evaluation (``Executor.planned_attacks``: the adversarial study's clean runs are the
optimizer study's SST-2 runs of the same optimizers) is trained once, with it.

A run finished while another machine's process already stored the same key (claims are per
machine) goes to ``<out>/duplicates/<key>.<device kind>.<pid>.json``: the stored result is
kept, and the README compares the two (the same config trained on two machines).

Several processes can share one run store (``Executor(claims=...)``, ``reproduce
--claim_runs``): each takes a run by creating ``<claims>/<key>.claim`` first, so on a machine
with room for several runs at once (a GPU) N workers (experiments/workers.py) train N
different runs; a claim whose process died on this host is taken over.

Multi-device runs train in a subprocess (``python -m experiments.reproduce --run_spec=...``,
:func:`experiments.run_process.execute_spec_file`), because
``XLA_FLAGS=--xla_force_host_platform_device_count`` must be set before JAX is imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from experiments import progress, run_process


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]):
  """A locked copy of ``config`` with dotted-key overrides (``{"optimizer.name": "sgd"}``).

  ``ConfigDict.update_from_flattened_dict`` on a locked copy, one key at a time so that an
  unknown field is reported with the override that names it.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.lock()
  for key, value in overrides.items():
    try:
      config.update_from_flattened_dict({key: value})
    except KeyError as error:
      raise ValueError(f"override {key!r}: the config has no such field ({error})") from None
  return config


# Bump when a default of experiments/configs/default.py changes what a run computes: keys
# leave out fields at their default value (below), so such a change would not show in them.
KEY_VERSION = 1


# Config fields that say where or how visibly a run trains, not what it computes.
_WHERE_NOT_WHAT = ("data_dir", "progress", "checkpoint_minutes")


def _without_defaults(settings: dict, defaults: dict) -> dict:
  """``settings`` less every field equal to its default (recursively)."""
  kept = {}
  for name, value in settings.items():
    default = defaults.get(name, _NO_DEFAULT)
    if isinstance(value, dict) and isinstance(default, dict):
      value = _without_defaults(value, default)
      if value:
        kept[name] = value
    elif value != default:
      kept[name] = value
  return kept


_NO_DEFAULT = object()


def run_key(
    config: ml_collections.ConfigDict, devices: int, attack: run_process.Attack | None
) -> str:
  """Hash of everything that decides a run's numbers (not its label).

  Fields at the value of ``experiments/configs/default.py`` are left out, so adding a config
  field (whose default keeps the old behaviour) leaves every stored run's key unchanged, and
  the run store of a long study survives new features.
  """
  from experiments.configs import default

  settings = _without_defaults(config.to_dict(), default.get_config().to_dict())
  for where_not_what in _WHERE_NOT_WHAT:
    settings.pop(where_not_what, None)
  payload = {
      "config": settings,
      "devices": devices,
      "attack": _fields(attack),
      "version": KEY_VERSION,
  }
  return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


# Settings that change a run's numbers but not what a step computes: runs that differ only in
# these have one shape, and their durations estimate each other's (:meth:`Executor.run`).
_SAME_WORK = ("seed", "learning_rate", "damping", "label_noise")


def run_shape(config: dict, devices: int, attacked: bool, machine: dict) -> str:
  """What decides a run's duration: its config less :data:`_SAME_WORK`, the where-not-what
  fields and (as in :func:`run_key`) the fields at their default, its devices, whether it is
  attacked, and the machine's kind of device and cores."""
  from experiments.configs import default

  def strip(tree: dict) -> dict:
    kept = {}
    for name, value in tree.items():
      if name in _SAME_WORK or name in _WHERE_NOT_WHAT:
        continue
      value = strip(value) if isinstance(value, dict) else value
      if value != {}:
        kept[name] = value
    return kept

  where = {k: machine.get(k) for k in ("device_kind", "cpus")}
  settings = strip(_without_defaults(config, default.get_config().to_dict()))
  payload = {"config": settings, "devices": devices, "attacked": attacked, "machine": where}
  return json.dumps(payload, sort_keys=True, default=str)


def _fields(attack: run_process.Attack | None) -> dict | None:
  return dataclasses.asdict(attack) if attack else None


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


@dataclasses.dataclass
class Executor:
  """Runs (or reuses) training runs for the studies, one at a time.

  Attributes:
    base_config: the mode's config; every run is ``base_config`` + overrides.
    out: results directory of the mode; run files go to ``out/runs``.
    workdir: scratch directory for checkpoints/metrics while a run trains.
    allow_new: False (``--report_only``): only existing results are returned.
    deadline: a ``time.time()`` by which every run this executor starts should end: a run
      starts only if the stored runs of its shape (:func:`run_shape`) on this kind of machine
      took, at the median, no longer than the time left (the part of it that its checkpoint
      has not trained yet, when it resumes); one of a shape never stored starts until the
      deadline. A run stopped at a sitting's end loses what it trained unless its
      workdir survives, so this keeps the last minutes for runs that can finish.
    log: a print-like function.
    progress_seconds: a run in training logs its step and time left this often
      (:mod:`experiments.progress`; None: never).
    claims: a directory shared by the processes training into ``out``: a run is trained by
      the process that creates its claim file (None: this process trains every run).
    requested: run keys, in order of first request.
    missing: key -> label of the requested runs that do not exist.
    planned_attacks: the key of a run without robustness evaluation -> the evaluation a
      request for the same run with one asked for (filled by every request with an attack;
      :func:`experiments.reproduce.main` fills it for all studies first, by a pass that
      trains nothing): such a run, when it must be trained, is trained with the evaluation,
      so the later request finds it stored.
    unstored: key -> the request (label, overrides, devices, attack) of each run asked for
      and not stored then, in request order; a pass that trains nothing collects them, and
      the stopped ones among them resume first (:func:`experiments.reproduce.resume_stopped`).
  """

  base_config: ml_collections.ConfigDict
  out: Path
  workdir: Path
  allow_new: bool = True
  deadline: float | None = None
  log: Callable[[str], None] = print
  progress_seconds: float | None = None
  claims: Path | None = None
  requested: list[str] = dataclasses.field(default_factory=list)
  missing: dict[str, str] = dataclasses.field(default_factory=dict)
  planned_attacks: dict[str, run_process.Attack] = dataclasses.field(default_factory=dict)
  unstored: dict[str, tuple] = dataclasses.field(default_factory=dict)
  # Run file name -> (shape, host, wall seconds), and run key without the attack -> the run
  # file of an attacked run, read once per file (:meth:`_read_stored`).
  durations: dict[str, tuple[str, str | None, float]] = dataclasses.field(
      default_factory=dict, repr=False
  )
  attacked_twins: dict[str, Path] = dataclasses.field(default_factory=dict, repr=False)

  def run(
      self,
      label: str,
      overrides: dict[str, Any],
      devices: int = 1,
      attack: run_process.Attack | None = None,
  ) -> dict | None:
    """The result of the run, training it first when needed and allowed; else None.

    Without ``attack``, a stored run of the same config with a robustness evaluation is the
    result; a run to train that ``planned_attacks`` names is trained with its evaluation."""
    request = (label, overrides, devices, attack)
    config = apply_overrides(self.base_config, overrides)
    key, attached = run_key(config, devices, attack), ""
    if attack is not None:
      self.planned_attacks[run_key(config, devices, None)] = attack
    elif not (self.out / "runs" / f"{key}.json").exists():
      self._read_stored()
      twin = self.attacked_twins.get(key)
      if twin is not None and twin.exists():
        if twin.stem not in self.requested:
          self.requested.append(twin.stem)
        return json.loads(twin.read_text())
      if key in self.planned_attacks:
        attack = self.planned_attacks[key]
        key = run_key(config, devices, attack)
        attached = " + the robustness evaluation a later request asks for"
    path = self.out / "runs" / f"{key}.json"
    if key not in self.requested:
      self.requested.append(key)
    if path.exists():
      return json.loads(path.read_text())
    self.unstored.setdefault(key, request)
    if key in self.missing:  # failed or skipped earlier in this invocation
      return None
    if not self.allow_new or not self._ends_in_time(config, key, devices, attack):
      self.missing[key] = label
      return None
    if self.claims is not None:
      if not self._claim(key):
        self.missing[key] = label + " (running in another process)"
        return None
      if path.exists():  # finished by another process since the check above
        self._release(key)
        return json.loads(path.read_text())
    saved = self.saved_step(key)
    resumed = f", from its checkpoint at step {saved}" if saved else ""
    self.log(f"[run] {label}{attached} ({key}{resumed}) ...")
    started = time.time()
    metrics_path = self.workdir / key / "metrics.jsonl"
    try:
      with progress.logged_progress(
          label, metrics_path, config.num_train_steps, self.log, self.progress_seconds
      ):
        if devices == 1:
          result = run_process.execute(config, self.workdir / key, attack, label, key, devices)
          if path.exists():  # stored meanwhile by a process of another machine: first stays
            kind = result["machine"]["device_kind"].replace(" ", "_")
            run_process.write_json(
                self.out / "duplicates" / f"{key}.{kind}.{os.getpid()}.json", result
            )
            self.log(f"[duplicate] {label} ({key}): kept the stored run, this one in duplicates/")
          else:
            run_process.write_json(path, result)
        else:
          self._execute_subprocess(config, key, label, devices, attack, path)
    except Exception:  # one broken run must not lose the others' tables
      self.log(f"[failed] {label} ({key}):\n{traceback.format_exc()}")
      self.missing[key] = label + " (failed)"
      return None
    finally:
      if self.claims is not None:
        self._release(key)
    result = json.loads(path.read_text())
    report = result["report"]
    metrics = {k: v for k, v in report.items() if k in ("holdout", "dev", "test")}
    self.log(
        f"[done] {label}: {metrics} step {report['train_step_seconds']:.3f}s, "
        f"{time.time() - started:.0f}s"
    )
    return result

  def expected_seconds(
      self, config, devices: int, attack: run_process.Attack | None
  ) -> float | None:
    """Median wall time of the stored runs of this run's shape on this kind of machine, from
    those that trained on this host (:func:`experiments.run_process.host`) if any, since hosts
    of one kind differ in speed (None: no such run)."""
    self._read_stored()
    here = run_process.machine()
    shape = run_shape(config.to_dict(), devices, attack is not None, here)
    same = [(host, seconds) for s, host, seconds in self.durations.values() if s == shape]
    on_this_host = [seconds for host, seconds in same if host == run_process.host(here)]
    chosen = sorted(on_this_host or [seconds for _, seconds in same])
    return chosen[len(chosen) // 2] if chosen else None

  def _read_stored(self) -> None:
    """Reads the run files stored since the last call into ``durations`` and
    ``attacked_twins``."""
    for path in (self.out / "runs").glob("*.json"):
      if path.name not in self.durations:
        result = json.loads(path.read_text())
        attacked = result["attack"] is not None  # its rows; the plan's attack is one
        shape = run_shape(result["config"], result["devices"], attacked, result["machine"])
        host = run_process.host(result["machine"])
        self.durations[path.name] = (shape, host, float(result["wall_seconds"]))
        if attacked:
          config = ml_collections.ConfigDict(result["config"])
          self.attacked_twins[run_key(config, result["devices"], None)] = path

  def _ends_in_time(
      self, config, key: str, devices: int, attack: run_process.Attack | None
  ) -> bool:
    """Whether the run would end before the deadline: the time left covers the expected
    seconds for the steps its checkpoint (if any) has not trained yet."""
    if self.deadline is None:
      return True
    left = self.deadline - time.time()
    if left <= 0:
      return False
    expected = self.expected_seconds(config, devices, attack)
    if expected is None:
      return True
    return expected * (1 - self.saved_step(key) / config.num_train_steps) <= left

  def saved_step(self, key: str) -> int:
    """The step of the latest checkpoint of run ``key`` in ``workdir`` (0: none): a run
    stopped by SIGTERM resumes there."""
    saved = self.workdir / key / "checkpoints"
    steps = [int(p.name) for p in saved.iterdir() if p.name.isdigit()] if saved.is_dir() else []
    return max(steps, default=0)

  def _claim(self, key: str) -> bool:
    """Creates ``<claims>/<key>.claim`` (host and pid); False when another live process holds
    it. A claim left by a process that no longer exists on this host is taken over."""
    self.claims.mkdir(parents=True, exist_ok=True)
    claim = self.claims / f"{key}.claim"
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
      try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        host, _, pid = claim.read_text().partition(" ")
        if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
          return False
        claim.unlink(missing_ok=True)  # its process died: the run is free again
        continue
      with os.fdopen(fd, "w") as f:
        f.write(owner)
      return True
    return False

  def _release(self, key: str) -> None:
    (self.claims / f"{key}.claim").unlink(missing_ok=True)

  def _execute_subprocess(self, config, key, label, devices, attack, path) -> None:
    spec = {
        "config": config.to_dict(),
        "attack": _fields(attack),
        "label": label,
        "key": key,
        "devices": devices,
        "workdir": str(self.workdir / key),
        "result": str(path),
    }
    spec_path = self.workdir / f"{key}.spec.json"
    run_process.write_json(spec_path, spec)
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"  # the study is about host (CPU) devices
    command = [sys.executable, "-m", "experiments.reproduce", f"--run_spec={spec_path}"]
    child = subprocess.Popen(
        command,
        env=env,
        cwd=run_process.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # SIGTERM to this process reaches the run (it saves a checkpoint and stops), so no
    # orphan keeps training into the workdir that a rerun resumes from.
    forward = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
      _, stderr = child.communicate()
    finally:
      signal.signal(signal.SIGTERM, forward)
    if child.returncode == run_process.PREEMPTED_EXIT_CODE:
      raise run_process.RunPreempted((stderr.strip().splitlines() or [f"run {label} stopped"])[-1])
    if child.returncode != 0 or not path.exists():
      raise RuntimeError(
          f"run {label} on {devices} host devices failed "
          f"(exit {child.returncode}):\n{stderr[-3000:]}"
      )
