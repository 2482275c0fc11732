"""Studies on more tasks at the SST-2 settings: a second GLUE task (5) and SQuAD (8)."""

from __future__ import annotations

import numpy as np

from experiments.studies.core import BASELINES, comparison, study
from experiments.tuning import DISPLAY, Context, mean_std
from nearprox.text import data


@study("GLUE (dev)")
def glue(ctx: Context) -> dict:
  plan = ctx.plan
  task = data.get_task(plan.glue_task)
  rows = {}
  for name in plan.glue_optimizers:
    group = ctx.group("glue", task.name, name, extra={"max_length": plan.glue_max_length})
    if group is None:
      continue
    row = {"task": task.name, **group.describe(), "seeds": len(group.results)}
    row["max_length"] = plan.glue_max_length
    for metric in task.metric_names:
      row.update(group.stats(metric, "dev", metric))
    rows[group.variant] = row
  comparisons = []
  if rows:
    majority = majority_class_row(ctx, task.name, plan.glue_max_length)
    for row in rows.values():  # equal to the majority class in every metric: nothing learned
      row["same_as_majority"] = all(abs(row[m] - majority[m]) < 1e-9 for m in task.metric_names)
    proximal = next((r for r in rows.values() if r["optimizer"].startswith("proximal")), None)
    for base in ("adamw", "sgd_momentum"):
      if proximal and base in rows:
        counted = not (proximal["same_as_majority"] and rows[base]["same_as_majority"])
        record = comparison(proximal, rows[base], task.primary_metric, study="glue", task=task.name)
        comparisons.append({**record, "counted": counted})  # not between two non-learners
    rows["majority"] = majority
  tuned_on = data.get_task(plan.tuning.task).display_name
  return {
      "title": f"{task.display_name} (dev)",
      "tables": {"glue": list(rows.values())},
      "comparisons": comparisons,
      "notes": [
          f"settings tuned on held-out {tuned_on} training data; metrics: "
          f"{', '.join(task.metric_names)} (first is the official one); the majority "
          "row always predicts the training split's most frequent class, on "
          "the same dev examples (a model that learned nothing scores this)"
      ],
  }


def majority_class_scores(
    ctx: Context, task_name: str, split: str, seeds
) -> dict[int, dict[str, float]]:
  """Per seed, the scores of always predicting the most frequent training label on the
  ``split`` examples that seed's runs evaluate (the tweets' splits and the evaluation
  subsets of ``max_eval_examples`` depend on the seed)."""
  config = ctx.ex.base_config
  task = data.get_task(task_name)
  scores = {}
  for seed in seeds:
    load = lambda name: data.load_task(
        task_name, name, config.data_dir, source=config.source, seed=seed
    ).labels
    train_labels, labels = load("train"), load(split)
    majority = int(np.argmax(np.bincount(train_labels, minlength=task.num_labels)))
    keep = data.eval_subset(len(labels), config.max_eval_examples, seed)
    labels = labels if keep is None else labels[keep]
    scores[seed] = task.metrics(labels, np.full_like(labels, majority))
  return scores


def majority_class_row(ctx: Context, task_name: str, max_length: int) -> dict:
  """The dev scores of always predicting the most frequent training label, mean over the
  plan's seeds (each on its own evaluated examples)."""
  by_seed = majority_class_scores(ctx, task_name, "dev", ctx.plan.seeds)
  row = {
      "task": task_name,
      "optimizer": None,
      "variant": DISPLAY["majority"],
      "learning_rate": None,
      "seeds": len(by_seed),
      "max_length": max_length,
  }
  for metric in data.get_task(task_name).metric_names:
    row[metric], row[f"{metric}_std"] = mean_std([s[metric] for s in by_seed.values()])
  return row


@study("Question answering (SQuAD v1.1, held-out articles)")
def squad(ctx: Context) -> dict:
  plan = ctx.plan
  task = data.get_task("squad")
  settings = dict(plan.qa_settings)
  rows = {}
  for name in plan.qa_optimizers:
    group = ctx.group("squad", task.name, name, extra=settings)
    if group is None:
      continue
    row = {"task": task.name, **group.describe(), "seeds": len(group.results), **settings}
    for metric in task.metric_names:
      row.update(group.stats(metric, "dev", metric))
    row["step_seconds"] = group.step_seconds()
    rows[group.variant] = row
  comparisons = []
  best = ctx.resolve("best_proximal")  # chosen on held-out SST-2 training data
  for base in (b for b in BASELINES if best in rows and b in rows):
    record = comparison(rows[best], rows[base], task.primary_metric, study="squad", task="squad")
    comparisons.append(record)
  tuned_on = data.get_task(plan.tuning.task).display_name
  return {
      "tables": {"squad": list(rows.values())},
      "comparisons": comparisons,
      "notes": [
          f"learning rate and damping of every optimizer are its choice on held-out {tuned_on} "
          "training data (not tuned for QA, the same rule for each)"
      ],
  }
