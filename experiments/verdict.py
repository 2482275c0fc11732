"""The plain-words verdict, rendered from the study dicts: their tables and their comparison
records (:func:`studies.comparison`, which also defines the noise floor of a win or a loss).
Every number and every "ahead of" / "level with" / "behind" comes from those records; the
closing tally counts the records, not the text.
"""

from __future__ import annotations

import math

from experiments import report, studies
from nearprox.text import data

WORDS = {"ahead": "ahead of", "level": "level with", "behind": "behind"}


def _p(x) -> str:
  return f"{100 * x:.1f}%"


def _points(difference: float) -> str:
  """Two decimals: scores print with one, so a gap under 0.1 points still shows its sign."""
  return f"{100 * difference:+.2f}"


def _spread(mean: float, std: float | None, seeds: int | None) -> str:
  """'88.1 ± 0.2%': mean ± seed standard deviation, as the tables print it (no ± for one seed
  or an unknown count)."""
  return report.pct(mean, std, seeds) + "%"


def _side(record: dict, side: str) -> str:
  """A comparison record's subject or baseline score with its seed spread."""
  return _spread(record[f"{side}_mean"], record[f"{side}_std"], record.get(f"{side}_seeds"))


def _phrase(record: dict) -> str:
  """'ahead of NAME (b ± s; +d points)' / 'behind …' / 'level with …'."""
  return (
      f"{WORDS[record['outcome']]} {record['baseline']} ({_side(record, 'baseline')}; "
      f"{_points(record['difference'])} points)"
  )


def _proximal(row: dict) -> bool:
  return (row.get("optimizer") or "").startswith("proximal")


def optimizers(study) -> list[str]:
  out, summary = [], study["tables"]["summary"]
  for task in dict.fromkeys(r["task"] for r in summary):
    rows = [r for r in summary if r["task"] == task]
    best = next((r for r in rows if r.get("best_proximal")), None)
    if best is None:
      continue
    text = (
        f"On {data.get_task(task).display_name} ({best['split']} {best['metric']}, "
        f"{best['steps']} steps, {best['seeds']} seed(s)) the proximal variant chosen by the "
        f"tuning on held-out training data, {best['variant']}, scores "
        f"{_spread(best['mean'], best['std'], best['seeds'])}"
    )
    mine = [r for r in study["comparisons"] if r["task"] == task]
    for record in (r for r in mine if r.get("preselected", True)):
      text += "; it is " + _phrase(record)
    seeds = {r["variant"]: r["seeds"] for r in rows}
    so_far = lambda variant: _seeds_so_far(seeds.get(variant, 0), max(seeds.values()))
    others = [
        f"{r['subject']} {WORDS[r['outcome']].split()[0]} "
        f"({_points(r['difference'])}{so_far(r['subject'])})"
        for r in mine
        if not r.get("preselected", True) and r["baseline_optimizer"] == "adamw"
    ]
    if others:
      text += ". The other proximal variants against AdamW: " + ", ".join(others)
    top = max(rows, key=lambda r: r["mean"])
    text += f". Best overall: {top['variant']} ({_p(top['mean'])}{so_far(top['variant'])})."
    adamw = next((r for r in rows if r["optimizer"] == "adamw"), None)
    if adamw and best["reached"] and adamw["reached"]:
      text += (
          f" Steps to the {_p(best['target'])} dev target: {best['steps_to_target']:.0f} "
          f"({best['variant']}) vs {adamw['steps_to_target']:.0f} (AdamW)."
      )
    elif adamw:
      text += (
          f" The {_p(best['target'])} dev target was reached by {best['reached']}/"
          f"{best['seeds']} proximal and {adamw['reached']}/{adamw['seeds']} AdamW seeds."
      )
    text += _one_class(rows, best["split"])
    floor = [r for r in rows if r["not_above_majority_seeds"]]
    if floor:
      majority = next(r for r in study["tables"]["majority"] if r["task"] == task)
      text += (
          f" Seeds whose {best['metric']} is no higher than always predicting the majority "
          f"class ({_p(majority['mean'])}): "
          + ", ".join(
              f"{r['not_above_majority_seeds']} of {r['seeds']} {r['variant']} seeds" for r in floor
          )
          + "."
      )
    out.append(text)
  unstable = [r for r in summary if r["seeds"] > 1 and r["std"] >= 0.05]
  if unstable:
    spread = []
    for r in unstable:
      text = (
          f"{r['variant']} on {data.get_task(r['task']).display_name} {_p(r['mean'])} ± "
          f"{100 * r['std']:.1f} points at lr {r['learning_rate']:g}"
      )
      if r["collapsed_seeds"] is not None:
        text += f" ({r['collapsed_seeds']} of {r['seeds']} seeds predict a single class)"
      spread.append(text)
    out.append(
        "Seed spread: "
        + "; ".join(spread)
        + ". Settings were chosen by the mean over the tuning seeds, so a spread this large "
        "means the chosen setting is unstable at the full budget for some seeds."
    )
  out.append(step_cost(study.get("step_cost")))
  return out


def _one_class(rows: list[dict], split: str, name=lambda row: row["variant"]) -> str:
  """The collapse count of table rows (one per variant, ``name`` says which): the seeds whose
  final model predicts a single class on ``split``."""
  counted = [r for r in rows if r["collapsed_seeds"] is not None]
  collapsed = [r for r in counted if r["collapsed_seeds"]]
  if not counted:
    return ""
  if not collapsed:
    runs = sum(r["seeds"] for r in counted)
    return f" None of the {runs} runs predicts a single class on the {split} split."
  return (
      f" Seeds predicting a single class on the {split} split: "
      + ", ".join(f"{r['collapsed_seeds']} of {r['seeds']} {name(r)} seeds" for r in collapsed)
      + "."
  )


def step_cost(record: dict | None) -> str:
  """The cost sentence, from experiments/bench_optimizers.py's record: the study's runs
  share the machine with each other and with tests, so their step times are not compared."""
  if record is None:
    return (
        "Cost: not yet measured apart from the study (`python -m experiments.bench_optimizers`"
        "); the s/step columns above come from runs that shared the machine."
    )
  rows = {r["variant"]: r for r in record["rows"]}
  sgd = next((rows[v]["label"] for v in ("sgd", "sgd_momentum") if v in rows), None)
  parts = []
  if sgd:
    steps = [f"{r['ratio_to_sgd']:.2f}× ({r['label']})" for r in rows.values() if _proximal(r)]
    if "adamw" in rows:
      steps.append(f"{rows['adamw']['ratio_to_sgd']:.2f}× (AdamW)")
    parts.append(f"a step takes {', '.join(steps)} the {sgd} step")
  chained = [r for r in rows.values() if r["optimizer"] == "proximal_adamw"]
  if chained and "adamw" in rows:
    parts.append(
        "; ".join(f"{r['label']} {r['ratio_to_adamw']:.2f}× the AdamW step" for r in chained)
    )
  machine = record["machine"]
  where = (
      f"{machine['cpus']} CPU core(s)"
      if machine["backend"] == "cpu"
      else f"one {machine['device_kind']}"
  )
  return (
      f"Cost: {'; '.join(parts) or 'no SGD or AdamW step was timed to compare with'} (each "
      f"optimizer's training step timed in one process, interleaved, on {where} at load "
      f"average {record['load_average_at_start']:.1f}, {record['model']}, batch "
      f"{record['batch_size']} × {record['max_length']} tokens: "
      f"experiments/results/{record['mode']}/bench_optimizers.md)."
  )


def damping(study) -> list[str]:
  rows, out = study["tables"]["damping"], []
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


def _times(ratio: float, what: str) -> str:
  """``2.45× <what>``; for a NaN ratio (no runs of both on one kind of machine), says so."""
  if math.isnan(ratio):
    return "step times not compared: no runs of both on one kind of machine"
  return f"{ratio:.2f}× {what}"


def _seeds_so_far(seeds: int, most: int) -> str:
  """Names a row whose seeds have not all landed yet (a partial study): ", 2 of 3 seeds so far"."""
  return f", {seeds} of {most} seeds so far" if 0 < seeds < most else ""


def adversarial(study) -> list[str]:
  rows, out = study["tables"]["adversarial"], []
  most = max((r["seeds"] for r in rows), default=0)  # what every row will have
  for variant in dict.fromkeys(r["variant"] for r in rows):
    mine = {r["objective"]: r for r in rows if r["variant"] == variant}
    if "clean" not in mine or len(mine) < 2:
      continue
    clean = mine["clean"]
    eps = studies.reported_epsilon(float(k[8:]) for k in clean if k.startswith("acc_eps_"))
    key = f"acc_eps_{eps:g}"
    parts = [
        f"{objective} {_p(row[key])} at ε={eps:g} (clean dev {_p(row['dev_accuracy'])}, "
        f"{_times(row['step_ratio_to_clean'], 'the clean step time')}"
        f"{_seeds_so_far(row['seeds'], most)})"
        for objective, row in mine.items()
        if objective != "clean" and not row["flat_under_attack"]
    ]
    flat = [o for o, row in mine.items() if o != "clean" and row["flat_under_attack"]]
    text = (
        f"Adversarial training ({variant}, SST-2 dev): the clean-trained model keeps "
        f"{_p(clean[key])} under the ε={eps:g} PGD attack (clean dev "
        f"{_p(clean['dev_accuracy'])}{_seeds_so_far(clean['seeds'], most)})"
        + "".join("; " + part for part in parts)
        + "."
    )
    if flat:
      text += (
          f" Trained with {' and '.join(flat)} the model predicts (almost) one class at "
          "every ε: training collapsed at this learning rate, which is not robustness."
      )
    out.append(text)
  records = study.get("comparisons") or []
  if records:
    out.append(
        f"Under the ε={records[0]['epsilon']:g} PGD attack (accuracy, mean ± seed standard "
        f"deviation), {records[0]['subject']} against {records[0]['baseline']}: "
        + "; ".join(_robustness(record, most) for record in records)
        + "."
        + _one_class(rows, "dev", lambda row: f"{row['variant']}, {row['objective']}")
    )
  return out


def _robustness(record: dict, most: int) -> str:
  """'trained with fgm, 51.4 ± 2.0% vs 56.2 ± 1.1%: behind (-4.80 points)'."""
  objective = record["objective"]
  text = (
      f"{'trained clean' if objective == 'clean' else 'trained with ' + objective}, "
      f"{_side(record, 'subject')} vs {_side(record, 'baseline')}: "
  )
  if not record["counted"]:
    return text + "not compared (a model collapsed to one class)"
  so_far = _seeds_so_far(min(record["subject_seeds"], record["baseline_seeds"]), most)
  return text + f"{record['outcome']} ({_points(record['difference'])} points{so_far})"


def multidevice(study) -> list[str]:
  rows = {r["gram"]: r for r in study["tables"]["multidevice"]}
  if not study["comparisons"]:
    return []
  record = study["comparisons"][0]
  ratio = rows["global"]["step_seconds"] / rows["local"]["step_seconds"]
  return [
      f"On {rows['global']['devices']} host devices the exact global Gram "
      f"({_side(record, 'subject')} SST-2 dev) is {_phrase(record)}, "
      f"{'at ' if math.isfinite(ratio) else ''}{_times(ratio, 'its step time')}."
  ]


def glue(study) -> list[str]:
  rows = study["tables"]["glue"]
  proximal = next((r for r in rows if _proximal(r)), None)
  if proximal is None:
    return []
  metric = data.get_task(proximal["task"]).primary_metric
  text = (
      f"On {data.get_task(proximal['task']).display_name} the {proximal['variant']} scores "
      f"dev {metric} {_p(proximal[metric])}"
  )
  counted = [r for r in study["comparisons"] if r["counted"]]
  skipped = [r["baseline"] for r in study["comparisons"] if not r["counted"]]
  text += "".join("; " + _phrase(record) for record in counted) + "."
  trivial = [r for r in rows if r.get("same_as_majority")]
  if trivial:
    names = " and ".join(r["variant"] for r in trivial)
    one = len(trivial) == 1
    majority = next(r for r in rows if r["optimizer"] is None)
    text += (
        f" {names[0].upper() + names[1:]} score{'s' if one else ''} exactly what always "
        f"predicting the majority class scores ({metric} {_p(majority[metric])}): "
        f"{'it' if one else 'they'} learned nothing at this budget"
    )
    text += f", so it is not compared with {' or '.join(skipped)}." if skipped else "."
  return [text]


def noise(study) -> list[str]:
  rows = {(r["variant"], r["label_noise"]): r for r in study["tables"]["noise"]}
  out = []
  for record in study["comparisons"]:
    if "label_noise" not in record:
      out.append(
          f"On low-confidence tweets (test) the best proximal variant, {record['subject']}, "
          f"scores {_side(record, 'subject')}: {_phrase(record)}."
      )
      continue
    subject, baseline = record["subject"], record["baseline"]
    text = (
        f"With {_p(record['label_noise'])} flipped SST-2 training labels, {subject} reaches "
        f"{_side(record, 'subject')} dev accuracy, {_phrase(record)}"
    )
    if (subject, 0.0) in rows:
      drop = rows[subject, 0.0]["dev_accuracy"] - record["subject_mean"]
      text += f"; it loses {100 * drop:.1f} points to the noise"
      if (baseline, 0.0) in rows:
        drop = rows[baseline, 0.0]["dev_accuracy"] - record["baseline_mean"]
        text += f", {baseline} {100 * drop:.1f}"
    out.append(text + ".")
  return out


def sketch(study) -> list[str]:
  tables = {
      None: {r["gram"]: r for r in study["tables"]["sketch"]},
      "tuning": {r["gram"]: r for r in study["tables"].get("sketch_tuning_budget") or []},
  }
  out = []
  for record in study["comparisons"]:
    rows = tables[record.get("budget")]
    sketched, exact = rows["sketched"], rows["exact"]
    if sketched.get("timed_step_ratio"):
      cost = (
          f"at {sketched['timed_step_ratio']:.2f}× its step time (both steps timed in one "
          "process by experiments/bench_optimizers.py)"
      )
    elif sketched.get("machine") == exact.get("machine"):
      cost = (
          f"at {sketched['step_seconds'] / exact['step_seconds']:.2f}× its step time in these "
          "runs, which shared the machine"
      )
    else:  # step times of different machines are not comparable
      cost = f"its runs on {sketched['machine']}, the exact Gram's on {exact['machine']}"
    where = (
        "SST-2 dev accuracy"
        if record.get("budget") is None
        else f"held-out SST-2 training accuracy at the tuning budget ({sketched['steps']} steps)"
    )
    out.append(
        f"With {record['subject']}, {sketched['variant']} at learning rate "
        f"{sketched['learning_rate']:g}, λ {sketched['damping']:g} reaches "
        f"{_side(record, 'subject')} {where} over {sketched['seeds']} seeds: "
        f"{_phrase(record)}, {cost}."
    )
  return out


def squad(study) -> list[str]:
  if not study["comparisons"]:
    return []
  first = study["comparisons"][0]
  text = (
      f"On SQuAD's held-out articles, {first['subject']} reaches held-out F1 "
      f"{_side(first, 'subject')}"
  )
  return [text + "".join("; " + _phrase(record) for record in study["comparisons"]) + "."]


FUNCTIONS = {
    "optimizers": optimizers,
    "damping": damping,
    "adversarial": adversarial,
    "multidevice": multidevice,
    "glue": glue,
    "noise": noise,
    "sketch": sketch,
    "squad": squad,
}


def verdict(results: dict[str, dict]) -> str:
  """One paragraph per study that has rows, then the tally of the comparisons with AdamW."""
  studied = [
      s for s in (results.get(name) for name in FUNCTIONS) if s and any(s["tables"].values())
  ]
  paragraphs = [text for study in studied for text in FUNCTIONS[study["name"]](study)]
  if not paragraphs:
    return "No study has results yet."
  against = [
      record
      for study in studied
      for record in study["comparisons"]
      if record["baseline_optimizer"] == "adamw"
      and record.get("counted", True)
      and record.get("preselected", True)  # one proximal variant per task: the tuned choice
  ]
  if against:
    tally = {outcome: sum(r["outcome"] == outcome for r in against) for outcome in WORDS}
    paragraphs.append(
        "In short: against AdamW, the usual fine-tuning baseline, the proximal method is "
        f"ahead in {tally['ahead']}, level in {tally['level']} and behind in "
        f"{tally['behind']} of the {len(against)} comparisons above (a difference counts "
        "when it exceeds the summed seed standard deviations and "
        f"{100 * studies.MIN_GAP:.0f} point)."
    )
  if any(row.get("seeds") == 1 for s in studied for rows in s["tables"].values() for row in rows):
    paragraphs.append(
        "Caution: some of these numbers come from a single seed (no standard deviation), "
        "where run-to-run variation at this budget can exceed the differences above; "
        "treat single-seed comparisons as indications, not results."
    )
  return "\n\n".join(paragraphs)
