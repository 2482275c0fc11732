"""The run store: one JSON record per training run, keyed by its config.

A run is a training config (a mode's base config from ``experiments/configs/<mode>.py`` plus
a study's overrides), the number of host devices it needs, and optionally a robustness
evaluation of its final parameters. Its record ``<out>/runs/<key>.json`` (fields:
:mod:`experiments.run_process`) is named by a hash of exactly these, so two studies asking
for the same config share one run.

A study asks the store for runs (:meth:`RunStore.run`); the store answers with the stored
record, or records the request as pending and answers None. It trains nothing: after a pass
over the studies, :mod:`experiments.ray_runner` trains the pending runs
(:meth:`RunStore.to_train`) and the next pass finds them, so a stage that waits for another's
runs (tuning → choice → reported runs) asks for its own one pass later.

A robustness evaluation only reads a run's final parameters, so a stored run with one also
answers a request for the same run without it, and a run that some study asks for both ways
in one pass is trained once, with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
import statistics
from pathlib import Path
from typing import Any

import ml_collections

from experiments import run_process


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
_NO_DEFAULT = object()


def stored(value):
  """``value`` as a run record stores it: JSON has no tuples, so a tuple field (``tasks``)
  read back from a record is a list, and must compare equal to its tuple default."""
  return list(value) if isinstance(value, tuple) else value


def _without_defaults(settings: dict, defaults: dict) -> dict:
  """``settings`` less every field equal to its default (recursively)."""
  kept = {}
  for name, value in settings.items():
    default = defaults.get(name, _NO_DEFAULT)
    if isinstance(value, dict) and isinstance(default, dict):
      value = _without_defaults(value, default)
      if value:
        kept[name] = value
    elif stored(value) != stored(default):
      kept[name] = value
  return kept


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
      "attack": dataclasses.asdict(attack) if attack else None,
      "version": KEY_VERSION,
  }
  return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_config(name: str) -> ml_collections.ConfigDict:
  """``experiments/configs/<name>.py``'s ``get_config()``."""
  return importlib.import_module(f"experiments.configs.{name}").get_config()


def without_seed(label: str) -> str:
  """A run label less its ``seed=N`` part: ``optimizers:sst2:adamw:seed=2`` →
  ``optimizers:sst2:adamw``."""
  return re.sub(r":seed=\d+", "", label)


@dataclasses.dataclass(frozen=True)
class Request:
  """A run a study asked for that is not stored: what :mod:`experiments.ray_runner` trains."""

  key: str
  label: str
  config: ml_collections.ConfigDict
  devices: int
  attack: run_process.Attack | None


@dataclasses.dataclass
class RunStore:
  """The stored runs of one mode's results folder, and the runs studies asked for.

  Attributes:
    base_config: the mode's config; every run is ``base_config`` + overrides.
    out: the mode's results folder; records live in ``out/runs``.
    failed: key -> label of runs that failed in this invocation: not asked for again.
    deferred: keys of runs this invocation left for the next (they would not end before its
      stop): not asked for again either.
    requested: run keys, in order of first request.
    missing: key -> label of the requested runs that are not stored.
    pending: key -> :class:`Request` of each missing run (failed ones excepted).
    planned_attacks: the key of a run without robustness evaluation -> the evaluation that a
      request for the same run with one asked for.
  """

  base_config: ml_collections.ConfigDict
  out: Path
  failed: dict[str, str] = dataclasses.field(default_factory=dict)
  deferred: set[str] = dataclasses.field(default_factory=set)
  requested: list[str] = dataclasses.field(default_factory=list)
  missing: dict[str, str] = dataclasses.field(default_factory=dict)
  pending: dict[str, Request] = dataclasses.field(default_factory=dict)
  planned_attacks: dict[str, run_process.Attack] = dataclasses.field(default_factory=dict)
  _records: dict[str, dict] = dataclasses.field(default_factory=dict, repr=False)
  _attacked_twins: dict[str, str] | None = dataclasses.field(default=None, repr=False)

  def path(self, key: str) -> Path:
    return self.out / "runs" / f"{key}.json"

  def record(self, key: str) -> dict | None:
    """The stored record of run ``key`` (None: not stored)."""
    if key not in self._records:
      path = self.path(key)
      if not path.exists():
        return None
      self._records[key] = json.loads(path.read_text())
    return self._records[key]

  def save(self, result: dict) -> None:
    """Stores a trained run's record (written atomically)."""
    run_process.write_json(self.path(result["key"]), result)
    self._records[result["key"]] = result
    self._attacked_twins = None

  def run(
      self,
      label: str,
      overrides: dict[str, Any],
      devices: int = 1,
      attack: run_process.Attack | None = None,
      base: str | None = None,
  ) -> dict | None:
    """The record of the run, or None (and the run is pending) when it is not stored.

    ``base`` names another config of ``experiments/configs`` to start from instead of the
    mode's (a task whose fields the mode's config lacks, like ``"multi30k"``); the key does
    not depend on where the config started, only on the config. Without ``attack``, a stored
    run of the same config with a robustness evaluation is the answer."""
    config = apply_overrides(self.base_config if base is None else base_config(base), overrides)
    key = run_key(config, devices, attack)
    if attack is not None:
      self.planned_attacks[run_key(config, devices, None)] = attack
    elif self.record(key) is None:
      twin = self.attacked_twins().get(key)
      if twin is not None:
        key = twin
    if key not in self.requested:
      self.requested.append(key)
    found = self.record(key)
    if found is not None:
      return found
    self.missing[key] = label + (" (failed)" if key in self.failed else "")
    if key not in self.failed and key not in self.deferred:
      self.pending.setdefault(key, Request(key, label, config, devices, attack))
    return None

  def attacked_twins(self) -> dict[str, str]:
    """Key of a run without robustness evaluation -> key of its stored twin with one."""
    if self._attacked_twins is None:
      self._attacked_twins = {}
      for path in sorted((self.out / "runs").glob("*.json")):
        result = self.record(path.stem)
        if result["attack"] is not None:
          config = ml_collections.ConfigDict(result["config"])
          self._attacked_twins[run_key(config, result["devices"], None)] = path.stem
    return self._attacked_twins

  def expected_seconds(self, request: Request) -> float | None:
    """The median wall time of the stored runs most like ``request``: those with its label
    but another seed, else those of its task, optimizer, step count and batch size (None:
    none is stored). Wall times depend on the machine and on what ran beside each run; this
    is an estimate for planning, not a measurement."""
    setup = lambda c: (
        c.get("task"),
        c.get("optimizer", {}).get("name"),
        c.get("num_train_steps"),
        c.get("batch_size"),
    )
    want_label, want_setup = without_seed(request.label), setup(request.config)
    same_label, same_setup = [], []
    for path in sorted((self.out / "runs").glob("*.json")):
      record = self.record(path.stem)
      if without_seed(record.get("label", "")) == want_label:
        same_label.append(record["wall_seconds"])
      elif setup(record["config"]) == want_setup:
        same_setup.append(record["wall_seconds"])
    alike = same_label or same_setup
    return statistics.median(alike) if alike else None

  def to_train(self) -> list[Request]:
    """The pending runs, in request order, less those that a pending twin with a robustness
    evaluation answers once trained."""
    return [
        request
        for key, request in self.pending.items()
        if request.attack is not None or key not in self.planned_attacks
    ]
