"""The six studies behind "does the proximal scaling help?" (issue 7), as run lists + tables.

Each study function takes a :class:`Context` (the mode's plan from
``experiments/configs/<mode>.py`` and an :class:`runs.Executor`) and returns a study dict:
``{"name", "title", "requested", "missing", "tables": {name: [row, ...]}, "curves": …}``.
Every number in a table is read from run result files; a run that does not exist (deadline
or ``--report-only``) is counted in ``missing`` and leaves its rows out.

1. ``optimizers``  SGD, SGD+momentum, AdamW, proximal SGD (tikhonov / natural filter) and
   the rank-one form on SST-2 (dev) and tweets (test); learning rate per optimizer chosen on
   the dev split (seed 0), then ``plan.seeds`` seeds at that rate.
2. ``damping``     relative λ sweep for both filters: accuracy and the Gram spectrum
   (effective rank, kept fraction) across training.
3. ``adversarial`` clean / FGM / PGD / SMART objectives with the best proximal optimizer
   (and AdamW in --full): clean accuracy and accuracy under embedding-space PGD vs ε.
4. ``multidevice`` local vs global Gram on 8 host devices (subprocess), step time.
5. ``glue``        one more GLUE task (MRPC: F1) with the SST-2 learning rates.
6. ``noise``       20% / 40% flipped SST-2 training labels; tweets low-confidence test.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import runs

from nearprox.text import data, objectives

VARIANTS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer.name": "sgd", "optimizer.momentum": 0.0},
    "sgd_momentum": {"optimizer.name": "sgd", "optimizer.momentum": 0.9},
    "adamw": {"optimizer.name": "adamw"},
    "proximal_tikhonov": {"optimizer.name": "proximal_sgd", "optimizer.filter": "tikhonov"},
    "proximal_natural": {"optimizer.name": "proximal_sgd", "optimizer.filter": "natural"},
    "proximal_norm": {"optimizer.name": "proximal_norm_sgd"},
}
DISPLAY = {
    "sgd": "SGD",
    "sgd_momentum": "SGD+momentum",
    "adamw": "AdamW",
    "proximal_tikhonov": "proximal SGD, tikhonov",
    "proximal_natural": "proximal SGD, natural",
    "proximal_norm": "rank-one proximal (‖g‖²/(‖g‖²+λ))",
    "majority": "majority class (no training)",
}
PROXIMAL = ("proximal_tikhonov", "proximal_natural", "proximal_norm")
STUDIES = ("optimizers", "damping", "adversarial", "multidevice", "glue", "noise")


def primary_metric(task: str) -> str:
  return data.get_task(task).primary_metric


def reported_split(task: str) -> str:
  """Where a task's numbers are reported: tweets has a labelled test split, GLUE does not."""
  return "test" if task == "tweets" else "dev"


def final(result: dict, split: str, metric: str) -> float:
  value = result["report"].get(split, {}).get(metric, float("nan"))
  return float(value)


def dev_curve(result: dict, metric: str) -> list[tuple[int, float]]:
  """(step, dev metric) at every evaluation during training and at the end."""
  points = [
      (row["step"], row[f"dev/{metric}"]) for row in result["history"] if f"dev/{metric}" in row
  ]
  points.append((result["report"]["steps"], final(result, "dev", metric)))
  return sorted(dict(points).items())


def history_curve(result: dict, name: str) -> list[tuple[int, float]]:
  return [(row["step"], row[name]) for row in result["history"] if name in row]


def steps_to_target(result: dict, metric: str, target: float) -> int | None:
  """The first evaluated step whose dev metric reaches ``target`` (None: never)."""
  for step, value in dev_curve(result, metric):
    if value >= target:
      return int(step)
  return None


def end_loss(result: dict) -> float:
  """Mean training loss over the last quarter of the logged steps (NaN if diverged)."""
  losses = [v for _, v in history_curve(result, "train/loss")]
  tail = losses[-max(1, len(losses) // 4) :]
  return float(np.mean(tail)) if tail else float("nan")


def mean_std(values) -> tuple[float, float, int]:
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return float("nan"), float("nan"), 0
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return float(np.mean(values)), std, len(values)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
  """Pointwise mean over seeds at the steps all curves share."""
  if not curves:
    return []
  steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
  tables = [dict(c) for c in curves]
  return [(s, float(np.mean([t[s] for t in tables]))) for s in steps]


class Context:
  """The plan of the mode, the executor, and choices shared between studies."""

  def __init__(self, plan, executor: runs.Executor):
    self.plan = plan
    self.ex = executor

  def run(
      self,
      label: str,
      task: str,
      variant: str,
      lr: float,
      seed: int,
      extra: dict | None = None,
      devices: int = 1,
      attack: runs.Attack | None = None,
  ):
    overrides = {
        "task": task,
        "seed": seed,
        "optimizer.learning_rate": lr,
        **VARIANTS[variant],
        **(extra or {}),
    }
    name = f"{label}:{task}:{variant}:lr={lr:g}:seed={seed}"
    name += "".join(f":{k.split('.')[-1]}={v}" for k, v in (extra or {}).items())
    return self.ex.run(name, overrides, devices=devices, attack=attack)

  def sweep_task(self, task: str) -> str:
    return task if task in self.plan.sweep_tasks else self.plan.sweep_tasks[0]

  def _sweep_rows(self, task: str, variant: str, grid) -> list[dict]:
    metric = primary_metric(task)
    rows = []
    for lr in grid:
      result = self.run("sweep", task, variant, lr, self.plan.seeds[0])
      if result is not None:
        rows.append(
            {
                "task": task,
                "variant": variant,
                "lr": lr,
                "seed": self.plan.seeds[0],
                f"dev_{metric}": final(result, "dev", metric),
                "train_loss_end": end_loss(result),
            }
        )
    return rows

  def sweep(self, task: str, variant: str) -> list[dict]:
    """The learning-rate sweep rows (seed 0, dev split of the sweep task).

    The grid starts as ``plan.lr_grid[variant]``; while the best rate lies on an edge of
    the grid it is extended past that edge by the grid's ratio, at most
    ``plan.sweep_extensions`` times (so no optimizer is judged at a rate cut off by a
    badly placed grid).
    """
    task = self.sweep_task(task)
    grid = sorted(self.plan.lr_grid[variant])
    rows = self._sweep_rows(task, variant, grid)
    for _ in range(self.plan.sweep_extensions):
      if len(rows) < len(grid) or len(grid) < 2:
        break
      best = self._best(rows)
      ratio = grid[1] / grid[0]
      if best == grid[-1]:
        grid.append(float(f"{grid[-1] * ratio:.3g}"))
      elif best == grid[0]:
        grid.insert(0, float(f"{grid[0] / ratio:.3g}"))
      else:
        break
      rows = self._sweep_rows(task, variant, grid)
    return rows if len(rows) == len(grid) else rows + [None]  # None marks incomplete

  @staticmethod
  def _best(rows) -> float:
    """Best dev metric; ties (e.g. several rates stuck at chance) go to the lower training
    loss at the end of training, so the grid extends towards the rate that moved."""
    key = next(k for k in rows[0] if k.startswith("dev_"))
    nan_low = lambda x: -math.inf if math.isnan(x) else x
    return max(rows, key=lambda r: (nan_low(r[key]), nan_low(-r["train_loss_end"])))["lr"]

  def best_lr(self, task: str, variant: str) -> float | None:
    """The swept rate with the best dev metric (NaN counts as worst); None if the sweep is
    incomplete."""
    rows = self.sweep(task, variant)
    if not rows or rows[-1] is None:
      return None
    return self._best(rows)

  def resolve(self, variant: str) -> str | None:
    """``"best_proximal"``: the proximal variant with the best SST-2 dev score in the sweep."""
    if variant != "best_proximal":
      return variant
    scores = {}
    for name in (v for v in PROXIMAL if v in self.plan.lr_grid):
      lr = self.best_lr("sst2", name)
      if lr is not None:
        row = next(r for r in self.sweep("sst2", name) if r["lr"] == lr)
        scores[name] = row["dev_accuracy"]
    return max(scores, key=scores.get) if scores else None


def _study(name: str, title: str, ctx: Context, start: int, tables, curves, notes=()) -> dict:
  """The study dict; ``requested``/``missing`` count the distinct runs it asked for first
  (runs shared with an earlier study, e.g. the learning-rate sweep, belong to that one)."""
  keys = ctx.ex.requested[start:]
  missing = [ctx.ex.missing[k] for k in keys if k in ctx.ex.missing]
  return {
      "name": name,
      "title": title,
      "requested": len(keys),
      "missing": missing,
      "tables": tables,
      "curves": curves,
      "notes": list(notes),
      "plan": ctx.plan.mode,
  }


def _start(ctx: Context) -> int:
  return len(ctx.ex.requested)


# ---------------------------------------------------------------------------------- 1


def optimizers(ctx: Context) -> dict:
  plan, start = ctx.plan, _start(ctx)
  sweep_rows, run_rows, summary, curves = [], [], [], {}
  for task in plan.optimizer_tasks:
    metric, split = primary_metric(task), reported_split(task)
    results = {}
    for variant in (plan.lr_grid if task == "sst2" else plan.tweets_variants):
      rows = [r for r in ctx.sweep(task, variant) if r is not None]
      lr = ctx.best_lr(task, variant)
      for row in rows:
        row["chosen"] = row["lr"] == lr
      sweep_rows += rows if ctx.sweep_task(task) == task else []
      if lr is None:
        continue
      found = [
          r
          for r in (ctx.run("optimizers", task, variant, lr, s) for s in plan.seeds)
          if r is not None
      ]
      if found:
        results[variant] = (lr, found)
    if not results:
      continue
    best_dev = max(
        mean_std([final(r, "dev", metric) for r in found])[0] for _, found in results.values()
    )
    target = plan.target_fraction * best_dev
    # The SGD step time (momentum costs nothing measurable) is the unit of the cost column.
    sgd = next((v for v in ("sgd", "sgd_momentum") if v in results), None)
    sgd_step = (
        mean_std([r["report"]["train_step_seconds"] for r in results[sgd][1]])[0]
        if sgd
        else float("nan")
    )
    curves[task] = {}
    for variant, (lr, found) in results.items():
      reached = [steps_to_target(r, metric, target) for r in found]
      step_s = mean_std([r["report"]["train_step_seconds"] for r in found])
      for r, steps in zip(found, reached):
        run_rows.append(
            {
                "task": task,
                "variant": variant,
                "lr": lr,
                "seed": r["config"]["seed"],
                f"{split}_{metric}": final(r, split, metric),
                f"dev_{metric}": final(r, "dev", metric),
                "steps_to_target": steps,
                "step_seconds": r["report"]["train_step_seconds"],
                "wall_seconds": r["wall_seconds"],
            }
        )
      row = {
          "task": task,
          "variant": variant,
          "lr": lr,
          "seeds": len(found),
          "split": split,
          "metric": metric,
          "mean": mean_std([final(r, split, metric) for r in found])[0],
          "std": mean_std([final(r, split, metric) for r in found])[1],
          "dev_mean": mean_std([final(r, "dev", metric) for r in found])[0],
          "target": target,
          "reached": sum(s is not None for s in reached),
          "steps_to_target": mean_std([s for s in reached if s is not None])[0],
          "step_seconds": step_s[0],
          "step_ratio_to_sgd": step_s[0] / sgd_step,
          "steps": found[0]["report"]["steps"],
      }
      if task == "tweets":
        for key in ("macro_f1",):
          row[f"test_{key}"] = mean_std([final(r, "test", key) for r in found])[0]
        low = [final(r, "test_low_confidence", "accuracy") for r in found]
        row["low_confidence_accuracy"], row["low_confidence_std"], _ = mean_std(low)
      summary.append(row)
      curves[task][variant] = {
          "dev": mean_curve([dev_curve(r, metric) for r in found]),
          "loss": mean_curve([history_curve(r, "train/loss") for r in found]),
      }
  return _study(
      "optimizers",
      "Optimizer comparison",
      ctx,
      start,
      {"lr_sweep": sweep_rows, "runs": run_rows, "summary": summary},
      curves,
  )


# ---------------------------------------------------------------------------------- 2


def damping(ctx: Context) -> dict:
  plan, start = ctx.plan, _start(ctx)
  rows, curves = [], {}
  for filt in plan.damping_filters:
    variant = f"proximal_{filt}"
    lr = ctx.best_lr("sst2", variant) if variant in plan.lr_grid else None
    if lr is None:
      continue
    for lam in plan.damping_grid:
      result = ctx.run(
          "damping",
          "sst2",
          variant,
          lr,
          plan.seeds[0],
          {"optimizer.damping": lam, "optimizer.damping_mode": "relative"},
      )
      if result is None:
        continue
      rank = history_curve(result, "train/gram/effective_rank")
      kept = history_curve(result, "train/gram/kept_fraction")
      rows.append(
          {
              "filter": filt,
              "damping": lam,
              "lr": lr,
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
  return _study("damping", "Damping sweep (relative λ)", ctx, start, {"damping": rows}, curves)


# ---------------------------------------------------------------------------------- 3


def adversarial(ctx: Context) -> dict:
  plan, start = ctx.plan, _start(ctx)
  attack = runs.Attack(
      tuple(float(e) for e in plan.attack_epsilons), plan.attack_steps, plan.attack_examples
  )
  rows, curves = [], {}
  for name in plan.objective_optimizers:
    variant = ctx.resolve(name)
    lr = ctx.best_lr("sst2", variant) if variant else None
    if lr is None:
      continue
    clean_step = None
    for objective in plan.objectives:
      settings = (plan.get("objective_settings") or {}).get(objective) or {}
      settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
      resolved = objectives.ObjectiveConfig(kind=objective, **settings)
      extra = {
          "objective.kind": objective,
          **{f"objective.{field}": value for field, value in settings.items()},
      }
      result = ctx.run("adversarial", "sst2", variant, lr, plan.seeds[0], extra, attack=attack)
      if result is None:
        continue
      step = result["report"]["train_step_seconds"]
      clean_step = step if objective == "clean" else clean_step
      row = {
          "variant": variant,
          "objective": objective,
          "train_epsilon": resolved.epsilon,
          "train_steps": resolved.num_steps if objective != "clean" else 0,
          "lr": lr,
          "seed": plan.seeds[0],
          "dev_accuracy": final(result, "dev", "accuracy"),
          "step_seconds": step,
          "step_ratio_to_clean": step / clean_step if clean_step else float("nan"),
          "attack_examples": result["attack"][0]["num_examples"],
          "attack_steps": result["attack"][0]["num_steps"],
      }
      for attack_row in result["attack"]:
        row[f"acc_eps_{attack_row['epsilon']:g}"] = attack_row["accuracy"]
      rows.append(row)
      curves[f"{DISPLAY[variant]}, {objective}"] = result["attack"]
  return _study(
      "adversarial",
      "Adversarial objectives and robustness",
      ctx,
      start,
      {"adversarial": rows},
      curves,
  )


# ---------------------------------------------------------------------------------- 4


def multidevice(ctx: Context) -> dict:
  plan, start = ctx.plan, _start(ctx)
  best = ctx.resolve("best_proximal")
  filtered = best if best in ("proximal_tikhonov", "proximal_natural") else "proximal_tikhonov"
  rows, steps = [], {}
  for name in plan.multidevice_variants:
    variant = name if name in VARIANTS else filtered
    lr = ctx.best_lr("sst2", variant) if variant in plan.lr_grid else None
    if lr is None:
      continue
    extra = {"parallel": "shard_map"}
    if name in ("local", "global"):
      extra["optimizer.gram"] = name
    found = [
        r
        for r in (
            ctx.run(
                f"multidevice-{name}", "sst2", variant, lr, s, extra, devices=plan.multidevice_count
            )
            for s in plan.multidevice_seeds
        )
        if r is not None
    ]
    if not found:
      continue
    acc = mean_std([final(r, "dev", "accuracy") for r in found])
    steps[name] = mean_std([r["report"]["train_step_seconds"] for r in found])[0]
    rows.append(
        {
            "variant": variant,
            "gram": name if name in ("local", "global") else "—",
            "devices": plan.multidevice_count,
            "lr": lr,
            "seeds": len(found),
            "dev_accuracy": acc[0],
            "dev_accuracy_std": acc[1],
            "step_seconds": steps[name],
        }
    )
  base = next((steps[n] for n in plan.multidevice_variants if n in VARIANTS and n in steps), None)
  for row in rows:
    row["step_ratio_to_sgd"] = row["step_seconds"] / base if base else float("nan")
  return _study(
      "multidevice",
      f"Local vs global Gram on {plan.multidevice_count} host " "devices",
      ctx,
      start,
      {"multidevice": rows},
      {},
  )


# ---------------------------------------------------------------------------------- 5


def glue(ctx: Context) -> dict:
  plan, start = ctx.plan, _start(ctx)
  task = plan.glue_task
  metrics = data.get_task(task).metric_names
  rows = []
  for name in plan.glue_optimizers:
    variant = ctx.resolve(name)
    lr = ctx.best_lr("sst2", variant) if variant else None
    if lr is None:
      continue
    found = [
        r
        for r in (
            ctx.run("glue", task, variant, lr, s, {"max_length": plan.glue_max_length})
            for s in plan.seeds
        )
        if r is not None
    ]
    if not found:
      continue
    row = {
        "task": task,
        "variant": variant,
        "lr": lr,
        "seeds": len(found),
        "max_length": plan.glue_max_length,
    }
    for metric in metrics:
      row[metric], row[f"{metric}_std"], _ = mean_std(
          [final(r, "dev", m) for r in found for m in [metric]]
      )
    rows.append(row)
  if rows:
    rows.append(majority_class_row(ctx, task, plan.glue_max_length))
  return _study(
      "glue",
      f"{task.upper()} (dev)",
      ctx,
      start,
      {"glue": rows},
      {},
      notes=[
          f"learning rates transferred from the SST-2 sweep; metrics: "
          f"{', '.join(metrics)} (first is the official one); the majority "
          "row always predicts the training split's most frequent class, on "
          "the same dev examples (a model that learned nothing scores this)"
      ],
  )


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
      "variant": "majority",
      "lr": None,
      "seeds": len(ctx.plan.seeds),
      "max_length": max_length,
  }
  for metric, values in scores.items():
    row[metric], row[f"{metric}_std"], _ = mean_std(values)
  return row


# ---------------------------------------------------------------------------------- 6


def noise(ctx: Context) -> dict:
  plan, start = ctx.plan, _start(ctx)
  rows = []
  for name in plan.noise_optimizers:
    variant = ctx.resolve(name)
    lr = ctx.best_lr("sst2", variant) if variant else None
    if lr is None:
      continue
    for level in (0.0, *plan.noise_levels):
      label = "optimizers" if level == 0.0 else "noise"
      found = [
          r
          for r in (
              ctx.run(label, "sst2", variant, lr, s, {"label_noise": level}) for s in plan.seeds
          )
          if r is not None
      ]
      if found:
        acc = mean_std([final(r, "dev", "accuracy") for r in found])
        rows.append(
            {
                "variant": variant,
                "label_noise": level,
                "lr": lr,
                "seeds": len(found),
                "dev_accuracy": acc[0],
                "dev_accuracy_std": acc[1],
            }
        )
  low = []
  if "tweets" in plan.optimizer_tasks:
    for variant in plan.tweets_variants:
      lr = ctx.best_lr("tweets", variant)
      if lr is None:
        continue
      found = [
          r
          for r in (ctx.run("optimizers", "tweets", variant, lr, s) for s in plan.seeds)
          if r is not None
      ]
      if found:
        test = mean_std([final(r, "test", "accuracy") for r in found])
        lowc = mean_std([final(r, "test_low_confidence", "accuracy") for r in found])
        low.append(
            {
                "variant": variant,
                "lr": lr,
                "seeds": len(found),
                "test_accuracy": test[0],
                "test_accuracy_std": test[1],
                "low_confidence_accuracy": lowc[0],
                "low_confidence_std": lowc[1],
            }
        )
  return _study("noise", "Noisy labels", ctx, start, {"noise": rows, "low_confidence": low}, {})


FUNCTIONS = {
    "optimizers": optimizers,
    "damping": damping,
    "adversarial": adversarial,
    "multidevice": multidevice,
    "glue": glue,
    "noise": noise,
}
