"""Study 8: extractive QA on SQuAD's held-out articles, every optimizer at its SST-2
settings."""

from __future__ import annotations

from experiments.report import DAMPING, LR, OPTIMIZER, RAN_ON, SEEDS, get, spread, table
from experiments.studies.core import BASELINES, comparison, summary_rows
from experiments.tuning import Context
from nearprox.text import data

TITLE = "Question answering (SQuAD v1.1, held-out articles)"


def run(ctx: Context) -> dict:
  plan = ctx.plan
  task = data.get_task("squad")
  settings = dict(plan.qa_settings)
  rows, summary = {}, {}
  for name in plan.qa_optimizers:
    group = ctx.group("squad", task.name, name, extra=settings)
    if group is None:
      continue
    row = {"task": task.name, **group.describe(), "seeds": len(group.results), **settings}
    for metric in task.metric_names:
      row.update(group.stats(metric, "dev", metric))
    row["step_seconds"] = group.step_seconds()
    rows[group.variant] = row
    values = [(task.primary_metric, task.primary_metric)]
    summary[group.variant] = summary_rows("squad", row, group, values)
  comparisons = []
  best = ctx.resolve("best_proximal")  # chosen on held-out SST-2 training data
  for base in (b for b in BASELINES if best in rows and b in rows):
    record = comparison(
        rows[best],
        rows[base],
        task.primary_metric,
        study="squad",
        task="squad",
        condition=f"SQuAD held-out {task.primary_metric}",
    )
    comparisons.append(record)
  tuned_on = data.get_task(plan.tuning.task).display_name
  return {
      "tables": {"squad": list(rows.values()), "summary": sum(summary.values(), [])},
      "comparisons": comparisons,
      "notes": [
          f"learning rate and damping of every optimizer are its choice on held-out {tuned_on} "
          "training data (not tuned for QA, the same rule for each)"
      ],
  }


def markdown(study: dict) -> str:
  rows = study["tables"]["squad"]
  metrics = data.get_task("squad").metric_names
  columns = [
      OPTIMIZER,
      LR,
      DAMPING,
      SEEDS,
      *[(f"held-out {m} (%)", spread(m, f"{m}_std")) for m in metrics],
      RAN_ON,
      ("s/step", get("step_seconds")),
  ]
  first = rows[0]
  return (
      table(rows, columns)
      + f"\n\nWindows of {first['max_length']} tokens (stride {first['doc_stride']}), batch "
      f"{first['batch_size']}; {'; '.join(study['notes'])}. Split: "
      "`nearprox/text/data/squad.py` (with the SQuAD v1.1 dev file alone, the articles with "
      "sha256(title) < 0.25 are held out)."
  )
