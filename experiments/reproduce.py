"""Regenerates every table and plot of the README's Results section from scratch.

    python experiments/reproduce.py --quick            # ≤ 15 min on 2 idle CPU cores
    python experiments/reproduce.py --full             # the README's tables, ≈100 min there
    python experiments/reproduce.py --smoke --out /tmp/r --readme /tmp/r/README.md
    python experiments/reproduce.py --quick --only optimizers,damping
    python experiments/reproduce.py --quick --report-only   # tables/README from existing runs

Modes are ``experiments/configs/{smoke,quick,full}.py`` (each derived from ``default.py``):
``get_config()`` is the training config every run starts from and ``get_plan()`` what each
study runs (:mod:`studies`). Runs already stored under ``<out>/<mode>/runs/`` are reused,
so an interrupted invocation resumes where it stopped. ``--stop-after MIN`` starts no new
run after MIN minutes and still writes the tables from whatever exists; studies with missing
runs are marked incomplete / not run in the generated section.

Larger budgets (GPU/TPU): ``--set KEY=VALUE`` overrides the mode's training config, e.g.
``--full --set batch_size=32 --set max_length=64 --set num_train_steps=600
--set max_eval_examples=0`` is the converged SST-2 setting (AdamW 1e-4 → 87.5% dev with one
seed on a CPU machine). Not measured here on an accelerator: a GPU/TPU needs the JAX
build for it (``pip install jax[cuda12]`` / ``jax[tpu]``) and nothing else; step times and
the ``× SGD`` ratios are then the accelerator's. ``--set
model.dtype=bfloat16`` is safe for the proximal variants (the Gram solve is in float32).
Results of other settings land in the same run store under new keys (a run's key hashes its
whole config), but ``<out>/<mode>``'s tables are rewritten, so use another ``--out``.

Outputs: ``<out>/<mode>/runs/<key>.json`` (one per training run), ``<out>/<mode>/<study>.json``
and ``<study>_<table>.csv``, PNG plots, and the README section (``--readme``, default
``experiments/README_results.md``), generated from those files only.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODES = ("smoke", "quick", "full")


def load_mode(mode: str):
  path = HERE / "configs" / f"{mode}.py"
  spec = importlib.util.spec_from_file_location(f"nearprox_{mode}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(), module.get_plan()


def parse_set(config, assignments: list[str]):
  import runs

  overrides = {}
  for item in assignments:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    try:
      overrides[key] = json.loads(text)
    except json.JSONDecodeError:
      overrides[key] = text
  return runs.apply_overrides(config, overrides)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  group = parser.add_mutually_exclusive_group()
  for mode in MODES:
    group.add_argument(f"--{mode}", dest="mode", action="store_const", const=mode)
  parser.add_argument("--only", default="", help="comma-separated studies (default: all)")
  parser.add_argument("--out", default=str(HERE / "results"), help="results root")
  parser.add_argument("--readme", default=str(HERE / "README_results.md"))
  parser.add_argument(
      "--link-root",
      default=str(HERE.parent),
      help="image links are relative to this directory (default: the "
      "repository root, where README.md includes the section)",
  )
  parser.add_argument(
      "--workdir", default="/tmp/nearprox_reproduce", help="scratch space while a run trains"
  )
  parser.add_argument("--data-dir", default=None, help="GLUE root (else $NEARPROX_GLUE_DIR)")
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="override a field of the mode's training config",
  )
  parser.add_argument(
      "--plan",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="override a field of the mode's study plan (JSON value)",
  )
  parser.add_argument(
      "--stop-after",
      type=float,
      default=None,
      metavar="MIN",
      help="start no new run after MIN minutes",
  )
  parser.add_argument("--report-only", action="store_true", help="never train")
  parser.add_argument("--run-spec", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.mode = args.mode or "quick"
  return args


def default_data_dir() -> str | None:
  for candidate in (
      os.environ.get("NEARPROX_GLUE_DIR"),
      HERE.parent / ".." / "shared" / "data" / "glue",
  ):
    if candidate and Path(candidate, "SST-2").is_dir():
      return str(Path(candidate).resolve())
  return None


def render_readme(
    mode: str,
    plan,
    config,
    results: dict,
    out: Path,
    link_root: Path,
    wall_seconds: float,
    command: str,
) -> str:
  """The Results section (Markdown, no top-level heading: it is spliced under README.md's
  "## Results" by experiments/update_readme.py); image links relative to ``link_root``."""
  import report
  import runs
  import studies

  stored = sorted((out / "runs").glob("*.json"))
  machines = {json.dumps(json.loads(p.read_text())["machine"], sort_keys=True) for p in stored}
  commits = sorted({json.loads(p.read_text()).get("commit", "unknown") for p in stored})
  compute = sum(json.loads(p.read_text())["wall_seconds"] for p in stored)
  links = os.path.relpath(out, link_root)
  lines = [
      "<!-- Generated by experiments/reproduce.py from the files in "
      f"{links}; do not edit by hand. -->",
      "",
      f"These numbers come from the runs of `python experiments/reproduce.py --{mode}` "
      f"(mode **{mode}**"
      + (": a short budget, not converged fine-tuning" if mode != "full" else "")
      + "). "
      f"Section generated by `{command}` "
      f"on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC "
      f"at commit `{runs.git_commit()}`; runs from commit(s) "
      + ", ".join(f"`{c}`" for c in commits)
      + ".",
      "",
      f"- Training runs stored: {len(stored)}, {compute / 60:.1f} min of run time in "
      f"total; this invocation took {wall_seconds / 60:.1f} min.",
      "- Machine(s): "
      + "; ".join(
          "{platform}, {cpus} CPUs, JAX {jax} on {backend} ({devices} device(s), "
          "{device_kind})".format(**json.loads(m))
          for m in sorted(machines)
      ),
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
      "- Learning rates: swept on the dev split of "
      + ", ".join(report.TASK_NAMES[t] for t in plan.sweep_tasks)
      + " (seed 0), starting grids "
      + "; ".join(f"{studies.DISPLAY[v]} {list(g)}" for v, g in plan.lr_grid.items())
      + f", each extended past an edge that wins (at most {plan.sweep_extensions}×)"
      ". Tasks without their own sweep use the SST-2 rate. SST-2 has no labelled test "
      "split, so its numbers are dev numbers of dev-tuned rates (as in GLUE papers); "
      "tweets are reported on their held-out test split.",
      "",
      "### Verdict",
      "",
      verdict_text(results),
      "",
  ]
  for index, name in enumerate(studies.STUDIES, 1):
    study = results.get(name)
    title = study["title"] if study else name
    lines += [f"### {index}. {title}", ""]
    if study is None:
      lines += ["**not run** (not selected in this invocation).", ""]
      continue
    lines += [f"Status: {report.status(study)}.", ""]
    if any(study["tables"].values()):
      body = report.SECTIONS[name](study)
      body = body.replace("PLOT:", links + "/")
      lines += [body, ""]
    if study["missing"]:
      lines += [
          "Runs not done: "
          + ", ".join(f"`{m}`" for m in study["missing"][:12])
          + (" …" if len(study["missing"]) > 12 else ""),
          "",
      ]
  lines += [
      "### Regenerating",
      "",
      "`python experiments/reproduce.py --quick` (a reduced version: one seed, 32 "
      "steps of batch 8, sized for ≤ 15 min on 2 idle CPU cores), `--full` (these "
      "tables; the run time stored is stated above), `--smoke` (seconds, random tiny "
      "model). "
      "Completed runs are "
      "reused; `--report-only` rewrites this section from stored runs. On a GPU/TPU, "
      "`--full --set batch_size=32 --set max_length=64 --set num_train_steps=600 --set max_eval_examples=0` "
      "gives the converged setting (see the docstring of experiments/reproduce.py).",
      "",
  ]
  return "\n".join(lines)


def verdict_text(results) -> str:
  import verdict

  return verdict.verdict(results)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.run_spec:
    import runs

    runs.execute_spec_file(args.run_spec)
    return 0
  started = time.time()
  import jax

  cache = Path(args.workdir) / "jax_cache"
  jax.config.update("jax_compilation_cache_dir", str(cache))  # seeds share executables
  import report
  import runs
  import studies

  config, plan = load_mode(args.mode)
  data_dir = args.data_dir or default_data_dir()
  if data_dir:  # via the environment: config.data_dir would also redirect the tweets CSV
    os.environ["NEARPROX_GLUE_DIR"] = data_dir
  config = parse_set(config, args.set)
  plan = parse_set(plan, args.plan)
  out = Path(args.out) / args.mode
  only = [s for s in args.only.split(",") if s] or list(studies.STUDIES)
  unknown = set(only) - set(studies.STUDIES)
  if unknown:
    raise SystemExit(f"--only: unknown studies {sorted(unknown)}; known: {studies.STUDIES}")
  deadline = started + 60 * args.stop_after if args.stop_after else None
  executor = runs.Executor(
      config,
      out,
      Path(args.workdir) / args.mode,
      allow_new=not args.report_only,
      deadline=deadline,
      log=lambda m: print(m, flush=True),
  )
  ctx = studies.Context(plan, executor)
  results = {}
  for name in studies.STUDIES:
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
  command = "python experiments/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
  readme = Path(args.readme)
  text = render_readme(
      args.mode,
      plan,
      config,
      results,
      out,
      Path(args.link_root),
      time.time() - started,
      command.strip(),
  )
  readme.parent.mkdir(parents=True, exist_ok=True)
  readme.write_text(text)
  print(f"wrote {readme} ({time.time() - started:.0f}s)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
