"""What every study shares: constants, the comparison record, the summary.json record
(:data:`SUMMARY_FIELDS`, :func:`summary_rows`), dev curves, the majority-class floor, and
:func:`run_study`, which turns a study module's ``run`` into a study dict."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from experiments.tuning import DISPLAY, Context, Group, final, history_curve, mean_std
from nearprox.text import data

# What the best proximal variant is compared with: AdamW, its peers
# (nearprox.training.optimizers.PEERS), SGD.
BASELINES = ("adamw", "muon", "schedule_free_adamw", "lion", "psgd_kron", "sgd_momentum", "sgd")
STUDY_TASK = "sst2"  # where the damping, adversarial, multidevice and noise studies train
LOW_CONFIDENCE_TASK = "tweets"  # the task whose test split has low-confidence labels
# The records of experiments/results/<mode>/summary.json, each with these fields in this
# order: every study's ``tables["summary"]`` (the optimizer study's rows carry more, dropped
# there). One record is one number: the mean over ``seeds`` runs (and their sample standard
# deviation ``std``) of ``metric`` on ``split`` for one optimizer (``optimizer``, its label
# ``variant``, its ``learning_rate`` and ``damping``; ``steps``, ``batch_size`` and
# ``max_length`` of its runs; ``collapsed_seeds``: its runs whose final model predicts one
# class) in one ``condition`` of one ``study`` (the REGISTRY name). ``condition`` says what
# the study varied for that row ("label noise 40%", "B=128, 19200 training examples",
# "λ₁=0.3", "pgd training, 5-step PGD attack on the whole dev split"), None where the study
# varies nothing beyond the optimizer.
# By default ``metric`` is the task's official metric on its reported split; every other
# number a study reports as a result (accuracy under attack, L1's zero-weight fraction, steps
# and seconds to a target, the damping sweep's Gram spectrum) is a record of its own whose
# ``metric`` names it (``split``: "train" for what the training steps log, None for a
# property of the final parameters). ``mean`` is None where the study has no number (a target
# not reached, a step not timed, a value not logged); ``std`` is None where the number is not
# a spread over seeds. (study, condition, task, variant, metric, split) names one record.
# Reference rows (the majority class) and the contended runs' own step times are no records.
# Each study's conditions and metrics: docs/studies.md, "summary.json"; build records with
# summary_rows (from a table row) or summary_record.
SUMMARY_FIELDS = tuple(
    "study condition task optimizer variant steps batch_size max_length seeds learning_rate"
    " damping metric mean std collapsed_seeds split".split()
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
  return held_after_divergence(result, sorted(dict(points).items()))


def held_after_divergence(result: dict, curve: list[tuple[int, float]]) -> list[tuple[int, float]]:
  """``curve`` of a run that diverged (training stopped at a non-finite update,
  ``diverged_at_step``) with its last score held at every evaluation it skipped up to the
  budget's last step: its parameters could no longer change, so those are the scores it would
  have logged, and a mean over seeds (:func:`mean_curve`) keeps those steps."""
  diverged_at = result["report"].get("diverged_at_step")
  if diverged_at is None or not curve:
    return curve
  every, end = result["config"]["eval_every"], result["config"]["num_train_steps"]
  skipped = [s for s in range(every, end, every) if s > diverged_at] + [end]
  return sorted({**dict(curve), **dict.fromkeys(skipped, curve[-1][1])}.items())


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
  ``<key>_std``; the rows' ``seeds`` counts when they have them): ``outcome`` is "ahead",
  "behind" or "level" (within ``MIN_GAP``); ``caveat`` (:func:`edge_caveat`) qualifies a win
  over a side whose tuning chose an edge of its grid."""
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
      "subject_seeds": subject.get("seeds"),
      "baseline_seeds": baseline.get("seeds"),
      "difference": a - b,
      "outcome": outcome,
      "caveat": edge_caveat(outcome, subject, baseline),
  }


def edge_caveat(outcome: str, subject: dict, baseline: dict) -> str:
  """For a win ("ahead" or "behind"), the losing side's tuned settings that sit at an edge of
  its tuning grid (the rows' ``tuning_edges``, :meth:`Group.describe`), e.g. "Muon's learning
  rate at the top of its tuning grid"; "" otherwise. The grid does not show that side's best
  setting, so part of the win may be that side's tuning, not the method."""
  loser = {"ahead": baseline, "behind": subject}.get(outcome)
  edges = loser.get("tuning_edges") if loser else None
  return f"{loser['variant']}'s {edges} of its tuning grid" if edges else ""


def summary_record(**fields) -> dict:
  """``fields`` as a summary.json record: exactly :data:`SUMMARY_FIELDS`, in their order (a
  field left out is a KeyError, not a silent gap)."""
  return {k: fields[k] for k in SUMMARY_FIELDS}


def summary_rows(
    study: str,
    row: dict,
    group: Group,
    values,
    *,
    task: str | None = None,
    split: str | None = "dev",
    condition: str | None = None,
) -> list[dict]:
  """The summary.json records of table row ``row``, computed from ``group``'s runs: one per
  ``(metric, key)`` or ``(metric, key, std_key)`` of ``values``, mean ``row[key]`` and std
  ``row[std_key]`` (default ``<key>_std``; None when the row has none), NaN as None.

  The optimizer's columns come from ``row`` where it has them (a study's own label, learning
  rate or damping), else from ``group.describe()``; steps, batch size and tokens from the
  runs; ``task`` defaults to ``row["task"]``, else :data:`STUDY_TASK`."""
  first = group.results[0]
  config = first["config"]
  described = {**group.describe(), "seeds": len(group.results), **row}
  collapsed = row["collapsed_seeds"] if "collapsed_seeds" in row else group.collapsed_seeds()
  common = {
      "study": study,
      "condition": condition,
      "task": task or row.get("task", STUDY_TASK),
      **{k: described[k] for k in ("optimizer", "variant", "seeds", "learning_rate", "damping")},
      "steps": config["num_train_steps"],  # the budget (a diverged run trains fewer)
      "batch_size": config.get("batch_size"),
      "max_length": config.get("max_length"),
      "collapsed_seeds": collapsed,
      "split": split,
  }
  records = []
  for metric, key, *std_key in values:
    std = row.get(std_key[0] if std_key else f"{key}_std")
    records.append(
        summary_record(**common, metric=metric, mean=_number(row[key]), std=_number(std))
    )
  return records


def _number(value):
  """None for a missing or NaN value (JSON has no NaN), else the value."""
  return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def run_study(name: str, module, ctx: Context) -> dict:
  """The study dict of study ``module`` (an :mod:`experiments.studies` module): what its
  ``run(ctx)`` returns (``tables`` and optionally ``curves``, ``comparisons``, ``notes``, a
  ``title`` of its own), its name and title, the runs it asked for first (``requested``; runs
  shared with an earlier study belong to that one), those of them not stored (``missing``)
  and the tuning choices it waits for (``waiting``)."""
  start, waits_before = len(ctx.store.requested), len(ctx.waiting)
  found = module.run(ctx)
  keys = ctx.store.requested[start:]
  return {
      "name": name,
      "title": module.TITLE,
      "curves": {},
      "comparisons": [],
      "notes": [],
      **found,
      "requested": len(keys),
      "missing": [ctx.store.missing[k] for k in keys if k in ctx.store.missing],
      # Choices it needs that the tuning has not made: runs it will ask for later.
      "waiting": sorted(set(ctx.waiting[waits_before:])),
      "plan": ctx.plan.mode,
  }


def majority_class_scores(
    ctx: Context, task_name: str, split: str, seeds
) -> dict[int, dict[str, float]]:
  """Per seed, the scores of always predicting the most frequent training label on the
  ``split`` examples that seed's runs evaluate (the tweets' splits and the evaluation
  subsets of ``max_eval_examples`` depend on the seed)."""
  config = ctx.store.base_config
  task = data.get_task(task_name)
  scores = {}
  for seed in seeds:
    load = lambda name: data.load_task(
        task_name, name, config.data_dir, source=config.source, seed=seed
    ).labels
    train_labels, labels = load("train"), load(split)
    majority = int(np.argmax(np.bincount(train_labels, minlength=task.num_labels)))
    keep = data.eval_subset(len(labels), config.max_eval_examples, seed)
    labels = labels if keep is None else labels[keep]
    scores[seed] = task.metrics(labels, np.full_like(labels, majority))
  return scores


def majority_class_row(ctx: Context, task_name: str, max_length: int) -> dict:
  """The dev scores of always predicting the most frequent training label, mean over the
  plan's seeds (each on its own evaluated examples)."""
  by_seed = majority_class_scores(ctx, task_name, "dev", ctx.plan.seeds)
  row = {
      "task": task_name,
      "optimizer": None,
      "variant": DISPLAY["majority"],
      "learning_rate": None,
      "seeds": len(by_seed),
      "max_length": max_length,
  }
  for metric in data.get_task(task_name).metric_names:
    row[metric], row[f"{metric}_std"] = mean_std([s[metric] for s in by_seed.values()])
  return row


def step_cost(ctx: Context) -> dict | None:
  """experiments/bench_optimizers.py's record in the study's results folder (None: not run)."""
  path = Path(ctx.store.out) / STEP_COST_FILE
  return json.loads(path.read_text()) if path.exists() else None
