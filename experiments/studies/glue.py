"""Study 5: one more GLUE task (MRPC: F1) with the SST-2 settings."""

from __future__ import annotations

from experiments.report import LR, OPTIMIZER, SEEDS, spread, table
from experiments.studies.core import comparison, majority_class_row, summary_rows
from experiments.tuning import Context
from nearprox.text import data

TITLE = "GLUE (dev)"


def run(ctx: Context) -> dict:
  plan = ctx.plan
  task = data.get_task(plan.glue_task)
  rows, summary = {}, {}
  for name in plan.glue_optimizers:
    group = ctx.group("glue", task.name, name, extra={"max_length": plan.glue_max_length})
    if group is None:
      continue
    row = {"task": task.name, **group.describe(), "seeds": len(group.results)}
    row["max_length"] = plan.glue_max_length
    for metric in task.metric_names:
      row.update(group.stats(metric, "dev", metric))
    rows[group.variant] = row
    values = [(task.primary_metric, task.primary_metric)]
    summary[group.variant] = summary_rows("glue", row, group, values)
  comparisons = []
  if rows:
    majority = majority_class_row(ctx, task.name, plan.glue_max_length)
    for row in rows.values():  # equal to the majority class in every metric: nothing learned
      row["same_as_majority"] = all(abs(row[m] - majority[m]) < 1e-9 for m in task.metric_names)
    proximal = next((r for r in rows.values() if r["optimizer"].startswith("proximal")), None)
    for base in ("adamw", "sgd_momentum"):
      if proximal and base in rows:
        counted = not (proximal["same_as_majority"] and rows[base]["same_as_majority"])
        record = comparison(
            proximal,
            rows[base],
            task.primary_metric,
            study="glue",
            task=task.name,
            condition=f"{task.display_name} dev {task.primary_metric}",
        )
        comparisons.append({**record, "counted": counted})  # not between two non-learners
    rows["majority"] = majority
  tuned_on = data.get_task(plan.tuning.task).display_name
  return {
      "title": f"{task.display_name} (dev)",
      "tables": {"glue": list(rows.values()), "summary": sum(summary.values(), [])},
      "comparisons": comparisons,
      "notes": [
          f"settings tuned on held-out {tuned_on} training data; metrics: "
          f"{', '.join(task.metric_names)} (first is the official one); the majority "
          "row always predicts the training split's most frequent class, on "
          "the same dev examples (a model that learned nothing scores this)"
      ],
  }


def markdown(study: dict) -> str:
  rows = study["tables"]["glue"]
  metrics = data.get_task(rows[0]["task"]).metric_names
  columns = [OPTIMIZER, LR, SEEDS, *[(f"dev {m} (%)", spread(m, f"{m}_std")) for m in metrics]]
  return (
      table(rows, columns)
      + f"\n\n{rows[0]['max_length']} tokens; "
      + "; ".join(study["notes"])
      + "."
  )
