"""The results document: study tables (CSV), plots (PNG) and Markdown, and the verdict table.

Every number written here comes from a study dict of :mod:`experiments.studies`, i.e. from
run records; nothing is typed in. A study's own section is its module's ``markdown``; this
module holds what every section shares (table and number formats, the status line) and the
document around them: setup, the verdict table of every comparison record, the partial
notice.
"""

from __future__ import annotations

import collections
import csv
import datetime
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import run_process, tuning
from nearprox.text import data

# ------------------------------------------------------------------------------ files


def write_tables(study: dict, out: Path) -> list[Path]:
  """``<out>/<study>.json`` and one CSV per table."""
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{study['name']}.json").write_text(json.dumps(study, indent=1, default=float))
  paths = []
  for name, rows in study["tables"].items():
    if not rows:
      continue
    path = out / f"{study['name']}_{name}.csv"
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(rows)
    paths.append(path)
  return paths


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: Path, dpi: int = 110) -> list[Path]:
  """Lays out, writes and closes ``fig``; returns ``[path]``."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return [path]


# ------------------------------------------------------------------------------ markdown


def accuracy_by_variant(ax, rows: list[dict], x: str) -> None:
  """One line per variant: mean dev accuracy ± seed std against ``x`` (rows sorted by it)."""
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r[x])
    ax.errorbar(
        [r[x] for r in mine],
        [r["dev_accuracy"] for r in mine],
        yerr=[r["dev_accuracy_std"] for r in mine],
        marker="o",
        capsize=3,
        label=variant,
    )


def pct(x, std=None, n=None) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "—"
  text = f"{100 * x:.1f}"
  if std is not None and n and n > 1:
    text += f" ± {100 * std:.1f}"
  return text


def num(x, digits=3) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "—"
  return f"{x:.{digits}g}"


def table(rows: list[dict], columns: list[tuple[str, Callable[[dict], Any]]]) -> str:
  """A Markdown table with one column per ``(header, cell of a row)``."""
  lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
  return "\n".join(lines)


def get(key: str, fmt: Callable = num) -> Callable[[dict], str]:
  return lambda row: fmt(row[key])


def spread(key: str, std_key: str) -> Callable[[dict], str]:
  """Mean ± seed standard deviation in percent (no ± with one seed)."""
  return lambda row: pct(row[key], row[std_key], row["seeds"])


OPTIMIZER = ("optimizer", get("variant", str))
LR = ("lr", get("learning_rate"))
SEEDS = ("seeds", get("seeds", str))
DAMPING = ("λ (relative)", get("damping", lambda d: "—" if d is None else f"{d:g}"))


def chosen_mark(row: dict) -> str:
  """✓ for the chosen trial, with the grid edges it sits at (``row["edges"]``:
  :func:`experiments.tuning.grid_edges`)."""
  if not row["chosen"]:
    return ""
  return "✓" + (f" ({row['edges']})" if row.get("edges") else "")


def edge_note(rows: list[dict]) -> str:
  """A sentence naming the choices at an edge of their grid ('' when none is)."""
  at_edge = [f"{r['variant']} ({r['edges']})" for r in rows if r.get("edges")]
  if not at_edge:
    return ""
  return (
      f"Chosen at an edge of its grid: {'; '.join(at_edge)}. The grid does not show that the "
      "best setting lies inside it, and the protocol does not extend a grid after its runs: "
      "such a variant may do better at a setting outside the grid than its row shows."
  )


CHOSEN = ("chosen", chosen_mark)
RAN_ON = ("ran on", lambda row: row.get("machine") or "—")  # step times compare within one


def status(study: dict) -> str:
  found = study["requested"] - len(study["missing"])
  waiting = study.get("waiting") or []
  waits = "; it waits for the tuning's choice of " + " and ".join(f"`{w}`" for w in waiting)
  waits = waits if waiting else ""
  if not any(study["tables"].values()):
    missing = f" ({len(study['missing'])} runs missing)" if study["missing"] else ""
    return "**not run**" + missing + waits
  if study["missing"] or waiting:
    return (
        f"**incomplete**: {found} of the {study['requested']} runs it asks for so far exist" + waits
    )
  return f"complete ({found} run(s) of its own, plus any shared with earlier studies)"


# ------------------------------------------------------------------------------ verdict


def _score(record: dict, side: str) -> str:
  """A comparison record's subject or baseline score: mean ± seed std (n seeds)."""
  seeds = record.get(f"{side}_seeds")
  text = pct(record[f"{side}_mean"], record[f"{side}_std"], seeds)
  return f"{text} ({seeds})" if seeds else text


def _outcome(record: dict) -> str:
  if record.get("counted") is False:
    return "not counted (a model predicts one class)"
  caveat = record.get("caveat")
  return f"**{record['outcome']}**" + (f" ({caveat})" if caveat else "")


def verdict_rows(results: dict[str, dict]) -> list[dict]:
  """Every comparison record the studies made between variants they chose before looking at
  the reported split (``preselected``), in study order."""
  return [
      record
      for study in results.values()
      for record in study.get("comparisons", [])
      if record.get("preselected", True)
  ]


def verdict_table(records: list[dict]) -> str:
  """Study, what is compared, both sides' mean ± seed std (seeds) and the outcome by the fixed
  rule (:func:`experiments.studies.core.comparison`)."""
  columns = [
      ("study", get("study", str)),
      ("compared on", get("condition", str)),
      ("subject", get("subject", str)),
      ("score (%)", lambda r: _score(r, "subject")),
      ("baseline", get("baseline", str)),
      ("baseline (%)", lambda r: _score(r, "baseline")),
      ("Δ (points)", lambda r: f"{100 * r['difference']:+.1f}"),
      ("outcome", _outcome),
  ]
  return table(records, columns)


def against_adamw_table(records: list[dict]) -> str:
  """README's table: the comparisons with AdamW, one row per condition (the subject is the
  variant the tuning chose, named above the table)."""
  columns = [
      ("compared on", get("condition", str)),
      ("tuned proximal (%)", lambda r: _score(r, "subject")),
      ("AdamW (%)", lambda r: _score(r, "baseline")),
      ("Δ (points)", lambda r: f"{100 * r['difference']:+.1f}"),
      ("outcome", _outcome),
  ]
  return table(records, columns)


def step_cost_line(record: dict | None, variant: str | None) -> str:
  """'Step time of VARIANT: 1.68× AdamW's (exact Gram), 1.20× (sketched …)' from
  experiments/bench_optimizers.py's record ('' without it)."""
  if not record or not variant:
    return ""
  rows = [r for r in record["rows"] if r["variant"].split(":")[0] == variant]
  if not rows or any(r.get("ratio_to_adamw") is None for r in rows):
    return ""
  times = ", ".join(f"{r['ratio_to_adamw']:.2f}× ({r['label']})" for r in rows)
  machine = record["machine"]
  where = (
      f"{machine['cpus']} CPU core(s)" if machine["backend"] == "cpu" else machine["device_kind"]
  )
  return (
      f"Step time against AdamW's, timed in one process on {where} "
      f"(`{record['command']}`): {times}."
  )


def tally(records: list[dict]) -> str:
  """'ahead 1, level 8, behind 2 (of 11 counted)'."""
  counted = [r for r in records if r.get("counted") is not False]
  counts = collections.Counter(r["outcome"] for r in counted)
  parts = ", ".join(f"{o} {counts[o]}" for o in ("ahead", "level", "behind"))
  return f"{parts} (of {len(counted)} counted)"


# ------------------------------------------------------------------------------ document


def describe_machines(machines: list[dict]) -> list[str]:
  """One line per machine the runs trained on, with its run count."""
  counts = collections.Counter(
      (
          m["platform"],
          m["cpus"],
          m["jax"],
          m["backend"],
          m["devices"],
          m["device_kind"] + run_process.threads_label(m),
      )
      for m in machines
  )
  return [
      f"{platform}, {cpus} CPU(s), JAX {jax} on {backend} ({devices} device(s), {kind}): "
      f"{count} run(s)"
      for (platform, cpus, jax, backend, devices, kind), count in sorted(counts.items())
  ]


def setup_table(plan, config) -> str:
  """The settings every run shares unless its study says otherwise."""
  tuning_plan = plan.tuning
  trials = sorted({len(tuning.Context(plan, None).trials(v)) for v in plan.lr_grid})
  rows = [
      ("model", f"`{config.model.name}`"),
      ("batch × tokens", f"{config.batch_size} × {config.max_length}"),
      (
          "steps",
          f"{config.num_train_steps} (warmup {config.optimizer.warmup_fraction:g}, linear decay)",
      ),
      ("objective", f"`{config.objective.kind}`, L2 {config.objective.l2_weight:g} on kernels"),
      ("damping", f"{config.optimizer.damping:g} `{config.optimizer.damping_mode}` unless tuned"),
      ("per-example gradients", f"`{config.optimizer.per_example}`"),
      ("seeds", ", ".join(map(str, plan.seeds))),
      ("eval examples", str(config.max_eval_examples or "whole split")),
      (
          "tuning",
          f"{' or '.join(map(str, trials))} trials per optimizer, {tuning_plan.steps} steps on "
          f"{data.get_task(tuning_plan.task).display_name}, scored on "
          f"{tuning_plan.holdout_examples} held-out training examples, seeds "
          + ", ".join(map(str, tuning_plan.seeds)),
      ),
  ]
  return table(
      [dict(zip(("k", "v"), r)) for r in rows],
      [("setting", get("k", str)), ("value", get("v", str))],
  )


def partial_notice(plan, results) -> list[str]:
  """A warning paragraph when some study of the plan is missing runs (or was not run)."""
  missing = sum(len(results[n]["missing"]) for n in plan.studies if n in results)
  absent = [n for n in plan.studies if n not in results]
  if not missing and not absent:
    return []
  text = (
      f"**Partial study**: {missing} run{'' if missing == 1 else 's'} the studies asked for so "
      f"far {'is' if missing == 1 else 'are'} not stored"
      + (f", and {', '.join(absent)} did not run" if absent else "")
      + ". Every number comes from the runs that exist; the verdict is not final until this "
      "notice is gone."
  )
  return [text, ""]


def results_doc(*, mode, plan, config, results, sections, runs_dir, links, command) -> str:
  """docs/results.md: header (command, date, commit, machines), setup, verdict table, then
  each study's section (``sections[name](study)``, plot links relative to ``links``)."""
  stored = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*.json"))]
  records = verdict_rows({n: results[n] for n in plan.studies if n in results})
  lines = [
      f"<!-- Generated by `{command}`; do not edit by hand. -->",
      f"# Results (mode `{mode}`)",
      "",
      f"Generated on {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC at commit "
      f"`{run_process.git_commit()}` from {len(stored)} run records (`{links}/runs/`, "
      f"{sum(r['wall_seconds'] for r in stored) / 3600:.1f} h of run time). The runs trained on:",
      "",
      *[f"- {line}" for line in describe_machines([r["machine"] for r in stored])],
      "",
      "Step times compare only runs of one kind of machine (a row's `ran on`). Method: "
      "[method.md](method.md); how the studies are run: [studies.md](studies.md).",
      "",
      setup_table(plan, config),
      "",
      *partial_notice(plan, results),
      "## Verdict",
      "",
      "Each comparison the studies fixed before their runs (the proximal variant is the one "
      "the tuning chose on held-out training data). A difference counts as ahead or behind "
      "only beyond both sides' seed standard deviations summed and at least one point; "
      "otherwise level. A win over a side whose tuning chose a setting at an edge of its grid "
      "names that edge: a better setting may lie outside the grid, which the protocol does "
      f"not extend after its runs. Tally: {tally(records)}.",
      "",
      verdict_table(records),
      "",
  ]
  for index, name in enumerate(plan.studies, 1):
    study = results.get(name)
    lines += [f"## {index}. {study['title'] if study else name}", ""]
    if study is None:
      lines += ["**not run** (not selected in this invocation).", ""]
      continue
    lines += [f"Status: {status(study)}.", ""]
    if any(study["tables"].values()):
      lines += [sections[name](study).replace("PLOT:", links + "/"), ""]
    if study["missing"]:
      missing = ", ".join(f"`{m}`" for m in study["missing"][:12])
      lines += [f"Runs not stored: {missing}" + (" …" if len(study["missing"]) > 12 else ""), ""]
  return "\n".join(lines)
