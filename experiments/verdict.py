"""The plain-words verdict: templated sentences whose every number comes from a study dict.

A difference counts as a win or a loss only when it exceeds the noise floor: the sum of the
two seed standard deviations, and at least one accuracy point (with one seed there is no
standard deviation, so one point is all the floor there is).
"""

from __future__ import annotations

import math

from studies import DISPLAY, PROXIMAL

MIN_GAP = 0.01


def _ok(*values) -> bool:
  return all(v is not None and not (isinstance(v, float) and math.isnan(v)) for v in values)


def _p(x) -> str:
  return f"{100 * x:.1f}%"


def compare(a: float, b: float, a_std: float, b_std: float, name: str) -> str:
  """'ahead of NAME (b; +d points)' / 'behind …' / 'level with …' for a vs b."""
  floor = max(MIN_GAP, (a_std or 0.0) + (b_std or 0.0))
  diff = a - b
  word = "ahead of" if diff > floor else "behind" if diff < -floor else "level with"
  return f"{word} {name} ({_p(b)}; {100 * diff:+.1f} points)"


def optimizers(study) -> list[str]:
  out = []
  summary = study["tables"]["summary"]
  for task in dict.fromkeys(r["task"] for r in summary):
    rows = {r["variant"]: r for r in summary if r["task"] == task}
    prox = [rows[v] for v in PROXIMAL if v in rows]
    if not prox:
      continue
    best_prox = max(prox, key=lambda r: r["mean"])
    best_all = max(rows.values(), key=lambda r: r["mean"])
    first = best_prox
    text = (
        f"On {'SST-2' if task == 'sst2' else task} ({first['split']} {first['metric']}, "
        f"{first['steps']} steps, {first['seeds']} seed(s)) the best proximal variant, "
        f"{DISPLAY[best_prox['variant']]}, scores {_p(best_prox['mean'])}"
    )
    for base in ("adamw", "sgd_momentum", "sgd"):
      if base in rows:
        text += "; it is " + compare(
            best_prox["mean"],
            rows[base]["mean"],
            best_prox["std"],
            rows[base]["std"],
            DISPLAY[base],
        )
    text += f". Best overall: {DISPLAY[best_all['variant']]} ({_p(best_all['mean'])})."
    if "adamw" in rows and best_prox["reached"] and rows["adamw"]["reached"]:
      text += (
          f" Steps to the {_p(first['target'])} dev target: "
          f"{best_prox['steps_to_target']:.0f} ({DISPLAY[best_prox['variant']]}) vs "
          f"{rows['adamw']['steps_to_target']:.0f} (AdamW)."
      )
    elif "adamw" in rows:
      text += (
          f" The {_p(first['target'])} dev target was reached by "
          f"{best_prox['reached']}/{best_prox['seeds']} proximal and "
          f"{rows['adamw']['reached']}/{rows['adamw']['seeds']} AdamW seeds."
      )
    out.append(text)
  unstable = [r for r in summary if r["seeds"] > 1 and _ok(r["std"]) and r["std"] >= 0.05]
  if unstable:
    out.append(
        "Seed spread: "
        + "; ".join(
            f"{DISPLAY[r['variant']]} on {'SST-2' if r['task'] == 'sst2' else r['task']} "
            f"{_p(r['mean'])} ± {100 * r['std']:.1f} points at lr {r['lr']:g}"
            for r in unstable
        )
        + ". The rate was tuned on seed 0 alone, and some other seeds collapse to the majority "
        "class at it: at this budget these optimizers are sensitive to the learning rate."
    )
  costs = {}
  for r in summary:
    if r["variant"] in PROXIMAL and _ok(r["step_ratio_to_sgd"]):
      costs.setdefault(r["variant"], []).append(r["step_ratio_to_sgd"])
  if costs:
    out.append(
        "Cost: a step takes "
        + ", ".join(f"{sum(v) / len(v):.2f}× ({DISPLAY[k]})" for k, v in costs.items())
        + " the plain SGD step (median step times, averaged over the tasks)."
    )
  return out


def damping(study) -> list[str]:
  rows = study["tables"]["damping"]
  out = []
  for filt in dict.fromkeys(r["filter"] for r in rows):
    mine = sorted((r for r in rows if r["filter"] == filt), key=lambda r: r["damping"])
    best = max(mine, key=lambda r: r["dev_accuracy"])
    worst = min(mine, key=lambda r: r["dev_accuracy"])
    if best["dev_accuracy"] - worst["dev_accuracy"] < 5e-4:
      spread = f"stays at {_p(best['dev_accuracy'])} for every λ"
    else:
      spread = (
          f"ranges {_p(worst['dev_accuracy'])} (λ={worst['damping']:g}) to "
          f"{_p(best['dev_accuracy'])} (λ={best['damping']:g})"
      )
    out.append(
        f"Damping ({filt}): over λ = {mine[0]['damping']:g} … {mine[-1]['damping']:g} "
        f"SST-2 dev accuracy {spread}; the kept fraction "
        f"‖d‖²/‖g‖² averages {mine[0]['kept_fraction_mean']:.3g} at the smallest λ and "
        f"{mine[-1]['kept_fraction_mean']:.3g} at the largest, with mean effective rank "
        f"{mine[0]['effective_rank_mean']:.3g} of the Gram matrix."
    )
  return out


def _collapsed(row) -> bool:
  """The same accuracy at every attack radius: a model that predicts (almost) one class."""
  curve = [v for k, v in row.items() if k.startswith("acc_eps_")]
  return max(curve) - min(curve) < 0.005


def adversarial(study) -> list[str]:
  rows = study["tables"]["adversarial"]
  out = []
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = {r["objective"]: r for r in rows if r["variant"] == variant}
    if "clean" not in mine or len(mine) < 2:
      continue
    clean = mine["clean"]
    radii = sorted(float(k[8:]) for k in clean if k.startswith("acc_eps_"))
    positive = [e for e in radii if e > 0]
    # The middle of the attack grid: where clean training is hurt but not yet at zero.
    eps = positive[len(positive) // 2] if positive else radii[-1]
    key = f"acc_eps_{eps:g}"
    parts, collapsed = [], []
    for objective, row in mine.items():
      if objective == "clean":
        continue
      if _collapsed(row):
        collapsed.append(objective)
        continue
      parts.append(
          f"{objective} {_p(row[key])} at ε={eps:g} (clean dev "
          f"{_p(row['dev_accuracy'])}, {row['step_ratio_to_clean']:.2f}× the clean "
          "step time)"
      )
    text = (
        f"Adversarial training ({DISPLAY[variant]}, SST-2 dev): the clean-trained model "
        f"keeps {_p(clean[key])} under the ε={eps:g} PGD attack (clean dev "
        f"{_p(clean['dev_accuracy'])})"
    )
    text += ("; " + "; ".join(parts)) if parts else ""
    text += "."
    if collapsed:
      text += (
          f" Trained with {' and '.join(collapsed)} the model predicts (almost) one "
          "class at every ε: training collapsed at this learning rate, which is not "
          "robustness."
      )
    out.append(text)
  return out


def multidevice(study) -> list[str]:
  rows = {r["gram"]: r for r in study["tables"]["multidevice"]}
  if "local" not in rows or "global" not in rows:
    return []
  loc, glo = rows["local"], rows["global"]
  return [
      f"On {loc['devices']} host devices the exact global Gram "
      f"({_p(glo['dev_accuracy'])} SST-2 dev) is "
      + compare(
          glo["dev_accuracy"],
          loc["dev_accuracy"],
          glo["dev_accuracy_std"],
          loc["dev_accuracy_std"],
          "the per-device (local) Gram",
      )
      + f", at {glo['step_seconds'] / loc['step_seconds']:.2f}× its step time."
  ]


def glue(study) -> list[str]:
  rows = {r["variant"]: r for r in study["tables"]["glue"]}
  prox = [rows[v] for v in PROXIMAL if v in rows]
  if not prox:
    return []
  r = prox[0]
  metric = next(m for m in ("f1", "mcc", "accuracy") if m in r)
  majority = rows.get("majority")
  # Equal to always predicting the majority class in every metric: nothing learned.
  trivial = {
      v
      for v, row in rows.items()
      if majority
      and v != "majority"
      and all(abs(row[m] - majority[m]) < 1e-9 for m in ("f1", "mcc", "accuracy") if m in row)
  }
  text = (
      f"On {r['task'].upper()} the {DISPLAY[r['variant']]} scores dev {metric} " f"{_p(r[metric])}"
  )
  skipped = []
  for base in ("adamw", "sgd_momentum"):
    if base in rows and {base, r["variant"]} <= trivial:  # no tally for two non-learners
      skipped.append(DISPLAY[base])
    elif base in rows:
      text += "; " + compare(
          r[metric],
          rows[base][metric],
          r[f"{metric}_std"],
          rows[base][f"{metric}_std"],
          DISPLAY[base],
      )
  text += "."
  if trivial:
    names = " and ".join(DISPLAY[v] for v in rows if v in trivial)
    count = len(trivial)
    text += (
        f" {names[0].upper() + names[1:]} score{'s' if count == 1 else ''} exactly what "
        f"always predicting the majority class scores ({metric} {_p(majority[metric])}):"
        f" {'it' if count == 1 else 'they'} learned nothing at this budget"
    )
    text += f", so it is not compared with {' or '.join(skipped)}." if skipped else "."
  return [text]


def noise(study) -> list[str]:
  out = []
  rows = study["tables"]["noise"]
  levels = sorted({r["label_noise"] for r in rows})
  by = {(r["variant"], r["label_noise"]): r for r in rows}
  for prox in (v for v in PROXIMAL if any(k[0] == v for k in by)):
    hi = levels[-1]
    if (prox, hi) not in by or ("adamw", hi) not in by or hi == 0.0:
      continue
    mine, adamw = by[(prox, hi)], by[("adamw", hi)]
    text = (
        f"With {_p(hi)} flipped SST-2 training labels, {DISPLAY[prox]} reaches "
        f"{_p(mine['dev_accuracy'])} dev accuracy, "
        + compare(
            mine["dev_accuracy"],
            adamw["dev_accuracy"],
            mine["dev_accuracy_std"],
            adamw["dev_accuracy_std"],
            "AdamW",
        )
    )
    if (prox, 0.0) in by:
      drop = by[(prox, 0.0)]["dev_accuracy"] - mine["dev_accuracy"]
      text += f"; it loses {100 * drop:.1f} points to the noise"
      if ("adamw", 0.0) in by:
        text += f", AdamW {100 * (by[('adamw', 0.0)]['dev_accuracy'] - adamw['dev_accuracy']):.1f}"
    out.append(text + ".")
  low = {r["variant"]: r for r in study["tables"]["low_confidence"]}
  lp = [low[v] for v in PROXIMAL if v in low]
  if lp and "adamw" in low:
    best = max(lp, key=lambda r: r["low_confidence_accuracy"])
    out.append(
        f"On low-confidence tweets (test) the best proximal variant, "
        f"{DISPLAY[best['variant']]}, scores {_p(best['low_confidence_accuracy'])}: "
        + compare(
            best["low_confidence_accuracy"],
            low["adamw"]["low_confidence_accuracy"],
            best["low_confidence_std"],
            low["adamw"]["low_confidence_std"],
            "AdamW",
        )
        + "."
    )
  return out


FUNCTIONS = {
    "optimizers": optimizers,
    "damping": damping,
    "adversarial": adversarial,
    "multidevice": multidevice,
    "glue": glue,
    "noise": noise,
}


def verdict(results: dict[str, dict]) -> str:
  """One paragraph per study that has rows; every figure is read from ``results``."""
  sentences = []
  for name, fn in FUNCTIONS.items():
    study = results.get(name)
    if study and any(study["tables"].values()):
      sentences += fn(study)
  if not sentences:
    return "No study has results yet."
  text = "\n\n".join(sentences)
  tally = {word: text.count(f"{word} AdamW") for word in ("ahead of", "level with", "behind")}
  if sum(tally.values()):
    sentences.append(
        "In short: against AdamW, the usual fine-tuning baseline, the proximal method is "
        f"ahead in {tally['ahead of']}, level in {tally['level with']} and behind in "
        f"{tally['behind']} of the {sum(tally.values())} comparisons above (a difference "
        f"counts when it exceeds the summed seed standard deviations and "
        f"{100 * MIN_GAP:.0f} point)."
    )
  single = any(
      row.get("seeds") == 1
      for study in results.values()
      if study
      for rows in study["tables"].values()
      for row in rows
  )
  if single:
    sentences.append(
        "Caution: some of these numbers come from a single seed (no standard deviation), "
        "where run-to-run variation at this budget can exceed the differences above; "
        "treat single-seed comparisons as indications, not results."
    )
  return "\n\n".join(sentences)
