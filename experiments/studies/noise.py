"""Study 6: 20% / 40% flipped SST-2 training labels, and the tweets' low-confidence test
examples.

The noisy levels train ``plan.noise_seeds`` seeds (issue 40, part 5: five; empty: the plan's
seeds), the clean level is the optimizer study's runs; at the highest level the tuned
proximal variants are compared with AdamW."""

from __future__ import annotations

from pathlib import Path

from experiments.report import (
    OPTIMIZER,
    SEEDS,
    accuracy_by_variant,
    get,
    pct,
    pyplot,
    save_figure,
    spread,
    table,
)
from experiments.studies.core import LOW_CONFIDENCE_TASK, STUDY_TASK, comparison, summary_rows
from experiments.tuning import PROXIMAL, Context

TITLE = "Noisy labels"
PLAN = {"noise_seeds": ()}  # empty: plan.seeds


def run(ctx: Context) -> dict:
  plan = ctx.plan
  rows, groups, comparisons = {}, {}, []
  noisy_seeds = tuple(plan.get("noise_seeds") or ()) or None  # None: plan.seeds
  for name in plan.noise_optimizers:
    for level in (0.0, *plan.noise_levels):
      label = "optimizers" if level == 0.0 else "noise"
      seeds = None if level == 0.0 else noisy_seeds
      group = ctx.group(label, STUDY_TASK, name, seeds=seeds, extra={"label_noise": level})
      if group is not None:
        groups[group.variant, level] = group
        rows[group.variant, level] = {
            **group.describe(),
            "label_noise": level,
            "seeds": len(group.results),
            **group.stats("dev_accuracy", "dev", "accuracy"),
        }
  top = max((level for _, level in rows), default=0.0)
  for variant in PROXIMAL:
    if top > 0.0 and (variant, top) in rows and ("adamw", top) in rows:
      record = comparison(
          rows[variant, top],
          rows["adamw", top],
          "dev_accuracy",
          study="noise",
          condition=f"SST-2 dev acc., {100 * top:.0f}% flipped training labels",
      )
      comparisons.append({**record, "label_noise": top})
  low = {}
  if LOW_CONFIDENCE_TASK in plan.optimizer_tasks:
    for variant in plan.optimizer_variants:
      group = ctx.group("optimizers", LOW_CONFIDENCE_TASK, variant)
      if group is not None:
        groups[group.variant] = group
        low[group.variant] = {
            **group.describe(),
            "seeds": len(group.results),
            **group.stats("test_accuracy", "test", "accuracy"),
            **group.stats("low_confidence_accuracy", "test_low_confidence", "accuracy"),
        }
  best = ctx.resolve("best_proximal")  # chosen by the tuning, not on the test split
  if best in low and "adamw" in low:
    key = "low_confidence_accuracy"
    comparisons.append(
        comparison(
            low[best],
            low["adamw"],
            key,
            study="noise",
            task=LOW_CONFIDENCE_TASK,
            condition="Tweets low-confidence test acc.",
        )
    )
  accuracy = [("accuracy", "dev_accuracy")]
  summary = [
      record
      for (variant, level), row in rows.items()
      for record in summary_rows(
          "noise",
          row,
          groups[variant, level],
          accuracy,
          condition=f"label noise {100 * level:.0f}%",
      )
  ]
  for variant, row in low.items():
    summary += summary_rows(
        "noise",
        row,
        groups[variant],
        [("accuracy", "low_confidence_accuracy")],
        task=LOW_CONFIDENCE_TASK,
        split="test_low_confidence",
        condition="low-confidence test labels",
    )
  tables = {"noise": list(rows.values()), "low_confidence": list(low.values()), "summary": summary}
  return {"tables": tables, "comparisons": comparisons}


def markdown(study: dict) -> str:
  parts = []
  if study["tables"]["noise"]:
    columns = [
        OPTIMIZER,
        ("flipped train labels (%)", get("label_noise", pct)),
        SEEDS,
        ("SST-2 dev acc (%)", spread("dev_accuracy", "dev_accuracy_std")),
    ]
    parts.append(table(study["tables"]["noise"], columns) + "\n\n![noise](PLOT:noise.png)")
  if study["tables"]["low_confidence"]:
    columns = [
        OPTIMIZER,
        SEEDS,
        ("test acc (%)", spread("test_accuracy", "test_accuracy_std")),
        (
            "low-confidence test acc (%)",
            spread("low_confidence_accuracy", "low_confidence_accuracy_std"),
        ),
    ]
    parts.append(
        "Tweets, test examples whose annotator confidence is below the config's "
        "`low_confidence_below` (the noisily labelled ones):\n\n"
        + table(study["tables"]["low_confidence"], columns)
    )
  return "\n\n".join(parts)


def plots(study: dict, out: Path) -> list[Path]:
  rows = study["tables"]["noise"]
  if not rows:
    return []
  fig, ax = pyplot().subplots(figsize=(5, 3.5))
  accuracy_by_variant(ax, rows, "label_noise")
  ax.set(
      xlabel="fraction of flipped training labels", ylabel="SST-2 dev accuracy", title="label noise"
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out / "noise.png")
