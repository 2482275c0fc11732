"""Study 2: relative λ sweep for both filters: accuracy and the Gram spectrum (effective
rank, kept fraction) across training."""

from __future__ import annotations

from pathlib import Path

from experiments.report import LR, get, pct, pyplot, save_figure, table
from experiments.studies.core import STUDY_TASK, dev_curve, summary_rows
from experiments.tuning import Context, final, history_curve, mean_std

TITLE = "Damping sweep (relative λ)"
# Its summary.json records beside the accuracy: the Gram spectrum the training steps log.
SPECTRUM = [
    (f"{name} ({when})", f"{key}_{when}")
    for name, key in (("effective rank of K", "effective_rank"), ("kept fraction", "kept_fraction"))
    for when in ("mean", "final")
]


def run(ctx: Context) -> dict:
  plan = ctx.plan
  rows, curves, summary = [], {}, []
  for filt in plan.damping_filters:
    for lam in plan.damping_grid:
      extra = {"optimizer.damping": lam, "optimizer.damping_mode": "relative"}
      group = ctx.group("damping", STUDY_TASK, f"proximal_{filt}", plan.seeds[:1], extra)
      if group is None:
        continue
      result = group.results[0]
      rank = history_curve(result, "train/gram/effective_rank")
      kept = history_curve(result, "train/gram/kept_fraction")
      rows.append(
          {
              "filter": filt,
              "damping": lam,
              "learning_rate": group.lr,
              "seed": plan.seeds[0],
              "dev_accuracy": final(result, "dev", "accuracy"),
              "effective_rank_mean": mean_std([v for _, v in rank])[0],
              "effective_rank_final": rank[-1][1] if rank else float("nan"),
              "kept_fraction_mean": mean_std([v for _, v in kept])[0],
              "kept_fraction_final": kept[-1][1] if kept else float("nan"),
              "step_seconds": result["report"]["train_step_seconds"],
          }
      )
      condition = f"relative λ={lam:g}"
      accuracy = [("accuracy", "dev_accuracy")]
      summary += summary_rows("damping", rows[-1], group, accuracy, condition=condition)
      summary += summary_rows(
          "damping", rows[-1], group, SPECTRUM, split="train", condition=condition
      )
      curves[f"{filt}:{lam:g}"] = {
          "effective_rank": rank,
          "kept_fraction": kept,
          "dev": dev_curve(result, "accuracy"),
      }
  return {"tables": {"damping": rows, "summary": summary}, "curves": curves}


def markdown(study: dict) -> str:
  columns = [
      ("filter", get("filter", str)),
      ("λ (relative)", get("damping")),
      LR,
      ("SST-2 dev acc (%)", get("dev_accuracy", pct)),
      ("eff. rank (mean)", get("effective_rank_mean")),
      ("eff. rank (final)", get("effective_rank_final")),
      ("kept fraction (mean)", get("kept_fraction_mean")),
      ("kept fraction (final)", get("kept_fraction_final")),
  ]
  return (
      table(study["tables"]["damping"], columns)
      + "\n\nEffective rank: participation ratio (Σσ)²/Σσ² of K's spectrum (1 … B). Kept "
      "fraction: ‖d‖²/‖g‖² of the filtered vs the plain mean gradient.\n\n"
      "![damping](PLOT:damping.png)"
  )


def plots(study: dict, out: Path) -> list[Path]:
  rows = study["tables"]["damping"]
  if not rows:
    return []
  fig, axes = pyplot().subplots(1, 3, figsize=(14, 3.8))
  for filt in dict.fromkeys(r["filter"] for r in rows):
    mine = sorted((r for r in rows if r["filter"] == filt), key=lambda r: r["damping"])
    axes[0].plot(
        [r["damping"] for r in mine], [r["dev_accuracy"] for r in mine], marker="o", label=filt
    )
  axes[0].set(
      xscale="log", xlabel="relative damping λ", ylabel="SST-2 dev accuracy", title="accuracy vs λ"
  )
  axes[0].legend()
  for name, curve in study["curves"].items():
    filt, lam = name.split(":")
    style = "-" if filt == "tikhonov" else "--"
    for ax, key in ((axes[1], "effective_rank"), (axes[2], "kept_fraction")):
      if curve[key]:
        ax.plot(*zip(*curve[key]), style, label=f"{filt} λ={lam}")
  axes[1].set(xlabel="step", ylabel="effective rank of K", title="Gram spectrum")
  axes[2].set(xlabel="step", ylabel="‖d‖² / ‖g‖²", title="kept fraction")
  axes[2].legend(fontsize=6)
  for ax in axes:
    ax.grid(alpha=0.3)
  return save_figure(fig, out / "damping.png")
