"""Batch size at a fixed example budget (issue 40, part 4): ``plan.batch_variants`` (AdamW
and the tuned proximal variant) on SST-2 at every B of ``plan.batch_sizes``, each trained on
``plan.batch_example_budget`` examples (⌈budget / B⌉ steps, the same schedule shape),
``plan.seeds`` seeds, dev accuracy against B.

The learning-rate rule, the same for every optimizer and fixed before the runs: at the mode's
batch size B₀ (config.batch_size) each variant keeps the tuning's choice η₀; at another B it
tunes the learning rate over the trials η₀·√(B/B₀)·f, f ∈ ``plan.batch_lr_factors``, by
the tuning protocol (held-out training examples, ``plan.tuning.seeds``, best mean) on the
tuning budget's examples (⌈tuning.steps·B₀ / B⌉ steps), its other settings (damping
included) at their B₀ choice. The square-root centre is the scaling rule of adaptive methods
(Malladi, Lyu, Panigrahi & Arora, "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms", NeurIPS 2022, arXiv 2205.10287: for Adam, η ∝ √B keeps the SDE of the
iterates); both optimizers end in Adam's update, so one rule serves both, and the trials
around it keep the rule from deciding the comparison.
"""

from __future__ import annotations

import math
from pathlib import Path

from experiments.report import (
    DAMPING,
    OPTIMIZER,
    SEEDS,
    accuracy_by_variant,
    get,
    num,
    pyplot,
    save_figure,
    spread,
)
from experiments.report import table as markdown_table
from experiments.studies.core import STUDY_TASK, comparison, summary_rows
from experiments.tuning import Context, choose

TITLE = "Batch size at a fixed example budget"
PLAN = {
    "batch_sizes": (32, 128, 512),
    "batch_example_budget": 19200,  # 600 steps × 32
    "batch_variants": ("adamw", "best_proximal"),
    "batch_lr_factors": (0.5, 1.0, 2.0),
    "batch_sketch_dim": 0,  # k of the proximal variants' sketched Gram; 0: the exact Gram
}


def steps_for(examples: int, batch_size: int) -> int:
  """⌈examples / B⌉: the steps that see ``examples`` training examples at batch size B."""
  return -(-int(examples) // int(batch_size))


def scaled_learning_rate(learning_rate: float, batch_size: int, base_batch_size: int) -> float:
  """The square-root rule: η·√(B/B₀)."""
  return learning_rate * math.sqrt(batch_size / base_batch_size)


def learning_rate_trials(
    learning_rate: float, batch_size: int, base_batch_size: int, factors
) -> list[dict]:
  """The tuning trials at B: η₀·√(B/B₀)·f for each factor f."""
  centre = scaled_learning_rate(learning_rate, batch_size, base_batch_size)
  return [{"optimizer.learning_rate": centre * f} for f in factors]


def run(ctx: Context) -> dict:
  plan = ctx.plan
  config = ctx.store.base_config
  base_batch, tuning_examples = config.batch_size, plan.tuning.steps * config.batch_size
  sketch = {"optimizer.sketch_dim": plan.batch_sketch_dim} if plan.batch_sketch_dim else {}
  rows, tuning_rows, summary, by_key = [], [], [], {}
  for name in plan.batch_variants:
    variant = ctx.resolve(name)
    chosen = ctx.best_trial(variant) if variant else None
    if chosen is None:
      continue
    base_lr = chosen["trial"]["optimizer.learning_rate"]
    gram = sketch if variant.startswith("proximal") else {}
    for batch_size in plan.batch_sizes:
      steps = steps_for(plan.batch_example_budget, batch_size)
      at_batch = {"batch_size": batch_size, "num_train_steps": steps}
      if batch_size == base_batch:
        learning_rate, factor = base_lr, None
      else:
        trials = [  # the B₀ choice's other settings (its damping) with each rate
            {**chosen["trial"], **trial}
            for trial in learning_rate_trials(
                base_lr, batch_size, base_batch, plan.batch_lr_factors
            )
        ]
        budget = {"batch_size": batch_size}
        budget["num_train_steps"] = steps_for(tuning_examples, batch_size)
        found, complete = ctx.tune(variant, trials, extra={**budget, **gram})
        pick = choose(found) if complete else None
        for row in found:
          is_chosen = pick is not None and row["trial"] == pick["trial"]
          tuning_rows.append(
              {k: v for k, v in row.items() if k != "trial"}
              | {"batch_size": batch_size, "steps": budget["num_train_steps"], "chosen": is_chosen}
          )
        if pick is None:
          continue
        learning_rate = pick["learning_rate"]
        factor = learning_rate / scaled_learning_rate(base_lr, batch_size, base_batch)
      extra = {**at_batch, "optimizer.learning_rate": learning_rate, **gram}
      if batch_size == base_batch and not gram:
        extra = None  # the optimizer study's runs
      group = ctx.group(
          "optimizers" if extra is None else "batch_size", STUDY_TASK, name, extra=extra
      )
      if group is None:
        continue
      row = {
          **group.describe(),
          "learning_rate": learning_rate,
          "lr_factor": factor,
          "batch_size": batch_size,
          "steps": steps,
          "sketch_dim": gram.get("optimizer.sketch_dim"),
          "seeds": len(group.results),
          **group.stats("dev_accuracy", "dev", "accuracy"),
          "collapsed_seeds": group.collapsed_seeds(),
      }
      rows.append(row)
      by_key[variant, batch_size] = row
      condition = f"B={batch_size}, {plan.batch_example_budget} training examples"
      if row["sketch_dim"]:
        condition += f", sketched Gram, k={row['sketch_dim']}"
      values = [("accuracy", "dev_accuracy")]
      summary += summary_rows("batch_size", row, group, values, condition=condition)
  comparisons = []
  best = ctx.resolve("best_proximal")
  for batch_size in plan.batch_sizes:
    for variant in sorted({v for v, b in by_key if b == batch_size and v != "adamw"}):
      if ("adamw", batch_size) not in by_key or batch_size == base_batch:
        continue  # at B₀ the optimizer and sketch studies compare these runs
      record = comparison(
          by_key[variant, batch_size],
          by_key["adamw", batch_size],
          "dev_accuracy",
          study="batch_size",
          task=STUDY_TASK,
          batch_size=batch_size,
          condition=f"SST-2 dev acc., batch {batch_size} "
          f"({steps_for(plan.batch_example_budget, batch_size)} steps)"
          + (f", sketched Gram (k = {plan.batch_sketch_dim})" if sketch else ""),
      )
      comparisons.append({**record, "preselected": variant == best})
  tables = {"batch_size": rows, "batch_size_tuning": tuning_rows, "summary": summary}
  rule = {
      "base_batch_size": base_batch,
      "lr_factors": list(plan.batch_lr_factors),
      "example_budget": plan.batch_example_budget,
  }
  return {"tables": tables, "comparisons": comparisons, "rule": rule}


def markdown(study: dict) -> str:
  rule = study["rule"]
  factor = ("lr ÷ √(B/B₀)·η₀", get("lr_factor", lambda f: "η₀ (tuned)" if f is None else f"{f:g}"))
  columns = [
      OPTIMIZER,
      ("batch", get("batch_size", str)),
      ("steps", get("steps", str)),
      ("lr", get("learning_rate")),
      factor,
      DAMPING,
      ("Gram", _gram_cell),
      SEEDS,
      ("SST-2 dev acc (%)", spread("dev_accuracy", "dev_accuracy_std")),
      ("one-class seeds", get("collapsed_seeds", lambda n: "—" if n is None else n)),
  ]
  factors = ", ".join(f"{f:g}" for f in rule["lr_factors"])
  parts = [
      markdown_table(study["tables"]["batch_size"], columns)
      + f"\n\nEvery run sees {rule['example_budget']} training examples. Learning rate at "
      f"batch B: the tuning's choice η₀ at B₀ = {rule['base_batch_size']}; elsewhere the best "
      f"of η₀·√(B/B₀)·f, f ∈ {{{factors}}}, on the tuning's held-out training examples (the "
      "square-root rule of Malladi et al. 2022 for adaptive methods, the same for every "
      "optimizer).\n\n![batch size](PLOT:batch_size.png)"
  ]
  if study["tables"].get("batch_size_tuning"):
    columns = [
        OPTIMIZER,
        ("batch", get("batch_size", str)),
        ("steps", get("steps", str)),
        ("lr", get("learning_rate", num)),
        SEEDS,
        ("held-out score (%)", spread("score", "score_std")),
        ("chosen", lambda r: "✓" if r["chosen"] else ""),
    ]
    parts.append(
        "Learning-rate trials per batch size (held-out training examples, the tuning's "
        "example budget):\n\n" + markdown_table(study["tables"]["batch_size_tuning"], columns)
    )
  return "\n\n".join(parts)


def _gram_cell(row: dict) -> str:
  if row["damping"] is None:
    return "—"  # no Gram
  return f"sketched, k = {row['sketch_dim']}" if row["sketch_dim"] else "exact"


def plots(study: dict, out: Path) -> list[Path]:
  rows = study["tables"]["batch_size"]
  if not rows:
    return []
  fig, ax = pyplot().subplots(figsize=(5, 3.5))
  accuracy_by_variant(ax, rows, "batch_size")
  ax.set_xscale("log", base=2)
  ax.set(xlabel="batch size (fixed example budget)", ylabel="SST-2 dev accuracy")
  ax.set_title("accuracy vs batch size")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out / "batch_size.png")
