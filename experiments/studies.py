"""The six studies behind "does the proximal scaling help?" (issue 7), as run lists + tables.

Each study function takes a :class:`Context` (the mode's plan from
``experiments/configs/<mode>.py`` and a :class:`runs.Executor`) and returns a study dict:
``{"name", "title", "requested", "missing", "tables": {name: [row, ...]}, "curves",
"comparisons", "notes", "plan"}``. Every number in a table is read from run result files; a
run that does not exist (deadline or ``--report_only``) is counted in ``missing`` and leaves
its rows out. Rows name an optimizer variant by its label (``variant``, e.g. "AdamW") and by
its config name (``optimizer``, e.g. "adamw"). ``comparisons`` are the records the verdict
is rendered from (:func:`comparison`).

Every optimizer's settings come from experiments/tuning.py (held-out training examples,
mean over seeds, the same number of trials per optimizer); a mode's ``plan.studies`` says
which of these it runs (--mode=full: optimizers, sketch, adversarial, noise, squad).

1. ``optimizers``  ``plan.optimizer_variants`` (AdamW, SGD+momentum, the tikhonov, EF and iEF
   filters, the best filter with the grafted step size and in front of AdamW) at their tuned
   settings on ``plan.optimizer_tasks`` (SST-2 and MRPC dev, tweets test), ``plan.seeds``
   seeds; the tuning table; steps to a target and the step time against SGD's, in the
   runs and measured apart from them (``step_cost``: experiments/bench_optimizers.py).
2. ``damping``     relative λ sweep for both filters: accuracy and the Gram spectrum
   (effective rank, kept fraction) across training.
3. ``adversarial`` clean / FGM / PGD / SMART objectives with ``plan.objective_optimizers``
   (AdamW and the best proximal variant): clean accuracy and accuracy under embedding-space
   PGD vs ε.
4. ``multidevice`` local vs global Gram on 8 host devices (subprocess), step time.
5. ``glue``        one more GLUE task (MRPC: F1) with the SST-2 settings.
6. ``noise``       20% / 40% flipped SST-2 training labels; tweets low-confidence test.
7. ``sketch``      the tuned proximal variant with the exact and with the sketched Gram
   (``optimizer.sketch_dim``), same settings and seeds, on SST-2 (issue 14); and, before
   that choice exists, ``plan.sketch_check_variant`` at its tuned trial and the tuning budget;
   the sketched/exact step time ratio timed apart from the runs (bench_optimizers.py).
8. ``squad``       extractive QA on SQuAD's held-out articles: AdamW, the tuned proximal
   variant and SGD+momentum at their SST-2 settings (issue 15).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments import runs
from experiments.tuning import (
    ALIASES,
    DERIVED,
    DISPLAY,
    PROXIMAL,
    Context,
    Group,
    collapsed,
    final,
    history_curve,
    mean_std,
)
from nearprox.text import data, objectives

BASELINES = ("adamw", "sgd_momentum", "sgd")  # what the best proximal variant is compared with
STUDY_TASK = "sst2"  # where the damping, adversarial, multidevice and noise studies train
LOW_CONFIDENCE_TASK = "tweets"  # the task whose test split has low-confidence labels
# The optimizer summary records (experiments/results/<mode>/summary.json), in this order.
SUMMARY_FIELDS = tuple(
    "task optimizer variant steps batch_size max_length seeds learning_rate damping metric mean"
    " std collapsed_seeds split".split()
)
# experiments/bench_optimizers.py's record in <out>/<mode>/: each optimizer's step time,
# measured apart from the study's runs (which share the machine).
STEP_COST_FILE = "bench_optimizers.json"
# A variant's key in that record when it is timed with the sketch study's sketched Gram.
SKETCHED = ":sketched"
# A difference is a win or a loss only above the noise floor: the two seed standard
# deviations summed, and at least one accuracy point (all there is with one seed).
MIN_GAP = 0.01


def dev_curve(result: dict, metric: str) -> list[tuple[int, float]]:
  """(step, dev metric) at every evaluation during training and at the end."""
  points = history_curve(result, f"dev/{metric}")
  points.append((result["report"]["steps"], final(result, "dev", metric)))
  return sorted(dict(points).items())


def steps_to_target(result: dict, metric: str, target: float) -> int | None:
  """The first evaluated step whose dev metric reaches ``target`` (None: never)."""
  return next((int(s) for s, value in dev_curve(result, metric) if value >= target), None)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
  """Pointwise mean over seeds at the steps all curves share."""
  if not curves:
    return []
  steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
  tables = [dict(c) for c in curves]
  return [(s, float(np.mean([t[s] for t in tables]))) for s in steps]


def comparison(subject: dict, baseline: dict, key: str, std_key=None, **context) -> dict:
  """The record "subject vs baseline on ``key``" (seed spread ``std_key``, default
  ``<key>_std``): ``outcome`` is "ahead", "behind" or "level" (within ``MIN_GAP``)."""
  a, b, std_key = subject[key], baseline[key], std_key or f"{key}_std"
  floor = max(MIN_GAP, (subject[std_key] or 0.0) + (baseline[std_key] or 0.0))
  outcome = "ahead" if a - b > floor else "behind" if a - b < -floor else "level"
  return {
      **context,
      "subject": subject["variant"],
      "baseline": baseline["variant"],
      "baseline_optimizer": baseline["optimizer"],
      "subject_mean": a,
      "subject_std": subject[std_key],
      "baseline_mean": b,
      "baseline_std": baseline[std_key],
      "difference": a - b,
      "outcome": outcome,
  }


FUNCTIONS = {}  # study name -> function of a Context, in the order of the README


def study(title: str):
  """Registers a study: the function returns its ``tables`` and optionally ``curves``,
  ``comparisons``, ``notes`` and a ``title`` of its own; the study dict adds the tuning
  choices it waits for (``waiting``), the runs it asked for first (``requested``; runs shared with an earlier study, e.g. the
  learning-rate sweep, belong to that one) and those of them that do not exist."""

  def register(fn):
    def run(ctx: Context) -> dict:
      start, waits_before = len(ctx.ex.requested), len(ctx.waiting)
      found = fn(ctx)
      keys = ctx.ex.requested[start:]
      return {
          "name": fn.__name__,
          "title": title,
          "curves": {},
          "comparisons": [],
          "notes": [],
          **found,
          "requested": len(keys),
          "missing": [ctx.ex.missing[k] for k in keys if k in ctx.ex.missing],
          # Choices it needs that the tuning has not made: runs it will ask for later.
          "waiting": sorted(set(ctx.waiting[waits_before:])),
          "plan": ctx.plan.mode,
      }

    FUNCTIONS[fn.__name__] = run
    return run

  return register


# ---------------------------------------------------------------------------------- 1


@study("Optimizer comparison")
def optimizers(ctx: Context) -> dict:
  plan = ctx.plan
  tuning_rows, run_rows, summary, curves, comparisons = [], [], [], {}, []
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
    for row in rows:  # trials done so far, also while the tuning is incomplete
      is_chosen = chosen is not None and row["trial"] == chosen["trial"]
      tuning_rows.append({k: v for k, v in row.items() if k != "trial"} | {"chosen": is_chosen})
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
    rows, curves[task] = {}, {}
    for variant, group in groups.items():
      found = group.results
      reached = [steps_to_target(r, metric, target) for r in found]
      for r, steps in zip(found, reached):
        run_rows.append(
            {
                "task": task,
                **group.describe(),
                "seed": r["config"]["seed"],
                f"{split}_{metric}": final(r, split, metric),
                f"dev_{metric}": final(r, "dev", metric),
                "steps_to_target": steps,
                "collapsed": collapsed(r),
                "step_seconds": r["report"]["train_step_seconds"],
                "wall_seconds": r["wall_seconds"],
            }
        )
      config = found[0]["config"]
      mean, std = group.stat(split, metric)
      rows[variant] = {
          "task": task,
          **group.describe(),
          "steps": found[0]["report"]["steps"],
          "batch_size": config["batch_size"],
          "max_length": config["max_length"],
          "seeds": len(found),
          "metric": metric,
          "mean": mean,
          "std": std,
          "collapsed_seeds": group.collapsed_seeds(),
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
      curves[task][group.label] = {
          "dev": mean_curve([dev_curve(r, metric) for r in found]),
          "loss": mean_curve([history_curve(r, "train/loss") for r in found]),
      }
    # Every proximal variant against every baseline, as data; the verdict leads with the
    # variant the tuning chose (best_proximal), so no choice is made on the reported split.
    for variant in (v for v in PROXIMAL if v in rows):
      rows[variant]["best_proximal"] = variant == best
      for base in (b for b in BASELINES if b in rows):
        record = comparison(rows[variant], rows[base], "mean", "std", study="optimizers", task=task)
        comparisons.append({**record, "metric": metric, "preselected": variant == best})
    summary += rows.values()
  tables = {"tuning": tuning_rows, "runs": run_rows, "summary": summary}
  return {
      "tables": tables,
      "curves": curves,
      "comparisons": comparisons,
      "step_cost": step_cost(ctx),
  }


def step_cost(ctx: Context) -> dict | None:
  """experiments/bench_optimizers.py's record in the study's results folder (None: not run)."""
  path = Path(ctx.ex.out) / STEP_COST_FILE
  return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------------------------- 2


@study("Damping sweep (relative λ)")
def damping(ctx: Context) -> dict:
  plan = ctx.plan
  rows, curves = [], {}
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
      curves[f"{filt}:{lam:g}"] = {
          "effective_rank": rank,
          "kept_fraction": kept,
          "dev": dev_curve(result, "accuracy"),
      }
  return {"tables": {"damping": rows}, "curves": curves}


# ---------------------------------------------------------------------------------- 3


@study("Adversarial objectives and robustness")
def adversarial(ctx: Context) -> dict:
  plan = ctx.plan
  attack = runs.Attack(
      tuple(float(e) for e in plan.attack_epsilons), plan.attack_steps, plan.attack_examples
  )
  rows, curves = [], {}
  for name in plan.objective_optimizers:
    clean = None
    for objective in plan.objectives:
      settings = (plan.get("objective_settings") or {}).get(objective) or {}
      settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
      resolved = objectives.ObjectiveConfig(kind=objective, **settings)
      extra = {"objective.kind": objective, **{f"objective.{k}": v for k, v in settings.items()}}
      group = ctx.group("adversarial", STUDY_TASK, name, extra=extra, attack=attack)
      if group is None:
        continue
      found = group.results
      clean = group if objective == "clean" else clean
      # Mean over seeds of the accuracy under attack at each radius (same ε grid every run).
      mean_attack = [
          {**rows_at[0], "accuracy": mean_std([r["accuracy"] for r in rows_at])[0]}
          for rows_at in zip(*(r["attack"] for r in found))
      ]
      accuracy = {f"acc_eps_{a['epsilon']:g}": a["accuracy"] for a in mean_attack}
      rows.append(
          {
              **group.describe(),
              "objective": objective,
              "train_epsilon": resolved.epsilon,
              "train_steps": resolved.num_steps if objective != "clean" else 0,
              "seeds": len(found),
              **group.stats("dev_accuracy", "dev", "accuracy"),
              "collapsed_seeds": group.collapsed_seeds(),
              "step_seconds": group.step_seconds(),
              "step_ratio_to_clean": group.step_ratio(clean),  # NaN across machines
              "attack_examples": found[0]["attack"][0]["num_examples"],
              "attack_steps": found[0]["attack"][0]["num_steps"],
              **accuracy,
              # The same accuracy at every radius: a model predicting (almost) one class.
              "flat_under_attack": max(accuracy.values()) - min(accuracy.values()) < 0.005,
          }
      )
      curves[f"{group.label}, {objective}"] = mean_attack
  return {"tables": {"adversarial": rows}, "curves": curves}


# ---------------------------------------------------------------------------------- 4


@study("Local vs global Gram on host devices")
def multidevice(ctx: Context) -> dict:
  plan = ctx.plan
  rows = {}
  for name in plan.multidevice_variants:
    extra = {"parallel": "shard_map"}
    if name in ("local", "global"):
      extra["optimizer.gram"] = name
    group = ctx.group(
        f"multidevice-{name}",
        STUDY_TASK,
        name if name not in ("local", "global") else "best_filter",
        plan.multidevice_seeds,
        extra,
        devices=plan.multidevice_count,
    )
    if group is not None:
      rows[name] = {
          **group.describe(),
          "gram": name if name in ("local", "global") else "—",
          "devices": plan.multidevice_count,
          "seeds": len(group.results),
          **group.stats("dev_accuracy", "dev", "accuracy"),
          "step_seconds": group.step_seconds(),
      }
  base = next((rows[n]["step_seconds"] for n in rows if n not in ("local", "global")), None)
  for row in rows.values():
    row["step_ratio_to_sgd"] = row["step_seconds"] / base if base else float("nan")
  comparisons = []
  if "local" in rows and "global" in rows:
    subject = {**rows["global"], "variant": "the global Gram"}
    baseline = {**rows["local"], "variant": "the per-device (local) Gram"}
    comparisons.append(comparison(subject, baseline, "dev_accuracy", study="multidevice"))
  title = f"Local vs global Gram on {plan.multidevice_count} host devices"
  return {
      "title": title,
      "tables": {"multidevice": list(rows.values())},
      "comparisons": comparisons,
  }


# ---------------------------------------------------------------------------------- 5


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


def majority_class_row(ctx: Context, task_name: str, max_length: int) -> dict:
  """The scores of always predicting the most frequent training label, per seed's subset."""
  config = ctx.ex.base_config
  task = data.get_task(task_name)
  load = lambda split: data.load_task(
      task_name, split, config.data_dir, source=config.source, seed=0
  ).labels
  train_labels, dev_labels = load("train"), load("dev")
  majority = int(np.argmax(np.bincount(train_labels, minlength=task.num_labels)))
  scores = {m: [] for m in task.metric_names}
  for seed in ctx.plan.seeds:
    keep = data.eval_subset(len(dev_labels), config.max_eval_examples, seed)
    labels = dev_labels if keep is None else dev_labels[keep]
    for metric, value in task.metrics(labels, np.full_like(labels, majority)).items():
      scores[metric].append(value)
  row = {
      "task": task_name,
      "optimizer": None,
      "variant": DISPLAY["majority"],
      "learning_rate": None,
      "seeds": len(ctx.plan.seeds),
      "max_length": max_length,
  }
  for metric, values in scores.items():
    row[metric], row[f"{metric}_std"] = mean_std(values)
  return row


# ---------------------------------------------------------------------------------- 6


@study("Noisy labels")
def noise(ctx: Context) -> dict:
  plan = ctx.plan
  rows, comparisons = {}, []
  for name in plan.noise_optimizers:
    for level in (0.0, *plan.noise_levels):
      label = "optimizers" if level == 0.0 else "noise"
      group = ctx.group(label, STUDY_TASK, name, extra={"label_noise": level})
      if group is not None:
        rows[group.variant, level] = {
            **group.describe(),
            "label_noise": level,
            "seeds": len(group.results),
            **group.stats("dev_accuracy", "dev", "accuracy"),
        }
  top = max((level for _, level in rows), default=0.0)
  for variant in PROXIMAL:
    if top > 0.0 and (variant, top) in rows and ("adamw", top) in rows:
      record = comparison(rows[variant, top], rows["adamw", top], "dev_accuracy", study="noise")
      comparisons.append({**record, "label_noise": top})
  low = {}
  if LOW_CONFIDENCE_TASK in plan.optimizer_tasks:
    for variant in plan.optimizer_variants:
      group = ctx.group("optimizers", LOW_CONFIDENCE_TASK, variant)
      if group is not None:
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
        comparison(low[best], low["adamw"], key, study="noise", task=LOW_CONFIDENCE_TASK)
    )
  tables = {"noise": list(rows.values()), "low_confidence": list(low.values())}
  return {"tables": tables, "comparisons": comparisons}


# ---------------------------------------------------------------------------------- 7


@study("Sketched vs exact Gram")
def sketch(ctx: Context) -> dict:
  plan = ctx.plan
  # First: it needs one variant's tuning, best_proximal (below) trains every missing one.
  check = sketch_at_tuning_budget(ctx)
  rows = {}
  settings = (("exact", "optimizers", None), ("sketched", "sketch", plan.sketch_dim))
  for gram, label, dim in settings:
    extra = None if dim is None else {"optimizer.sketch_dim": dim}
    group = ctx.group(label, STUDY_TASK, "best_proximal", extra=extra)  # exact: study 1's runs
    if group is not None:
      rows[gram] = {
          **group.describe(),
          "gram": gram,
          "sketch_dim": dim,
          "seeds": len(group.results),
          **group.stats("dev_accuracy", "dev", "accuracy"),
          "collapsed_seeds": group.collapsed_seeds(),
          "step_seconds": group.step_seconds(),
      }
  # The step time ratio measured apart from the runs, which shared the machine.
  cost = step_cost(ctx)
  timed = {r["variant"]: r["step_seconds"] for r in cost["rows"]} if cost else {}
  for variant, pair in (
      (ctx.resolve("best_proximal"), rows),
      (plan.get("sketch_check_variant"), check),
  ):
    if "sketched" in pair and {variant, f"{variant}{SKETCHED}"} <= timed.keys():
      pair["sketched"]["timed_step_ratio"] = timed[f"{variant}{SKETCHED}"] / timed[variant]
  comparisons = []
  if len(rows) == 2:
    subject = {**rows["sketched"], "variant": f"the sketched Gram (k = {plan.sketch_dim})"}
    baseline = {**rows["exact"], "variant": "the exact Gram"}
    comparisons.append(comparison(subject, baseline, "dev_accuracy", study="sketch"))
  if len(check) == 2:
    subject = {**check["sketched"], "variant": f"the sketched Gram (k = {plan.sketch_dim})"}
    baseline = {**check["exact"], "variant": "the exact Gram"}
    record = comparison(subject, baseline, "holdout_accuracy", study="sketch", budget="tuning")
    comparisons.append(record)
  tables = {"sketch": list(rows.values()), "sketch_tuning_budget": list(check.values())}
  return {"tables": tables, "comparisons": comparisons}


def sketch_at_tuning_budget(ctx: Context) -> dict[str, dict]:
  """``plan.sketch_check_variant`` at its chosen tuning trial with the exact and the sketched
  Gram, at the tuning budget (held-out training examples, no dev), ``plan.seeds`` seeds: the
  exact runs of the tuning seeds are its tuning runs. Needs only that variant's tuning, so it
  answers issue 14 before the whole study's choice exists. {} without the plan field."""
  plan = ctx.plan
  variant = plan.get("sketch_check_variant")
  chosen = ctx.best_trial(variant) if variant else None
  if chosen is None:
    return {}
  metric = data.get_task(plan.tuning.task).primary_metric
  rows = {}
  for gram, dim in (("exact", None), ("sketched", plan.sketch_dim)):
    extra = {} if dim is None else {"optimizer.sketch_dim": dim}
    settings = ctx.tuning_settings(ctx.overrides(variant), chosen["trial"]) | extra
    found = [
        ctx.ex.run(f"sketch_check:{variant}:{gram}:seed={seed}", {**settings, "seed": seed})
        for seed in plan.seeds
    ]
    found = [r for r in found if r is not None]
    if not found:
      continue
    group = Group(variant, ctx.label(variant), chosen["trial"], found)
    rows[gram] = {
        **group.describe(),
        "gram": gram,
        "sketch_dim": dim,
        "steps": plan.tuning.steps,
        "seeds": len(found),
        **group.stats("holdout_accuracy", "holdout", metric),
        "collapsed_seeds": sum(bool(collapsed(r, "holdout")) for r in found),
        "step_seconds": group.step_seconds(),
    }
  return rows


# ---------------------------------------------------------------------------------- 8


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


STUDIES = tuple(FUNCTIONS)
