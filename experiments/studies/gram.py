"""Studies of how the Gram matrix is formed: the damping sweep (2), the local vs global Gram
on host devices (4) and the sketched vs exact Gram (7)."""

from __future__ import annotations

from experiments.studies.core import SKETCHED, STUDY_TASK, comparison, dev_curve, step_cost, study
from experiments.tuning import Context, Group, collapsed, final, history_curve, mean_std
from nearprox.text import data


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


@study("Sketched vs exact Gram")
def sketch(ctx: Context) -> dict:
  plan = ctx.plan
  # First: it needs one variant's tuning, best_proximal (below) trains every missing one.
  check = sketch_at_tuning_budget(ctx)
  best = ctx.resolve("best_proximal")
  rows = {}
  settings = (("exact", "optimizers", None), ("sketched", "sketch", plan.sketch_dim))
  for gram, label, dim in settings:
    extra = None if dim is None else {"optimizer.sketch_dim": dim}
    group = ctx.group(label, STUDY_TASK, best, extra=extra)  # exact: study 1's runs
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
      (best, rows),
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
