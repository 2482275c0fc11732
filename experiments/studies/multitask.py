"""Multi-task learning with a shared encoder (issue 41, part 2): ``plan.multitask_tasks``
(SST-2, MRPC, tweets) trained together on one MiniLM with a head per task
(``config.task = "multitask"``, :mod:`nearprox.training.multitask_io`), each example's task
drawn with probability ∝ n_t^(1/T), T = ``plan.multitask_temperature``, at the single-task
runs' budget (the mode's steps × batch, the examples mixed), ``plan.seeds`` seeds.

The optimizers (``plan.multitask_variants``), each at the settings its SST-2 tuning chose (the
protocol tunes on SST-2 only and every other task reuses that choice; nothing is tuned on the
mixture):

* ``adamw``: AdamW on the mixed batch's mean gradient;
* ``pcgrad_adamw``: PCGrad → AdamW (:func:`nearprox.pcgrad_aggregate`: each task's share of
  the mean gradient, conflicting components projected away; Yu et al. 2020), at AdamW's
  choice: with one task PCGrad is AdamW;
* ``best_proximal``: the proximal variant the tuning ranked first;
* ``proximal_tikhonov``: the tikhonov filter (proximal SGD), the filter that keeps the
  directions many examples agree on and damps the rest, which on a mixed batch damps
  task-conflicting directions.

Each task is scored on its reported split with its official metric (SST-2 dev accuracy, MRPC
dev F1, tweets test accuracy), against the same optimizer's single-task runs of the
optimizer study (the same settings, each task with the whole budget to itself; PCGrad's are
AdamW's), and their mean (per seed, then over seeds). The verdict gets ``best_proximal`` vs
AdamW on the multi-task mean; the other comparisons (each optimizer multi- vs single-task,
PCGrad and tikhonov vs AdamW, tikhonov vs PCGrad) are listed in the section.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments import runs
from experiments.report import LR, SEEDS, get, pct, pyplot, save_figure, table
from experiments.studies.core import comparison, summary_record
from experiments.tuning import Context, final, mean_std
from nearprox.text import data

TITLE = "Multi-task learning with a shared encoder"
PLAN = {
    "multitask_tasks": ("sst2", "mrpc", "tweets"),
    "multitask_temperature": 2.0,
    "multitask_variants": ("adamw", "pcgrad_adamw", "best_proximal", "proximal_tikhonov"),
}
# Optimizers that are a variant's chosen settings with other overrides: (variant, overrides,
# label). PCGrad → AdamW has no tuning of its own: AdamW's choice, PCGrad in front.
DERIVED = {"pcgrad_adamw": ("adamw", {"optimizer.name": "pcgrad_adamw"}, "PCGrad → AdamW")}
SINGLE, MULTI = "single-task", "multi-task"


def _per_seed(results_by_seed: dict[int, dict], tasks) -> dict[int, dict[str, float]]:
  """Per seed: each task's reported score and their mean (seeds with every task only)."""
  scores = {}
  for seed, by_task in results_by_seed.items():
    if set(by_task) != {t.name for t in tasks}:
      continue
    scores[seed] = {t.name: by_task[t.name] for t in tasks}
    scores[seed]["mean"] = float(np.mean(list(scores[seed].values())))
  return scores


def _row(label, training, group, by_seed: dict, tasks, results) -> dict:
  row = {**group.describe(), "variant": label, "training": training, "seeds": len(by_seed)}
  for key in [t.name for t in tasks] + ["mean"]:
    row[key], row[f"{key}_std"] = mean_std([s[key] for s in by_seed.values()])
  row["runs"] = len(results)
  return row


def _single_task(ctx: Context, variant: str, tasks):
  """(a group to describe the settings, per-seed scores) of the optimizer study's runs."""
  groups = {t.name: ctx.group("optimizers", t.name, variant) for t in tasks}
  found = {}
  for t in tasks:
    for r in groups[t.name].results if groups[t.name] else []:
      found.setdefault(r["config"]["seed"], {})[t.name] = final(
          r, t.reported_split, t.primary_metric
      )
  group = next((g for g in groups.values() if g is not None), None)
  results = [r for g in groups.values() if g for r in g.results]
  return group, _per_seed(found, tasks), results


def _multi_task(ctx: Context, variant: str, extra: dict, tasks):
  group = ctx.group("multitask", data.MULTITASK, variant, extra=extra)
  found = {}
  for r in group.results if group else []:
    found[r["config"]["seed"]] = {
        t.name: final(r, t.reported_split, f"{t.name}/{t.primary_metric}") for t in tasks
    }
  return group, _per_seed(found, tasks), group.results if group else []


def _summary_rows(row: dict, group, tasks, condition: str) -> list[dict]:
  """summary.json records (core.SUMMARY_FIELDS) of a multi-task row: one per task, task
  ``multitask:<task>``, and ``multitask:mean``."""
  config = group.results[0]["config"]
  common = {
      "study": "multitask",
      "condition": condition,
      "optimizer": row["optimizer"],
      "variant": row["variant"],
      "steps": config["num_train_steps"],
      "batch_size": config["batch_size"],
      "max_length": config["max_length"],
      "seeds": row["seeds"],
      "learning_rate": row["learning_rate"],
      "damping": row["damping"],
  }
  out = []
  for t in tasks:
    one_class = [
        sum(c > 0 for c in r["report"]["predicted_classes"][t.reported_split][t.name]) == 1
        for r in group.results
    ]
    out.append(
        summary_record(
            task=f"{data.MULTITASK}:{t.name}",
            **common,
            metric=t.primary_metric,
            mean=row[t.name],
            std=row[f"{t.name}_std"],
            collapsed_seeds=sum(one_class),
            split=t.reported_split,
        )
    )
  mean_of = ", ".join(f"{t.name} {t.reported_split} {t.primary_metric}" for t in tasks)
  out.append(
      summary_record(
          task=f"{data.MULTITASK}:mean",
          **common,
          metric=f"mean of {mean_of}",
          mean=row["mean"],
          std=row["mean_std"],
          collapsed_seeds=None,
          split="reported",
      )
  )
  return out


def run(ctx: Context) -> dict:
  plan = ctx.plan
  tasks = [data.get_task(name) for name in plan.multitask_tasks]
  wanted = {"tasks": tuple(plan.multitask_tasks), "task_temperature": plan.multitask_temperature}
  # Overrides only where the mode's config differs (the same run key; shorter run names).
  config = ctx.store.base_config
  setting = {k: v for k, v in wanted.items() if runs.stored(config[k]) != runs.stored(v)}
  rows, summary, comparisons, by_name, singles, done = [], [], [], {}, {}, {}
  mixing = f"shared encoder, mixed batches (T = {plan.multitask_temperature:g})"
  for name in plan.multitask_variants:
    base, overrides, label = DERIVED.get(name, (name, {}, None))
    variant = ctx.resolve(base)
    if variant is None:
      continue
    if (variant, name in DERIVED) in done:  # an alias naming a variant listed before it
      by_name[name] = done[variant, name in DERIVED]
      continue
    if variant not in singles:  # PCGrad's single-task runs are AdamW's: one row
      group, by_seed, results = _single_task(ctx, variant, tasks)
      if group is not None:
        singles[variant] = _row(group.label, SINGLE, group, by_seed, tasks, results)
        rows.append(singles[variant])
    group, by_seed, results = _multi_task(ctx, variant, {**setting, **overrides}, tasks)
    if group is None:
      continue
    row = _row(label or group.label, MULTI, group, by_seed, tasks, results)
    row["name"] = name
    rows.append(row)
    by_name[name] = done[variant, name in DERIVED] = row
    if row["seeds"]:
      summary += _summary_rows(row, group, tasks, mixing)
    if variant in singles and singles[variant]["seeds"] and row["seeds"]:
      record = comparison(
          row,
          singles[variant],
          "mean",
          "mean_std",
          study="multitask",
          condition="mean over tasks, multi-task vs single-task",
      )
      comparisons.append({**record, "preselected": False})
  condition = "multi-task mean (" + ", ".join(t.display_name for t in tasks) + ")"
  pairs = [("best_proximal", "adamw", True), ("pcgrad_adamw", "adamw", False)]
  pairs += [("proximal_tikhonov", "adamw", False), ("proximal_tikhonov", "pcgrad_adamw", False)]
  for subject, baseline, preselected in pairs:
    a, b = by_name.get(subject), by_name.get(baseline)
    if a and b and a["seeds"] and b["seeds"]:
      record = comparison(a, b, "mean", "mean_std", study="multitask", condition=condition)
      comparisons.append({**record, "preselected": preselected})
  tables = {"multitask": rows, "summary": summary}
  return {"tables": tables, "comparisons": comparisons, "tasks": list(plan.multitask_tasks)}


def markdown(study: dict) -> str:
  rows = study["tables"]["multitask"]
  if not rows:
    return ""
  tasks = [data.get_task(name) for name in study["tasks"]]
  columns = [
      ("optimizer", get("variant", str)),
      ("training", get("training", str)),
      LR,
      SEEDS,
      *[
          (
              f"{t.display_name} {t.reported_split} {t.primary_metric} (%)",
              lambda r, n=t.name: pct(r[n], r[f"{n}_std"], r["seeds"]),
          )
          for t in tasks
      ],
      ("mean (%)", lambda r: pct(r["mean"], r["mean_std"], r["seeds"])),
  ]
  text = (
      table(rows, columns) + "\n\n![multitask](PLOT:multitask.png)\n\n"
      "Multi-task: one encoder with a head per task, trained on mixed batches (each example's "
      "task drawn with probability ∝ n_t^(1/T)) at the single-task budget; single-task: the "
      "optimizer study's runs of the same optimizer at the same settings, each task with the "
      "whole budget to itself (PCGrad's are AdamW's). Each optimizer runs at its SST-2 tuning "
      "choice. Mean: the tasks' scores averaged per seed, then mean ± std over seeds (— where "
      "a seed lacks a task's run)."
  )
  lines = [
      f"- {r['condition']}: {r['subject']} vs {r['baseline']}"
      + (" (single-task)" if r["condition"].endswith("single-task") else "")
      + f": **{r['outcome']}** ({100 * r['difference']:+.1f} points)"
      for r in study["comparisons"]
  ]
  if lines:
    text += (
        "\n\nBy the fixed rule (beyond both seed spreads summed and one point); only the "
        "tuned proximal variant vs AdamW enters the verdict table:\n\n" + "\n".join(lines)
    )
  return text


def plots(study: dict, out: Path) -> list[Path]:
  """Each task's score and the mean, per optimizer: single-task (open) and multi-task
  (filled) markers with seed standard deviations."""
  rows = study["tables"]["multitask"]
  if not rows:
    return []
  names = [*study["tasks"], "mean"]
  labels = [data.get_task(n).display_name if n != "mean" else "mean" for n in names]
  variants = list(dict.fromkeys(r["variant"] for r in rows))
  fig, ax = pyplot().subplots(figsize=(7, 3.8))
  width = 0.8 / max(len(variants), 1)
  for i, variant in enumerate(variants):
    color = f"C{i}"
    for r in (r for r in rows if r["variant"] == variant):
      shift = 0.2 if r["training"] == MULTI else -0.2  # single and multi side by side
      x = np.arange(len(names)) - 0.4 + width * (i + 0.5 + shift)
      ax.errorbar(
          x,
          [r[n] for n in names],
          yerr=[r[f"{n}_std"] for n in names],
          fmt="o" if r["training"] == MULTI else "s",
          mfc=color if r["training"] == MULTI else "white",
          color=color,
          capsize=3,
          label=f"{variant} ({r['training']})",
      )
  ax.set_xticks(np.arange(len(names)), labels)
  ax.set(ylabel="score (reported split)", title="Multi-task (filled) vs single-task (open)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=6)
  return save_figure(fig, out / "multitask.png")
