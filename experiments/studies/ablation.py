"""Where the gain comes from (issue 40, part 2): the filter → AdamW variant the tuning built
(``plan.ablation_variant``, "iEF → AdamW" when iEF is the best filter) differs from AdamW
in its example weights and in its Gram filter. At its tuned settings, ``plan.seeds`` seeds,
on ``plan.ablation_tasks``, each part is taken away in turn:

(a) the weights without the Gram: AdamW on the example-weighted mean gradient Σ wᵢ gᵢ
    (optimizer ``weighted_mean_adamw``, :func:`nearprox.training.optimizers.
    weighted_mean_aggregate`), the same weights, learning rate and chain;
(b) the Gram without the weights: the same filter with uniform weights (EF → AdamW);
(c) the Gram estimated from a sketch (``optimizer.sketch_dim = plan.sketch_dim``, the sketch
    study's k).

Each is compared with the variant itself by the fixed rule (:func:`core.comparison`), and
(a) also with (c). If (a) is level with the variant, the Gram is not what helps.
"""

from __future__ import annotations

from experiments.report import DAMPING, LR, OPTIMIZER, SEEDS, get, spread, table
from experiments.studies.core import comparison, summary_rows
from experiments.tuning import Context
from nearprox.text import data

TITLE = "Where the gain comes from (ablation)"
PLAN = {"ablation_variant": "proximal_adamw", "ablation_tasks": ("sst2", "tweets")}
PARTS = ("weights only", "uniform weights", "sketched Gram")


def ablations(ctx: Context, variant: str) -> dict[str, tuple[str, dict]]:
  """{part: (label, overrides on top of the variant's)} of the parts that differ from it."""
  overrides = ctx.overrides(variant) or {}
  weighting = overrides.get("optimizer.weighting", "uniform")
  weights = "iEF" if weighting == "ief" else weighting
  found = {
      "weights only": (
          f"(a) AdamW on the {weights}-weighted mean gradient, no Gram",
          {"optimizer.name": "weighted_mean_adamw"},
      ),
      "uniform weights": (
          "(b) the same filter, uniform weights → AdamW",
          {"optimizer.weighting": "uniform"},
      ),
      "sketched Gram": (
          f"(c) the same, sketched Gram (k = {ctx.plan.sketch_dim})",
          {"optimizer.sketch_dim": ctx.plan.sketch_dim},
      ),
  }
  if weighting == "uniform":  # (a) would be AdamW itself and (b) the variant itself
    del found["weights only"], found["uniform weights"]
  return found


def _row(task: str, part: str, label: str, group, metric: str, split: str) -> dict:
  """A table row: the group's settings and its mean ± seed std on the task's reported split."""
  mean, std = group.stat(split, metric)
  row = {"task": task, "part": part, **group.describe(), "variant": label}
  if part == "weights only":
    row["damping"] = None  # no filter: its damping does nothing
  row |= {"seeds": len(group.results), "metric": metric, "split": split}
  return row | {"mean": mean, "std": std}


def run(ctx: Context) -> dict:
  plan = ctx.plan
  variant = ctx.resolve(plan.ablation_variant)
  rows, summary, comparisons = [], [], []
  if variant is None or ctx.overrides(variant) is None:
    ctx.waiting.append(plan.ablation_variant)
    return {"tables": {"ablation": rows}, "comparisons": comparisons}
  parts = ablations(ctx, variant)
  for task in plan.ablation_tasks:
    info = data.get_task(task)
    metric, split = info.primary_metric, info.reported_split
    found = {}
    for part, label, name, extra in (
        ("AdamW", None, "adamw", None),
        ("tuned", None, variant, None),
        *((part, label, variant, extra) for part, (label, extra) in parts.items()),
    ):
      run_label = "optimizers" if extra is None else "ablation"
      group = ctx.group(run_label, task, name, extra=extra)
      if group is None:
        continue
      row = _row(task, part, label or group.label, group, metric, split)
      found[part] = row
      rows.append(row)
      values = [(metric, "mean", "std")]
      summary += summary_rows("ablation", row, group, values, split=split, condition=part)
    condition = f"{info.display_name} {split} {metric}"
    pairs = [(part, "tuned") for part in parts] + [("weights only", "sketched Gram")]
    for subject, baseline in pairs:
      if subject in found and baseline in found:
        record = comparison(
            found[subject],
            found[baseline],
            "mean",
            "std",
            study="ablation",
            task=task,
            condition=condition,
        )
        comparisons.append({**record, "subject_part": subject, "baseline_part": baseline})
  return {"tables": {"ablation": rows, "summary": summary}, "comparisons": comparisons}


def markdown(study: dict) -> str:
  rows = study["tables"]["ablation"]
  columns = [
      ("task", get("task", lambda t: data.get_task(t).display_name)),
      OPTIMIZER,
      LR,
      DAMPING,
      SEEDS,
      ("split", lambda r: f"{r['split']} {r['metric']}"),
      ("score (%)", spread("mean", "std")),
  ]
  lines = [
      f"- {r['condition']}: {r['subject']} vs {r['baseline']}: **{r['outcome']}** "
      f"({100 * r['difference']:+.1f} points)"
      for r in study["comparisons"]
  ]
  text = table(rows, columns)
  if lines:
    text += "\n\nBy the fixed rule (beyond both seed spreads summed and one point):\n\n"
    text += "\n".join(lines)
  matches = {
      r["task"]: r["outcome"] == "level"
      for r in study["comparisons"]
      if (r["subject_part"], r["baseline_part"]) == ("weights only", "tuned")
  }
  if matches:
    name = lambda task: data.get_task(task).display_name
    held = [name(t) for t, level in matches.items() if level]
    not_held = [name(t) for t, level in matches.items() if not level]
    text += (
        "\n\n(a) matches the tuned variant on: "
        + (", ".join(held) or "none")
        + "; not on: "
        + (", ".join(not_held) or "none")
        + "."
    )
  return text
