"""Study 3: clean / FGM / PGD / SMART objectives with ``plan.objective_optimizers``: clean
accuracy and accuracy under embedding-space PGD vs ε; per objective, the tuned proximal
variant against AdamW under attack at the middle radius (:func:`reported_epsilon`)."""

from __future__ import annotations

from pathlib import Path

from experiments import run_process
from experiments.report import OPTIMIZER, SEEDS, get, spread, table
from experiments.studies.core import STUDY_TASK, comparison, summary_rows
from experiments.tuning import Context, mean_std
from nearprox.text import objectives

TITLE = "Adversarial objectives and robustness"


PLAN = {
    # Issue 40, part 5: these objectives' runs again with the attack on this many dev
    # examples (0: the whole split), beside the rows of plan.attack_examples.
    "robust_eval_objectives": (),
    "robust_eval_examples": 0,
}


def run(ctx: Context) -> dict:
  plan = ctx.plan
  epsilons = tuple(float(e) for e in plan.attack_epsilons)
  attack = run_process.Attack(epsilons, plan.attack_steps, plan.attack_examples)
  rows, curves, comparisons, summary = evaluate(ctx, attack, plan.objectives, "adversarial")
  tables = {"adversarial": rows, "summary": summary}
  whole = tuple(plan.get("robust_eval_objectives") or ())
  if whole:
    attack = run_process.Attack(epsilons, plan.attack_steps, plan.robust_eval_examples)
    rows, _, more, records = evaluate(ctx, attack, whole, "adversarial_whole_split")
    tables["adversarial_whole_split"] = rows
    comparisons += more
    summary += records
  found = {"tables": tables, "curves": curves, "comparisons": comparisons}
  return found | {"robust_eval_examples": plan.get("robust_eval_examples")}


def evaluate(ctx: Context, attack, objective_kinds, label: str):
  """(rows, curves, comparisons, summary records) of ``plan.objective_optimizers`` trained
  with each of ``objective_kinds`` and attacked by ``attack``, runs labelled ``label``."""
  plan = ctx.plan
  rows, curves, by_variant, summary = [], {}, {}, []
  for name in plan.objective_optimizers:
    clean = None
    for objective in objective_kinds:
      settings = (plan.get("objective_settings") or {}).get(objective) or {}
      settings = settings.to_dict() if hasattr(settings, "to_dict") else dict(settings)
      resolved = objectives.ObjectiveConfig(kind=objective, **settings)
      extra = {"objective.kind": objective, **{f"objective.{k}": v for k, v in settings.items()}}
      group = ctx.group(label, STUDY_TASK, name, extra=extra, attack=attack)
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
          "ief_weights": _ief_weights(found[0]["config"]),
      }
      rows.append(row)
      by_variant[group.variant, objective] = row
      values = [("accuracy", "dev_accuracy")]
      for radius in (f"{a['epsilon']:g}" for a in mean_attack):
        pgd = f"accuracy under embedding PGD, ε={radius}"
        values.append((pgd, f"acc_eps_{radius}", f"acc_std_eps_{radius}"))
      condition = f"{objective} training, {row['attack_steps']}-step PGD attack on " + _examples(
          attack.examples
      )
      summary += summary_rows("adversarial", row, group, values, condition=condition)
      curves[f"{group.label}, {objective}"] = mean_attack
  # The tuned proximal variant against AdamW, objective by objective, on the accuracy under
  # attack at one radius; a model that collapsed to one class is not counted as robust.
  eps, best, comparisons = reported_epsilon(attack.epsilons), ctx.resolve("best_proximal"), []
  on = "" if label == "adversarial" else ", " + _examples(attack.examples)
  for objective in objective_kinds:
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
        attack_examples=subject["attack_examples"],
        condition=f"SST-2 dev acc. under PGD ε={eps:g}, {objective} training{on}",
    )
    counted = not (subject["flat_under_attack"] or baseline["flat_under_attack"])
    comparisons.append({**record, "counted": counted})
  return rows, curves, comparisons, summary


def _ief_weights(config: dict) -> str | None:
  """Where an iEF run's example weights come from (None: no iEF weights, or nothing
  perturbed); runs stored before the option existed took them from the clean term."""
  if config["optimizer"].get("weighting") != "ief" or config["objective"]["kind"] == "clean":
    return None
  return config["objective"].get("ief_weights", "clean_term")


def _ief_note(rows: list[dict]) -> str:
  """Which iEF weights the adversarially trained iEF rows used ('' when none did)."""
  used = sorted({r["ief_weights"] for r in rows if r.get("ief_weights")})
  if not used:
    return ""
  source = {
      "clean_term": "the clean task term's logits only, not the perturbed term that ℓᵢ and K "
      "also contain",
      "whole_loss": "the whole per-example loss (clean and perturbed logits)",
  }
  return (
      "iEF weights sᵢ of the adversarially trained iEF rows: "
      + "; ".join(f'`objective.ief_weights = "{u}"`, from {source.get(u, u)}' for u in used)
      + " (docs/method.md §1.4)."
  )


def _examples(count: int) -> str:
  return "the whole dev split" if not count else f"{count} dev examples"


def reported_epsilon(epsilons) -> float:
  """The attack radius the comparisons are made at: the middle of the positive radii of the
  grid, where clean training is hurt but not yet at zero (the largest radius without any)."""
  radii = sorted(float(e) for e in epsilons)
  positive = [e for e in radii if e > 0]
  return positive[len(positive) // 2] if positive else radii[-1]


def markdown(study: dict) -> str:
  parts = []
  rows = study["tables"]["adversarial"]
  if rows:
    parts.append(
        _table(rows)
        + f"\n\nAttack: ℓ2 PGD on the word embeddings, {rows[0]['attack_steps']} steps, step "
        f"2.5ε/K, no random start, on {rows[0]['attack_examples']} SST-2 dev examples "
        "(ε=0: clean accuracy on that subset); accuracies under attack are means ± standard "
        "deviations over the seeds.\n\n![robustness](PLOT:robustness.png)"
    )
    if note := _ief_note(rows + (study["tables"].get("adversarial_whole_split") or [])):
      parts.append(note)
  whole = study["tables"].get("adversarial_whole_split") or []
  if whole:
    parts.append(
        f"The same attack on {_examples(study.get('robust_eval_examples'))} "
        f"({whole[0]['attack_examples']} examples): runs of their own, with the same training "
        "settings and seeds as the rows above:\n\n" + _table(whole)
    )
  return "\n\n".join(parts)


def _table(rows: list[dict]) -> str:
  columns = [
      OPTIMIZER,
      ("objective", get("objective", str)),
      ("training δ", _training_attack),
      SEEDS,
      ("clean dev acc (%)", spread("dev_accuracy", "dev_accuracy_std")),
      ("one-class seeds", get("collapsed_seeds", lambda n: "—" if n is None else n)),
      *[
          (f"ε={k[8:]} (%)", spread(k, f"acc_std_eps_{k[8:]}"))
          for k in rows[0]
          if k.startswith("acc_eps_")
      ],
      ("step × clean", get("step_ratio_to_clean")),
  ]
  return table(rows, columns)


def _training_attack(row: dict) -> str:
  """The training perturbation's radius and ascent steps."""
  if row["objective"] == "clean":
    return "–"
  return f"ε={row['train_epsilon']:g}, {row['train_steps']} step(s)"


def plots(study: dict, out: Path) -> list[Path]:
  if not study["curves"]:
    return []
  from nearprox.text import robustness

  path = out / "robustness.png"
  robustness.plot_accuracy(study["curves"], path, title="SST-2 dev under embedding PGD")
  return [path]
