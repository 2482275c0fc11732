"""Studies of robustness: adversarial objectives and attacks (3), noisy labels (6)."""

from __future__ import annotations

from experiments import run_process
from experiments.studies.core import LOW_CONFIDENCE_TASK, STUDY_TASK, comparison, study
from experiments.tuning import PROXIMAL, Context, mean_std
from nearprox.text import objectives


@study("Adversarial objectives and robustness")
def adversarial(ctx: Context) -> dict:
  plan = ctx.plan
  attack = run_process.Attack(
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
