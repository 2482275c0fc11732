"""Tables (CSV), plots (PNG) and the generated README section from the study dicts.

Every number written here comes from a study dict of :mod:`studies`, i.e. from run result
files; nothing is typed in. The verdict paragraph is templated text around those numbers.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import studies
from studies import DISPLAY

TASK_NAMES = {"sst2": "SST-2", "tweets": "tweets", "mrpc": "MRPC", "cola": "CoLA", "rte": "RTE"}


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


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_optimizers(study: dict, out: Path) -> list[Path]:
  """Per task: dev metric and train loss vs step, one line per optimizer (seed mean)."""
  plt, paths = _pyplot(), []
  for task, variants in study["curves"].items():
    fig, (ax_dev, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant, curve in variants.items():
      if curve["dev"]:
        ax_dev.plot(*zip(*curve["dev"]), marker="o", label=DISPLAY[variant])
      if curve["loss"]:
        ax_loss.plot(*zip(*curve["loss"]), label=DISPLAY[variant])
    ax_dev.set(
        xlabel="step",
        ylabel=f"dev {studies.primary_metric(task)}",
        title=f"{TASK_NAMES[task]}: dev metric",
    )
    ax_loss.set(xlabel="step", ylabel="train loss", title=f"{TASK_NAMES[task]}: train loss")
    for ax in (ax_dev, ax_loss):
      ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"optimizers_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def plot_damping(study: dict, out: Path) -> list[Path]:
  rows = study["tables"]["damping"]
  if not rows:
    return []
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
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
  fig.tight_layout()
  path = out / "damping.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


def plot_robustness(study: dict, out: Path) -> list[Path]:
  if not study["curves"]:
    return []
  from nearprox.text import robustness

  path = out / "robustness.png"
  robustness.plot_accuracy(study["curves"], path, title="SST-2 dev under embedding PGD")
  return [path]


def plot_noise(study: dict, out: Path) -> list[Path]:
  rows = study["tables"]["noise"]
  if not rows:
    return []
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["label_noise"])
    ax.errorbar(
        [r["label_noise"] for r in mine],
        [r["dev_accuracy"] for r in mine],
        yerr=[r["dev_accuracy_std"] for r in mine],
        marker="o",
        capsize=3,
        label=DISPLAY[variant],
    )
  ax.set(
      xlabel="fraction of flipped training labels", ylabel="SST-2 dev accuracy", title="label noise"
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = out / "noise.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return [path]


PLOTS = {
    "optimizers": plot_optimizers,
    "damping": plot_damping,
    "adversarial": plot_robustness,
    "noise": plot_noise,
}


# ------------------------------------------------------------------------------ markdown


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


def table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def status(study: dict) -> str:
  found = study["requested"] - len(study["missing"])
  if not any(study["tables"].values()):
    return "**not run**" + (f" ({len(study['missing'])} runs missing)" if study["missing"] else "")
  if study["missing"]:
    return f"**incomplete**: {found} of its {study['requested']} runs exist"
  return f"complete ({found} run(s) of its own, plus any shared with earlier studies)"


def _steps_cell(row) -> str:
  if row["reached"] == 0:
    return f"not reached ({row['steps']})"
  text = f"{row['steps_to_target']:.0f}"
  return text if row["reached"] == row["seeds"] else f"{text} ({row['reached']}/{row['seeds']})"


def md_optimizers(study: dict) -> str:
  parts = []
  summary = study["tables"]["summary"]
  for task in dict.fromkeys(r["task"] for r in summary):
    rows = [r for r in summary if r["task"] == task]
    first = rows[0]
    split, metric = first["split"], first["metric"]
    header = [
        "optimizer",
        "lr",
        "seeds",
        f"{split} {metric} (%)",
        f"steps to {pct(first['target'])}% dev",
        "s/step",
        "× SGD",
    ]
    if task == "tweets":
      header[4:4] = ["test macro-F1 (%)", "low-confidence test acc (%)"]
    body = []
    for r in rows:
      cells = [
          DISPLAY[r["variant"]],
          num(r["lr"]),
          r["seeds"],
          pct(r["mean"], r["std"], r["seeds"]),
          _steps_cell(r),
          num(r["step_seconds"]),
          num(r["step_ratio_to_sgd"]),
      ]
      if task == "tweets":
        cells[4:4] = [
            pct(r["test_macro_f1"]),
            pct(r["low_confidence_accuracy"], r["low_confidence_std"], r["seeds"]),
        ]
      body.append(cells)
    parts.append(
        f"**{TASK_NAMES[task]}** ({split} split; {first['steps']} steps; target = "
        f"{pct(first['target'])}% dev {metric}, i.e. the plan's fraction of the best "
        f"optimizer's mean final dev score)\n\n"
        + table(header, body)
        + f"\n\n![{task}](PLOT:optimizers_{task}.png)"
    )
  sweep = study["tables"]["lr_sweep"]
  if sweep:
    body = [
        [
            TASK_NAMES[r["task"]],
            DISPLAY[r["variant"]],
            num(r["lr"]),
            pct(next(v for k, v in r.items() if k.startswith("dev_"))),
            num(r["train_loss_end"]),
            "✓" if r["chosen"] else "",
        ]
        for r in sweep
    ]
    parts.append(
        "Learning-rate sweep (seed 0, dev split; ✓ = chosen: best dev score, ties "
        "broken by the lower final training loss):\n\n"
        + table(["task", "optimizer", "lr", "dev (%)", "final train loss", "chosen"], body)
    )
  return "\n\n".join(parts)


def md_damping(study: dict) -> str:
  rows = study["tables"]["damping"]
  body = [
      [
          r["filter"],
          num(r["damping"]),
          num(r["lr"]),
          pct(r["dev_accuracy"]),
          num(r["effective_rank_mean"]),
          num(r["effective_rank_final"]),
          num(r["kept_fraction_mean"]),
          num(r["kept_fraction_final"]),
      ]
      for r in rows
  ]
  return (
      table(
          [
              "filter",
              "λ (relative)",
              "lr",
              "SST-2 dev acc (%)",
              "eff. rank (mean)",
              "eff. rank (final)",
              "kept fraction (mean)",
              "kept fraction (final)",
          ],
          body,
      )
      + "\n\nEffective rank: participation ratio (Σσ)²/Σσ² of K's spectrum (1 … B). Kept "
      "fraction: ‖d‖²/‖g‖² of the filtered vs the plain mean gradient.\n\n"
      "![damping](PLOT:damping.png)"
  )


def _training_attack(row: dict) -> str:
  """The training perturbation's radius and ascent steps (older rows lack them)."""
  if row["objective"] == "clean" or "train_epsilon" not in row:
    return "–"
  return f"ε={row['train_epsilon']:g}, {row['train_steps']} step(s)"


def md_adversarial(study: dict) -> str:
  rows = study["tables"]["adversarial"]
  eps = [k for k in rows[0] if k.startswith("acc_eps_")]
  body = [
      [
          DISPLAY[r["variant"]],
          r["objective"],
          _training_attack(r),
          pct(r["dev_accuracy"]),
          *[pct(r[k]) for k in eps],
          num(r["step_ratio_to_clean"]),
      ]
      for r in rows
  ]
  first = rows[0]
  return (
      table(
          [
              "optimizer",
              "objective",
              "training δ",
              "clean dev acc (%)",
              *[f"ε={k[8:]} (%)" for k in eps],
              "step × clean",
          ],
          body,
      )
      + f"\n\nAttack: ℓ2 PGD on the word embeddings, {first['attack_steps']} steps, step "
      f"2.5ε/K, no random start, on {first['attack_examples']} SST-2 dev examples "
      "(ε=0: clean accuracy on that subset).\n\n![robustness](PLOT:robustness.png)"
  )


def md_multidevice(study: dict) -> str:
  rows = study["tables"]["multidevice"]
  body = [
      [
          DISPLAY[r["variant"]],
          r["gram"],
          r["devices"],
          r["seeds"],
          pct(r["dev_accuracy"], r["dev_accuracy_std"], r["seeds"]),
          num(r["step_seconds"]),
          num(r["step_ratio_to_sgd"]),
      ]
      for r in rows
  ]
  return table(
      ["optimizer", "Gram", "devices", "seeds", "SST-2 dev acc (%)", "s/step", "× SGD (8 dev.)"],
      body,
  ) + (
      "\n\nHost (CPU) devices share the same cores, so step times measure the extra work "
      "and communication of each mode, not a speed-up."
  )


def md_glue(study: dict) -> str:
  rows = study["tables"]["glue"]
  metrics = [k for k in rows[0] if k in ("f1", "mcc", "accuracy")]
  body = [
      [
          DISPLAY[r["variant"]],
          num(r["lr"]),
          r["seeds"],
          *[pct(r[m], r[f"{m}_std"], r["seeds"]) for m in metrics],
      ]
      for r in rows
  ]
  return (
      table(["optimizer", "lr", "seeds", *[f"dev {m} (%)" for m in metrics]], body)
      + f"\n\n{rows[0]['max_length']} tokens; "
      + "; ".join(study["notes"])
      + "."
  )


def md_noise(study: dict) -> str:
  parts = []
  rows = study["tables"]["noise"]
  if rows:
    body = [
        [
            DISPLAY[r["variant"]],
            pct(r["label_noise"]),
            r["seeds"],
            pct(r["dev_accuracy"], r["dev_accuracy_std"], r["seeds"]),
        ]
        for r in rows
    ]
    parts.append(
        table(["optimizer", "flipped train labels (%)", "seeds", "SST-2 dev acc (%)"], body)
        + "\n\n![noise](PLOT:noise.png)"
    )
  low = study["tables"]["low_confidence"]
  if low:
    body = [
        [
            DISPLAY[r["variant"]],
            r["seeds"],
            pct(r["test_accuracy"], r["test_accuracy_std"], r["seeds"]),
            pct(r["low_confidence_accuracy"], r["low_confidence_std"], r["seeds"]),
        ]
        for r in low
    ]
    parts.append(
        "Tweets, test examples whose annotator confidence is below the config's "
        "`low_confidence_below` (the noisily labelled ones):\n\n"
        + table(["optimizer", "seeds", "test acc (%)", "low-confidence test acc (%)"], body)
    )
  return "\n\n".join(parts)


SECTIONS = {
    "optimizers": md_optimizers,
    "damping": md_damping,
    "adversarial": md_adversarial,
    "multidevice": md_multidevice,
    "glue": md_glue,
    "noise": md_noise,
}
