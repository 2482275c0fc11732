"""One training run of the reproduce pipeline: resolve, execute (or reuse), store.

A run is a training config (a mode's base config from ``experiments/configs/<mode>.py`` plus
a study's overrides), the number of host devices it needs, and optionally a robustness
evaluation of its final parameters. Its result file ``<out>/runs/<key>.json`` is named by a
hash of exactly these, so two studies asking for the same config share one run, and a
rerun of ``experiments.reproduce`` skips every run whose file exists and resumes a run stopped
by SIGTERM from its checkpoint (see :func:`execute`).

Result file fields: ``key``, ``label``, ``config`` (the resolved config), ``devices``,
``report`` (``nearprox.training.train.train_and_evaluate``'s report without the params),
``history`` (the rows of ``metrics.jsonl``: train/loss, train/step_time, train/gram/*,
dev/<metric> …; the report's ``predicted_classes`` counts, per evaluated split, the examples
the final model assigns to each class: a single non-zero count is a collapsed run),
``attack`` (rows of :func:`nearprox.text.robustness.attack_accuracy` or None),
``segments`` (one per process that trained the run and stopped or finished it: ``from_step``,
``to_step``, ``train_step_seconds``, ``wall_seconds`` including any time the process was
paused, ``cpu_seconds`` = its user + system time over all threads, pauses excluded,
``machine``, ``commit``), ``wall_seconds`` and ``cpu_seconds`` (the segments' sums; a
process killed without SIGTERM, or crashed, leaves no segment: a gap between one segment's
``to_step`` and the next one's ``from_step`` shows untimed steps), ``machine`` (of the
segment that trained the most steps, whose step time the report carries) and ``commit`` (of
the process that finished the run).

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

Multi-device runs execute in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count``
must be set before JAX is imported): ``python -m experiments.reproduce --run_spec=spec.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import platform
import shutil
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

from experiments import progress

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Attack:
  """Embedding-space PGD evaluation of the final params on ``examples`` dev examples."""

  epsilons: tuple[float, ...]
  num_steps: int
  examples: int


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


def run_key(config: ml_collections.ConfigDict, devices: int, attack: Attack | None) -> str:
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


def _fields(attack: Attack | None) -> dict | None:
  return dataclasses.asdict(attack) if attack else None


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
  }


class RunPreempted(SystemExit):
  """A run stopped by SIGTERM after saving a checkpoint (not a failure: rerun to resume)."""


# A --run_spec subprocess stopped by SIGTERM exits with this status (EX_TEMPFAIL).
PREEMPTED_EXIT_CODE = 75


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
  eval_config = apply_overrides(config, {"max_eval_examples": attack.examples})
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

  from nearprox.training import metrics_writer, train

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
      with train.stop_on_sigterm():  # the final state is checkpointed: a rerun attacks it
        rows = _attack(config, params, attack)
    except train.Preempted:
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


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def write_json(path: Path, value) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(f".{os.getpid()}.tmp")  # workers sharing a store never collide
  tmp.write_text(json.dumps(value, indent=1, default=float))
  tmp.replace(path)  # atomic: an interrupted write never leaves a half file to "resume"


def execute_spec_file(spec_path: str) -> None:
  """The ``--run_spec`` entry point (a fresh process whose XLA_FLAGS are already set)."""
  spec = json.loads(Path(spec_path).read_text())
  config = ml_collections.ConfigDict(spec["config"])
  attack = Attack(**spec["attack"]) if spec["attack"] else None
  try:
    result = execute(
        config, Path(spec["workdir"]), attack, spec["label"], spec["key"], spec["devices"]
    )
  except RunPreempted as stopped:
    print(stopped, file=sys.stderr)
    raise SystemExit(PREEMPTED_EXIT_CODE) from None
  write_json(Path(spec["result"]), result)


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
  planned_attacks: dict[str, Attack] = dataclasses.field(default_factory=dict)
  unstored: dict[str, tuple] = dataclasses.field(default_factory=dict)
  # Run file name -> (shape, wall seconds), and run key without the attack -> the run file of
  # an attacked run, read once per file (:meth:`_read_stored`).
  durations: dict[str, tuple[str, float]] = dataclasses.field(default_factory=dict, repr=False)
  attacked_twins: dict[str, Path] = dataclasses.field(default_factory=dict, repr=False)

  def run(
      self, label: str, overrides: dict[str, Any], devices: int = 1, attack: Attack | None = None
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
          result = execute(config, self.workdir / key, attack, label, key, devices)
          if path.exists():  # stored meanwhile by a process of another machine: first stays
            kind = result["machine"]["device_kind"].replace(" ", "_")
            write_json(self.out / "duplicates" / f"{key}.{kind}.{os.getpid()}.json", result)
            self.log(f"[duplicate] {label} ({key}): kept the stored run, this one in duplicates/")
          else:
            write_json(path, result)
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

  def expected_seconds(self, config, devices: int, attack: Attack | None) -> float | None:
    """Median wall time of the stored runs of this run's shape on this kind of machine (None:
    no such run)."""
    self._read_stored()
    shape = run_shape(config.to_dict(), devices, attack is not None, machine())
    same = sorted(seconds for s, seconds in self.durations.values() if s == shape)
    return same[len(same) // 2] if same else None

  def _read_stored(self) -> None:
    """Reads the run files stored since the last call into ``durations`` and
    ``attacked_twins``."""
    for path in (self.out / "runs").glob("*.json"):
      if path.name not in self.durations:
        result = json.loads(path.read_text())
        attacked = result["attack"] is not None  # its rows; the plan's attack is one
        shape = run_shape(result["config"], result["devices"], attacked, result["machine"])
        self.durations[path.name] = (shape, float(result["wall_seconds"]))
        if attacked:
          config = ml_collections.ConfigDict(result["config"])
          self.attacked_twins[run_key(config, result["devices"], None)] = path

  def _ends_in_time(self, config, key: str, devices: int, attack: Attack | None) -> bool:
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
    write_json(spec_path, spec)
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
        command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    # SIGTERM to this process reaches the run (it saves a checkpoint and stops), so no
    # orphan keeps training into the workdir that a rerun resumes from.
    forward = signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGTERM))
    try:
      _, stderr = child.communicate()
    finally:
      signal.signal(signal.SIGTERM, forward)
    if child.returncode == PREEMPTED_EXIT_CODE:
      raise RunPreempted((stderr.strip().splitlines() or [f"run {label} stopped"])[-1])
    if child.returncode != 0 or not path.exists():
      raise RuntimeError(
          f"run {label} on {devices} host devices failed "
          f"(exit {child.returncode}):\n{stderr[-3000:]}"
      )
