"""Studies of robustness: adversarial objectives and attacks (3), noisy labels (6)."""

from __future__ import annotations

from experiments import run_process
from experiments.studies.core import LOW_CONFIDENCE_TASK, STUDY_TASK, comparison, study
from experiments.tuning import PROXIMAL, Context, mean_std
from nearprox.text import objectives


def reported_epsilon(epsilons) -> float:
  """The attack radius the comparisons are made at: the middle of the positive radii of the
  grid, where clean training is hurt but not yet at zero (the largest radius without any)."""
  radii = sorted(float(e) for e in epsilons)
  positive = [e for e in radii if e > 0]
  return positive[len(positive) // 2] if positive else radii[-1]


@study("Adversarial objectives and robustness")
def adversarial(ctx: Context) -> dict:
  plan = ctx.plan
  attack = run_process.Attack(
      tuple(float(e) for e in plan.attack_epsilons), plan.attack_steps, plan.attack_examples
  )
  rows, curves, by_variant = [], {}, {}
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
      # Mean and seed spread of the accuracy under attack at each radius (one ε grid).
      mean_attack = []
      for rows_at in zip(*(r["attack"] for r in found)):
        mean, std = mean_std([r["accuracy"] for r in rows_at])
        mean_attack.append({**rows_at[0], "accuracy": mean, "accuracy_std": std})
      accuracy = {f"acc_eps_{a['epsilon']:g}": a["accuracy"] for a in mean_attack}
      spread = {f"acc_std_eps_{a['epsilon']:g}": a["accuracy_std"] for a in mean_attack}
      row = {
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
          **spread,
          # The same accuracy at every radius: a model predicting (almost) one class.
          "flat_under_attack": max(accuracy.values()) - min(accuracy.values()) < 0.005,
      }
      rows.append(row)
      by_variant[group.variant, objective] = row
      curves[f"{group.label}, {objective}"] = mean_attack
  # The tuned proximal variant against AdamW, objective by objective, on the accuracy under
  # attack at one radius; a model that collapsed to one class is not counted as robust.
  eps, best, comparisons = reported_epsilon(attack.epsilons), ctx.resolve("best_proximal"), []
  for objective in plan.objectives:
    subject, baseline = by_variant.get((best, objective)), by_variant.get(("adamw", objective))
    if subject is None or baseline is None:
      continue
    record = comparison(
        subject,
        baseline,
        f"acc_eps_{eps:g}",
        f"acc_std_eps_{eps:g}",
        study="adversarial",
        task=STUDY_TASK,
        objective=objective,
        epsilon=eps,
    )
    counted = not (subject["flat_under_attack"] or baseline["flat_under_attack"])
    comparisons.append({**record, "counted": counted})
  return {"tables": {"adversarial": rows}, "curves": curves, "comparisons": comparisons}


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
