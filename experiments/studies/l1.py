"""Study: L1 as its proximal step (``optimizer.l1_weight``, soft-thresholding of the kernels
after every update): SST-2 dev accuracy against the fraction of exactly zero kernel weights,
for AdamW and the tuned proximal variant, each at its tuned settings (issue 41)."""

from __future__ import annotations

from pathlib import Path

from experiments.report import LR, OPTIMIZER, SEEDS, get, pct, pyplot, save_figure, spread, table
from experiments.studies.core import STUDY_TASK, summary_rows
from experiments.tuning import Context, Group, history_curve, mean_std

TITLE = "L1 as a proximal step: accuracy against sparsity"
# λ₁ grid and optimizers; a mode's plan may set them (full.py's docstring says why these).
PLAN = {"l1_weights": (0.1, 0.3, 1.0, 3.0), "l1_optimizers": ("adamw", "best_proximal")}
ZEROS = "train/zeros/all"  # the fraction the train step logs after the prox, all kernels
# Its summary.json records: (metric, row key); the zero fraction is of the final parameters.
ACCURACY, ZERO = ("accuracy", "dev_accuracy"), ("fraction of zero kernel weights", "zero_fraction")


def final_zero_fraction(result: dict) -> float:
  """The fraction of exactly zero kernel weights after the last step (NaN: a run without
  the prox, which does not log it)."""
  points = [value for step, value in history_curve(result, ZEROS)]
  return points[-1] if points else float("nan")


def row(group: Group, l1_weight: float) -> dict:
  zeros, zeros_std = mean_std([final_zero_fraction(r) for r in group.results])
  return {
      **group.describe(),
      "l1_weight": l1_weight,
      "seeds": len(group.results),
      **group.stats("dev_accuracy", "dev", "accuracy"),
      "zero_fraction": zeros,
      "zero_fraction_std": zeros_std,
      "collapsed_seeds": group.collapsed_seeds(),
  }


def run(ctx: Context) -> dict:
  """λ₁ = 0 is the optimizer study's run at the same settings (no prox, no zeros logged)."""
  plan = ctx.plan
  rows, summary = [], []
  for name in plan.l1_optimizers:
    for l1_weight in (0.0, *plan.l1_weights):
      if l1_weight == 0.0:
        group = ctx.group("optimizers", STUDY_TASK, name)
      else:
        group = ctx.group("l1", STUDY_TASK, name, extra={"optimizer.l1_weight": l1_weight})
      if group is not None:
        rows.append(row(group, l1_weight))
        condition = f"λ₁={l1_weight:g}"
        summary += summary_rows("l1", rows[-1], group, [ACCURACY], condition=condition)
        summary += summary_rows("l1", rows[-1], group, [ZERO], split=None, condition=condition)
  return {"tables": {"l1": rows, "summary": summary}}


def markdown(study: dict) -> str:
  rows = study["tables"]["l1"]
  if not rows:
    return ""
  columns = [
      OPTIMIZER,
      LR,
      ("λ₁", get("l1_weight", lambda x: f"{x:g}")),
      SEEDS,
      ("SST-2 dev acc (%)", spread("dev_accuracy", "dev_accuracy_std")),
      (
          "zero kernel weights (%)",
          lambda r: pct(r["zero_fraction"], r["zero_fraction_std"], r["seeds"]),
      ),
      ("one-class seeds", get("collapsed_seeds", lambda n: "—" if n is None else n)),
  ]
  return (
      table(rows, columns) + "\n\n![l1](PLOT:l1.png)\n\n"
      "After every update the kernels (dense weights; not biases, LayerNorm, embeddings) are "
      "soft-thresholded at lr_t·λ₁ with the optimizer's own schedule "
      "(`nearprox.soft_threshold_l1`): the proximal step of λ₁‖θ‖₁ in the Euclidean metric, "
      "also after Adam's preconditioning. Zero kernel weights: the fraction exactly 0 after "
      "the last step, over all kernels. λ₁ = 0 is the optimizer study's run (no prox; — : not "
      "logged), drawn as a dashed line in the plot."
  )


def plots(study: dict, out: Path) -> list[Path]:
  rows = study["tables"]["l1"]
  if not rows:
    return []
  fig, ax = pyplot().subplots(figsize=(5, 3.5))
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = [r for r in rows if r["variant"] == variant]
    swept = sorted((r for r in mine if r["l1_weight"] > 0), key=lambda r: r["l1_weight"])
    line = ax.errorbar(
        [r["zero_fraction"] for r in swept],
        [r["dev_accuracy"] for r in swept],
        xerr=[r["zero_fraction_std"] for r in swept],
        yerr=[r["dev_accuracy_std"] for r in swept],
        marker="o",
        capsize=3,
        label=variant,
    )
    for r in swept:
      point = (r["zero_fraction"], r["dev_accuracy"])
      ax.annotate(f"λ₁={r['l1_weight']:g}", point, (4, 4), textcoords="offset points", fontsize=6)
    for r in (r for r in mine if r["l1_weight"] == 0):
      color = line.lines[0].get_color()
      ax.axhline(r["dev_accuracy"], color=color, linestyle="--", linewidth=1)
  ax.set(
      xlabel="fraction of zero kernel weights",
      ylabel="SST-2 dev accuracy",
      title="L1 prox: accuracy vs sparsity (dashed: λ₁ = 0)",
  )
  ax.set_xlim(0.0, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out / "l1.png")
