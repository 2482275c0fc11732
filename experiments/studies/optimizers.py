"""Study 1: every optimizer variant at its tuned settings on the plan's tasks, the tuning
table, and the cost of a step (from experiments/bench_optimizers.py's record)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments import tuning
from experiments.report import (
    CHOSEN,
    DAMPING,
    LR,
    OPTIMIZER,
    RAN_ON,
    SEEDS,
    edge_note,
    get,
    pct,
    pyplot,
    save_figure,
    spread,
    table,
)
from experiments.studies.core import (
    BASELINES,
    comparison,
    dev_curve,
    majority_class_scores,
    mean_curve,
    step_cost,
    steps_to_target,
)
from experiments.tuning import (
    ALIASES,
    DERIVED,
    DISPLAY,
    Context,
    collapsed,
    final,
    history_curve,
    mean_std,
)
from nearprox.text import data

TITLE = "Optimizer comparison"


def run(ctx: Context) -> dict:
  plan = ctx.plan
  tuning_rows, run_rows, summary, majority_rows, curves, comparisons = [], [], [], [], {}, []
  normalization_rows = []
  # Training order only (the tables below read the same runs): every variant that waits for
  # no other choice trains its runs on the first task before the derived variants' tuning
  # starts, so a partial study shows the full-budget comparison there early.
  for variant in plan.optimizer_variants:
    if variant not in DERIVED and variant not in ALIASES:
      ctx.group("optimizers", plan.optimizer_tasks[0], variant)
  for variant in plan.optimizer_variants:
    variant = ctx.resolve(variant)
    rows, _ = ctx.tuning(variant) if variant else ([], False)
    chosen = ctx.best_trial(variant) if rows else None
    # Trials done so far, also while the tuning is incomplete.
    tuning_rows += tuning.table_rows(rows, ctx.trials(variant) if rows else [], chosen)
  best = ctx.resolve("best_proximal")  # chosen on held-out training data, not on any task
  for task in plan.optimizer_tasks:
    info = data.get_task(task)
    metric, split = info.primary_metric, info.reported_split
    groups = {}
    for variant in plan.optimizer_variants:
      group = ctx.group("optimizers", task, variant)
      if group is not None:
        groups[group.variant] = group
    if not groups:
      continue
    target = plan.target_fraction * max(g.stat("dev", metric)[0] for g in groups.values())
    # The SGD step time (momentum costs nothing measurable) is the unit of the cost column.
    sgd = next((groups[v] for v in ("sgd", "sgd_momentum") if v in groups), None)
    # The floor a model that learned nothing reaches (MRPC's F1 of always saying "paraphrase"
    # is high), on the examples each seed's runs are scored on.
    seeds = sorted({r["config"]["seed"] for g in groups.values() for r in g.results})
    majority = majority_class_scores(ctx, task, split, seeds)
    majority_rows.append(_majority_row(task, split, info.metric_names, majority))
    rows, curves[task] = {}, {}
    for variant, group in groups.items():
      found = group.results
      reached = [steps_to_target(r, metric, target) for r in found]
      not_above = [
          final(r, split, metric) <= majority[r["config"]["seed"]][metric] + 1e-9 for r in found
      ]
      for r, steps, floor in zip(found, reached, not_above):
        run_rows.append(
            {
                "task": task,
                **group.describe(),
                "seed": r["config"]["seed"],
                f"{split}_{metric}": final(r, split, metric),
                f"dev_{metric}": final(r, "dev", metric),
                "steps_to_target": steps,
                "collapsed": collapsed(r),
                "not_above_majority": floor,
                "step_seconds": r["report"]["train_step_seconds"],
                "wall_seconds": r["wall_seconds"],
            }
        )
      config = found[0]["config"]
      mean, std = group.stat(split, metric)
      rows[variant] = {
          "study": "optimizers",
          "condition": None,  # every row at the plan's budget (core.SUMMARY_FIELDS)
          "task": task,
          **group.describe(),
          "steps": config["num_train_steps"],
          "batch_size": config["batch_size"],
          "max_length": config["max_length"],
          "seeds": len(found),
          "metric": metric,
          "mean": mean,
          "std": std,
          "collapsed_seeds": group.collapsed_seeds(),
          "not_above_majority_seeds": sum(not_above),
          "split": split,
          "dev_mean": group.stat("dev", metric)[0],
          "target": target,
          "reached": sum(s is not None for s in reached),
          "steps_to_target": mean_std([s for s in reached if s is not None])[0],
          "step_seconds": group.step_seconds(),
          "step_ratio_to_sgd": group.step_ratio(sgd),  # NaN across machines
      }
      for other in info.metric_names[1:]:
        rows[variant][f"{split}_{other}"] = group.stat(split, other)[0]
      if "test_low_confidence" in found[0]["report"]:
        rows[variant].update(
            group.stats("low_confidence_accuracy", "test_low_confidence", "accuracy")
        )
      normalization_rows += _normalization_rows(task, group)
      curves[task][group.label] = {
          "dev": mean_curve([dev_curve(r, metric) for r in found]),
          "loss": mean_curve([history_curve(r, "train/loss") for r in found]),
      }
    # Every proximal variant against every baseline, as data; the verdict leads with the
    # variant the tuning chose (best_proximal), so no choice is made on the reported split.
    for variant in (v for v in rows if v.startswith("proximal")):
      rows[variant]["best_proximal"] = variant == best
      for base in (b for b in BASELINES if b in rows):
        record = comparison(
            rows[variant],
            rows[base],
            "mean",
            "std",
            study="optimizers",
            task=task,
            condition=f"{info.display_name} {split} {metric}",
        )
        comparisons.append({**record, "metric": metric, "preselected": variant == best})
    summary += rows.values()
  tables = {"tuning": tuning_rows, "runs": run_rows, "summary": summary, "majority": majority_rows}
  tables["normalization"] = normalization_rows
  return {
      "tables": tables,
      "curves": curves,
      "comparisons": comparisons,
      "step_cost": step_cost(ctx),
  }


def _normalization_rows(task: str, group) -> list[dict]:
  """λ/Σ m∘s over training, from the runs that log it (``train/gram/normalization_ratio``:
  every logged step of every seed): the per-batch factor between the natural filter's
  default "sum" iEF step and Wu et al.'s eq. 8 step (docs/method.md §1.4)."""
  values = [
      v
      for r in group.results
      for _, v in history_curve(r, "train/gram/normalization_ratio")
      if v is not None
  ]
  if not values:
    return []
  return [
      {
          "task": task,
          **group.describe(),
          "seeds": len(group.results),
          "logged_steps": len(values),
          "min": min(values),
          "median": float(np.median(values)),
          "max": max(values),
          "max_over_min": max(values) / min(values),
      }
  ]


def _majority_row(task: str, split: str, metrics, by_seed: dict) -> dict:
  """A reference row in the summary's columns: always predicting the majority class."""
  row = {"task": task, "optimizer": None, "variant": DISPLAY["majority"], "seeds": len(by_seed)}
  row |= {"split": split, "metric": metrics[0]}
  row["mean"], row["std"] = mean_std([s[metrics[0]] for s in by_seed.values()])
  for other in metrics[1:]:
    row[f"{split}_{other}"] = mean_std([s[other] for s in by_seed.values()])[0]
  return row


def markdown(study: dict) -> str:
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
        (f"{split} {metric} (%)", spread("mean", "std")),
        *[(f"{split} {m} (%)", get(f"{split}_{m}", pct)) for m in others],
    ]
    if "low_confidence_accuracy" in first:
      columns.append(
          (
              "low-confidence test acc (%)",
              spread("low_confidence_accuracy", "low_confidence_accuracy_std"),
          )
      )
    columns += [
        ("one-class seeds", get("collapsed_seeds", lambda n: "—" if n is None else n)),
        ("seeds ≤ majority", get("not_above_majority_seeds", lambda n: "—" if n is None else n)),
        (f"steps to {pct(first['target'])}% dev", _steps_cell),
        RAN_ON,
        ("s/step (these runs)", get("step_seconds")),
        ("× SGD (these runs)", get("step_ratio_to_sgd")),
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
  if study["tables"].get("normalization"):
    parts.append(markdown_normalization(study["tables"]["normalization"]))
  if study.get("step_cost"):
    parts.append(
        "Step time measured apart from the study's runs (which share the machine): "
        + markdown_step_cost(study["step_cost"])
    )
  if study["tables"].get("tuning"):
    columns = [
        OPTIMIZER,
        LR,
        DAMPING,
        SEEDS,
        ("held-out score (%)", spread("score", "score_std")),
        ("one-class seeds", get("collapsed_seeds")),
        ("final train loss", get("train_loss_end")),
        RAN_ON,
        CHOSEN,
    ]
    parts.append(
        "Tuning (held-out training examples, never the reported split; ✓ = chosen: best mean "
        "over the tuning seeds, trials with a one-class seed last, ties broken by the lower "
        "final training loss):\n\n" + table(study["tables"]["tuning"], columns)
    )
    if note := edge_note(study["tables"]["tuning"]):
      parts.append(note)
  return "\n\n".join(parts)


def markdown_normalization(rows: list[dict]) -> str:
  """The λ/Σs table: how far the default iEF step's scale is from a constant multiple of
  Wu et al.'s over the runs that log it."""
  columns = [
      OPTIMIZER,
      ("task", get("task", lambda t: data.get_task(t).display_name)),
      LR,
      DAMPING,
      SEEDS,
      ("logged steps", get("logged_steps")),
      ("min", get("min")),
      ("median", get("median")),
      ("max", get("max")),
      ("max / min", get("max_over_min")),
  ]
  return (
      "λ/Σs over training, every logged step of every seed (the runs that log it): the "
      'per-batch factor by which the default iEF step (`weight_normalization="sum"`) differs '
      "from Wu et al.'s eq. 8 step in the same direction (docs/method.md §1.4). A learning rate "
      "absorbs a constant factor, not one that varies this much within a run:\n\n"
      + table(rows, columns)
  )


def markdown_step_cost(record: dict) -> str:
  """experiments/bench_optimizers.py's record: what it timed, then one row per optimizer."""
  machine, sgd = record["machine"], record["sgd_variant"]

  def ratio(key):
    return lambda row: "–" if row[key] is None else f"{row[key]:.2f}×"

  columns = [
      ("optimizer", get("label", str)),
      ("settings", get("settings", str)),
      ("step", lambda row: f"{1e3 * row['step_seconds']:.0f} ms"),
      (f"× {tuning.DISPLAY.get(sgd, 'SGD')}", ratio("ratio_to_sgd")),
      ("× AdamW", ratio("ratio_to_adamw")),
  ]
  return (
      f"each optimizer's training step in one process ({record['model']}, {record['task']}, "
      f"batch {record['batch_size']} × {record['max_length']} tokens), the minimum over "
      f"{record['repeats']} interleaved rounds after compilation, on {machine['platform']} "
      f"({machine['cpus']} CPU(s), JAX {machine['jax']} on {machine['backend']}, "
      f"{machine['device_kind']}; load average {_load(record)}); `{record['command']}`.\n\n"
      + table(record["rows"], columns)
  )


def _load(record: dict) -> str:
  """The 1-minute load average at the start and, in records that have it, at the end."""
  text = f"{record['load_average_at_start']:.2f} at the start"
  if record.get("load_average_at_end") is not None:
    text += f", {record['load_average_at_end']:.2f} at the end"
  return text


def _steps_cell(row) -> str:
  if row["reached"] is None:  # the majority-class row trains nothing
    return "—"
  if row["reached"] == 0:
    return f"not reached ({row['steps']})"
  text = f"{row['steps_to_target']:.0f}"
  return text if row["reached"] == row["seeds"] else f"{text} ({row['reached']}/{row['seeds']})"


def plots(study: dict, out: Path) -> list[Path]:
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
