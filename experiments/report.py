"""Tables (CSV), plots (PNG) and the Markdown of each study from the study dicts.

Every number written here comes from a study dict of :mod:`experiments.studies`, i.e. from
run result files; nothing is typed in.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import tuning
from nearprox.text import data

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


def pyplot():
  """matplotlib.pyplot on the file-only Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: Path, dpi: int = 110) -> list[Path]:
  """Lays out, writes and closes ``fig``; returns ``[path]``."""
  fig.tight_layout()
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return [path]


def plot_optimizers(study: dict, out: Path) -> list[Path]:
  """Per task: dev metric and train loss vs step, one line per optimizer (seed mean)."""
  paths = []
  for task, variants in study["curves"].items():
    fig, (ax_dev, ax_loss) = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for variant, curve in variants.items():
      if curve["dev"]:
        ax_dev.plot(*zip(*curve["dev"]), marker="o", label=variant)
      if curve["loss"]:
        ax_loss.plot(*zip(*curve["loss"]), label=variant)
    info = data.get_task(task)
    ax_dev.set(
        xlabel="step",
        ylabel=f"dev {info.primary_metric}",
        title=f"{info.display_name}: dev metric",
    )
    ax_loss.set(xlabel="step", ylabel="train loss", title=f"{info.display_name}: train loss")
    for ax in (ax_dev, ax_loss):
      ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=7)
    paths += save_figure(fig, out / f"optimizers_{task}.png")
  return paths


def plot_damping(study: dict, out: Path) -> list[Path]:
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
  fig, ax = pyplot().subplots(figsize=(5, 3.5))
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["label_noise"])
    ax.errorbar(
        [r["label_noise"] for r in mine],
        [r["dev_accuracy"] for r in mine],
        yerr=[r["dev_accuracy_std"] for r in mine],
        marker="o",
        capsize=3,
        label=variant,
    )
  ax.set(
      xlabel="fraction of flipped training labels", ylabel="SST-2 dev accuracy", title="label noise"
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out / "noise.png")


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


def table(rows: list[dict], columns: list[tuple[str, Callable[[dict], Any]]]) -> str:
  """A Markdown table with one column per ``(header, cell of a row)``."""
  lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
  return "\n".join(lines)


def _get(key: str, fmt: Callable = num) -> Callable[[dict], str]:
  return lambda row: fmt(row[key])


def _spread(key: str, std_key: str) -> Callable[[dict], str]:
  """Mean ± seed standard deviation in percent (no ± with one seed)."""
  return lambda row: pct(row[key], row[std_key], row["seeds"])


OPTIMIZER = ("optimizer", _get("variant", str))
LR = ("lr", _get("learning_rate"))
SEEDS = ("seeds", _get("seeds", str))
DAMPING = ("λ (relative)", _get("damping", lambda d: "—" if d is None else f"{d:g}"))
RAN_ON = ("ran on", lambda row: row.get("machine") or "—")  # step times compare within one


def status(study: dict) -> str:
  found = study["requested"] - len(study["missing"])
  waiting = study.get("waiting") or []
  waits = "; it waits for the tuning's choice of " + " and ".join(f"`{w}`" for w in waiting)
  waits = waits if waiting else ""
  if not any(study["tables"].values()):
    missing = f" ({len(study['missing'])} runs missing)" if study["missing"] else ""
    return "**not run**" + missing + waits
  if study["missing"] or waiting:
    return (
        f"**incomplete**: {found} of the {study['requested']} runs it asks for so far exist" + waits
    )
  return f"complete ({found} run(s) of its own, plus any shared with earlier studies)"


def _steps_cell(row) -> str:
  if row["reached"] is None:  # the majority-class row trains nothing
    return "—"
  if row["reached"] == 0:
    return f"not reached ({row['steps']})"
  text = f"{row['steps_to_target']:.0f}"
  return text if row["reached"] == row["seeds"] else f"{text} ({row['reached']}/{row['seeds']})"


def md_optimizers(study: dict) -> str:
  parts, summary = [], study["tables"]["summary"]
  for task in dict.fromkeys(r["task"] for r in summary):
    rows = [r for r in summary if r["task"] == task]
    first = rows[0]
    split, metric = first["split"], first["metric"]
    others = data.get_task(task).metric_names[1:]
    columns = [
        OPTIMIZER,
        LR,
        DAMPING,
        SEEDS,
        (f"{split} {metric} (%)", _spread("mean", "std")),
        *[(f"{split} {m} (%)", _get(f"{split}_{m}", pct)) for m in others],
    ]
    if "low_confidence_accuracy" in first:
      columns.append(
          (
              "low-confidence test acc (%)",
              _spread("low_confidence_accuracy", "low_confidence_accuracy_std"),
          )
      )
    columns += [
        ("one-class seeds", _get("collapsed_seeds", lambda n: "—" if n is None else n)),
        ("seeds ≤ majority", _get("not_above_majority_seeds", lambda n: "—" if n is None else n)),
        (f"steps to {pct(first['target'])}% dev", _steps_cell),
        RAN_ON,
        ("s/step (these runs)", _get("step_seconds")),
        ("× SGD (these runs)", _get("step_ratio_to_sgd")),
    ]
    majority = next(r for r in study["tables"]["majority"] if r["task"] == task)
    parts.append(
        f"**{data.get_task(task).display_name}** ({split} split; {first['steps']} steps; "
        f"target = {pct(first['target'])}% dev {metric}, i.e. the plan's fraction of the best "
        f"optimizer's mean final dev score; one-class seeds: runs whose final model puts every "
        f"{split} example in the same class; the last row always predicts the training "
        f"split's most frequent class on the same examples, and seeds ≤ majority counts the "
        f"runs whose {split} {metric} is no higher)\n\n"
        + table([*rows, dict.fromkeys(first) | majority], columns)
        + f"\n\n![{task}](PLOT:optimizers_{task}.png)"
    )
  if study.get("step_cost"):
    parts.append(
        "Step time measured apart from the study's runs (which share the machine): "
        + md_step_cost(study["step_cost"])
    )
  if study["tables"].get("tuning"):
    columns = [
        OPTIMIZER,
        LR,
        DAMPING,
        SEEDS,
        ("held-out score (%)", _spread("score", "score_std")),
        ("one-class seeds", _get("collapsed_seeds")),
        ("final train loss", _get("train_loss_end")),
        RAN_ON,
        ("chosen", lambda r: "✓" if r["chosen"] else ""),
    ]
    parts.append(
        "Tuning (held-out training examples, never the reported split; ✓ = chosen: best mean "
        "over the tuning seeds, trials with a one-class seed last, ties broken by the lower "
        "final training loss):\n\n" + table(study["tables"]["tuning"], columns)
    )
  return "\n\n".join(parts)


def md_step_cost(record: dict) -> str:
  """experiments/bench_optimizers.py's record: what it timed, then one row per optimizer."""
  machine, sgd = record["machine"], record["sgd_variant"]

  def ratio(key):
    return lambda row: "–" if row[key] is None else f"{row[key]:.2f}×"

  columns = [
      ("optimizer", _get("label", str)),
      ("settings", _get("settings", str)),
      ("step", lambda row: f"{1e3 * row['step_seconds']:.0f} ms"),
      (f"× {tuning.DISPLAY.get(sgd, 'SGD')}", ratio("ratio_to_sgd")),
      ("× AdamW", ratio("ratio_to_adamw")),
  ]
  return (
      f"each optimizer's training step in one process ({record['model']}, {record['task']}, "
      f"batch {record['batch_size']} × {record['max_length']} tokens), the minimum over "
      f"{record['repeats']} interleaved rounds after compilation, on {machine['platform']} "
      f"({machine['cpus']} CPU(s), JAX {machine['jax']} on {machine['backend']}, "
      f"{machine['device_kind']}; load average {record['load_average_at_start']:.2f} at the "
      f"start); `{record['command']}`.\n\n" + table(record["rows"], columns)
  )


def md_damping(study: dict) -> str:
  columns = [
      ("filter", _get("filter", str)),
      ("λ (relative)", _get("damping")),
      LR,
      ("SST-2 dev acc (%)", _get("dev_accuracy", pct)),
      ("eff. rank (mean)", _get("effective_rank_mean")),
      ("eff. rank (final)", _get("effective_rank_final")),
      ("kept fraction (mean)", _get("kept_fraction_mean")),
      ("kept fraction (final)", _get("kept_fraction_final")),
  ]
  return (
      table(study["tables"]["damping"], columns)
      + "\n\nEffective rank: participation ratio (Σσ)²/Σσ² of K's spectrum (1 … B). Kept "
      "fraction: ‖d‖²/‖g‖² of the filtered vs the plain mean gradient.\n\n"
      "![damping](PLOT:damping.png)"
  )


def _training_attack(row: dict) -> str:
  """The training perturbation's radius and ascent steps."""
  if row["objective"] == "clean":
    return "–"
  return f"ε={row['train_epsilon']:g}, {row['train_steps']} step(s)"


def md_adversarial(study: dict) -> str:
  rows = study["tables"]["adversarial"]
  columns = [
      OPTIMIZER,
      ("objective", _get("objective", str)),
      ("training δ", _training_attack),
      SEEDS,
      ("clean dev acc (%)", _spread("dev_accuracy", "dev_accuracy_std")),
      ("one-class seeds", _get("collapsed_seeds", lambda n: "—" if n is None else n)),
      *[
          (f"ε={k[8:]} (%)", _spread(k, f"acc_std_eps_{k[8:]}"))
          for k in rows[0]
          if k.startswith("acc_eps_")
      ],
      ("step × clean", _get("step_ratio_to_clean")),
  ]
  return (
      table(rows, columns)
      + f"\n\nAttack: ℓ2 PGD on the word embeddings, {rows[0]['attack_steps']} steps, step "
      f"2.5ε/K, no random start, on {rows[0]['attack_examples']} SST-2 dev examples "
      "(ε=0: clean accuracy on that subset); accuracies under attack are means ± standard "
      "deviations over the seeds.\n\n![robustness](PLOT:robustness.png)"
  )


def md_multidevice(study: dict) -> str:
  columns = [
      OPTIMIZER,
      ("Gram", _get("gram", str)),
      ("devices", _get("devices", str)),
      SEEDS,
      ("SST-2 dev acc (%)", _spread("dev_accuracy", "dev_accuracy_std")),
      RAN_ON,
      ("s/step", _get("step_seconds")),
      ("× SGD (8 dev.)", _get("step_ratio_to_sgd")),
  ]
  return table(study["tables"]["multidevice"], columns) + (
      "\n\nHost (CPU) devices share the same cores, so step times measure the extra work "
      "and communication of each mode, not a speed-up."
  )


def md_glue(study: dict) -> str:
  rows = study["tables"]["glue"]
  metrics = data.get_task(rows[0]["task"]).metric_names
  columns = [OPTIMIZER, LR, SEEDS, *[(f"dev {m} (%)", _spread(m, f"{m}_std")) for m in metrics]]
  return (
      table(rows, columns)
      + f"\n\n{rows[0]['max_length']} tokens; "
      + "; ".join(study["notes"])
      + "."
  )


def md_noise(study: dict) -> str:
  parts = []
  if study["tables"]["noise"]:
    columns = [
        OPTIMIZER,
        ("flipped train labels (%)", _get("label_noise", pct)),
        SEEDS,
        ("SST-2 dev acc (%)", _spread("dev_accuracy", "dev_accuracy_std")),
    ]
    parts.append(table(study["tables"]["noise"], columns) + "\n\n![noise](PLOT:noise.png)")
  if study["tables"]["low_confidence"]:
    columns = [
        OPTIMIZER,
        SEEDS,
        ("test acc (%)", _spread("test_accuracy", "test_accuracy_std")),
        (
            "low-confidence test acc (%)",
            _spread("low_confidence_accuracy", "low_confidence_accuracy_std"),
        ),
    ]
    parts.append(
        "Tweets, test examples whose annotator confidence is below the config's "
        "`low_confidence_below` (the noisily labelled ones):\n\n"
        + table(study["tables"]["low_confidence"], columns)
    )
  return "\n\n".join(parts)


def md_sketch(study: dict) -> str:
  gram = (
      "Gram",
      lambda r: "exact" if r["sketch_dim"] is None else f"sketched, k = {r['sketch_dim']}",
  )
  one_class = ("one-class seeds", _get("collapsed_seeds", lambda n: "—" if n is None else n))
  timed = lambda r: f"{r['timed_step_ratio']:.2f}×" if r.get("timed_step_ratio") else "—"
  step = [("s/step (these runs)", _get("step_seconds")), ("× exact step (timed apart)", timed)]
  parts = []
  if study["tables"]["sketch"]:
    columns = [OPTIMIZER, LR, DAMPING, gram, SEEDS]
    columns += [("SST-2 dev acc (%)", _spread("dev_accuracy", "dev_accuracy_std"))]
    parts.append(table(study["tables"]["sketch"], columns + [one_class, RAN_ON, *step]))
  check = study["tables"].get("sketch_tuning_budget") or []
  if check:
    columns = [OPTIMIZER, LR, DAMPING, gram, SEEDS]
    columns += [
        ("held-out SST-2 train acc (%)", _spread("holdout_accuracy", "holdout_accuracy_std"))
    ]
    parts.append(
        f"At the tuning budget ({check[0]['steps']} steps, scored on the tuning's held-out "
        "training examples; the exact runs of the tuning seeds are the tuning runs), "
        "one proximal variant at the trial its tuning chose, before the study's own choice "
        "exists:\n\n" + table(check, columns + [one_class, RAN_ON, *step])
    )
  parts.append(
      "The same settings and seeds; only the coefficients c come from the estimated Gram "
      "(docs/method.md §2.9). s/step is the study's runs' own, which shared the machine; "
      "× exact step is the sketched step's time over the exact one's, both timed in one "
      "process, interleaved, by `python -m experiments.bench_optimizers` "
      "(`bench_optimizers.md`; — before it has timed them); "
      "`experiments/results/bench_step.md` times the sketch against the exact Gram's parts."
  )
  return "\n\n".join(parts)


def md_squad(study: dict) -> str:
  rows = study["tables"]["squad"]
  metrics = data.get_task("squad").metric_names
  columns = [
      OPTIMIZER,
      LR,
      DAMPING,
      SEEDS,
      *[(f"held-out {m} (%)", _spread(m, f"{m}_std")) for m in metrics],
      RAN_ON,
      ("s/step", _get("step_seconds")),
  ]
  first = rows[0]
  return (
      table(rows, columns)
      + f"\n\nWindows of {first['max_length']} tokens (stride {first['doc_stride']}), batch "
      f"{first['batch_size']}; {'; '.join(study['notes'])}. Split: "
      "`nearprox/text/data/squad.py` (with the SQuAD v1.1 dev file alone, the articles with "
      "sha256(title) < 0.25 are held out)."
  )


SECTIONS = {
    "optimizers": md_optimizers,
    "damping": md_damping,
    "adversarial": md_adversarial,
    "multidevice": md_multidevice,
    "glue": md_glue,
    "noise": md_noise,
    "sketch": md_sketch,
    "squad": md_squad,
}
