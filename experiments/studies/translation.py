"""Translation from scratch (issue 39): Multi30k English→German with the encoder–decoder of
``experiments/configs/multi30k.py``, each optimizer tuned on val by the protocol's rule,
reported on test_2016_flickr.

``plan.translation`` declares the study (nothing runs without it):

* ``tuning``: the protocol's section (:meth:`experiments.tuning.Context.tune`): ``task``
  (multi30k), ``steps``, ``seeds``, ``holdout_examples`` = 0 with ``split`` = "dev" (val is
  the tuning split; test_2016_flickr is only reported), ``base`` = "multi30k" (the config the
  runs start from) and ``settings`` (the budget every run shares: batch, steps, warmup…).
* ``variants``: optimizers and aliases (``best_proximal`` is the SST-2 tuning's choice of
  variant; its rate and damping are tuned here), ``sketched``: those also reported with the
  sketched Gram (``plan.sketch_dim``) at their exact-Gram choice; ``lr_grid`` and
  ``damping_trials`` keyed by those names, the same number of trials for each.
* ``fngd_gain``: the BLEU gain over AdamW that FNGD (arXiv 2403.03473) reports on Multi30k;
  the verdict's rule: ahead of AdamW by at least this much (beyond the seed noise floor of
  :func:`~experiments.studies.core.comparison`): the claim reproduces; ahead by less: its
  direction does, its size does not; level or behind: it does not.

Time to AdamW's BLEU, with one decoder throughout: every value compared is greedy val BLEU as
the training loop logs it (``config.dev_beam_size`` = 1), every ``eval_every`` steps and once
more after the last step (``dev/bleu_greedy``, :func:`training_curve`). The target is
AdamW's seed-mean greedy val BLEU after its last step; a variant's steps to it are the first
evaluation where its seed-mean greedy val BLEU reaches it, and its seconds those steps times
its step seconds (the fastest seed's, from runs that shared the machine: a ratio to AdamW's
is only shown when both ran on one machine kind). Beam search, which the table's val and test
BLEU use, scores differently from greedy decoding (usually higher): a beam target against
greedy points would be reached late or never, a greedy curve ending in a beam point would
jump at its end. Decoding every evaluation with beams would cost a beam search of val per
evaluation; the greedy decode after the last step costs one greedy pass per run.

``tables["summary"]``: test BLEU and chrF (mean and seed std, BLEU points) of every row, the
records of ``summary.json`` (:func:`summary_rows`).
"""

from __future__ import annotations

from pathlib import Path

from experiments.report import CHOSEN, DAMPING, LR, OPTIMIZER, SEEDS, get, pyplot, save_figure
from experiments.report import table as markdown_table
from experiments.studies import core
from experiments.studies.core import comparison, held_after_divergence, mean_curve
from experiments.tuning import (
    Context,
    choose,
    final,
    history_curve,
    mean_std,
    study_grids,
    table_rows,
)
from nearprox.text import data
from nearprox.training import translation_io

TITLE = "Translation from scratch (Multi30k en→de)"
BASELINE = "adamw"


def _first_step_at(curve: list[tuple[int, float]], target: float | None) -> int | None:
  if target is None:
    return None
  return next((int(s) for s, value in curve if value >= target - 1e-12), None)


def training_curve(result: dict, metric: str = "bleu") -> list[tuple[int, float]]:
  """(step, val ``metric``) of every evaluation with the decoder of the evaluations during
  training (``config.dev_beam_size``): those every ``eval_every`` steps, then the one after
  the last step (``dev/<metric>_greedy``). The final scores are that point only when the
  final decoder is the same (``beam_size`` = ``dev_beam_size``); otherwise they are left out."""
  config, last = result["config"], result["report"]["steps"]
  points = [(s, v) for s, v in history_curve(result, f"dev/{metric}") if s < last]
  if config["beam_size"] == config["dev_beam_size"]:
    points.append((last, final(result, "dev", metric)))
  else:
    decoder = translation_io.decoder_name(config["dev_beam_size"])
    points += [(s, v) for s, v in history_curve(result, f"dev/{metric}_{decoder}") if s == last]
  return held_after_divergence(result, sorted(dict(points).items()))


def _end_point(result: dict) -> float:
  """The greedy val BLEU after the last step (NaN: the run did not log it)."""
  return dict(training_curve(result)).get(result["report"]["steps"], float("nan"))


def summary_rows(row: dict, group, task) -> list[dict]:
  """summary.json records of a table row: test BLEU and test chrF (sacrebleu, beam search;
  mean and seed std in BLEU/chrF points, not fractions), the condition the direction and the
  Gram (exact or sketched)."""
  config = group.results[0]["config"]
  variant = row["variant"] + ("" if row["gram"] == "exact" else f", {row['gram']}")
  labelled = {**row, "variant": variant, "collapsed_seeds": None}  # no classes to collapse to
  return core.summary_rows(
      "translation",
      labelled,
      group,
      [("bleu", "test_bleu"), ("chrf", "test_chrf")],
      task=task.name,
      split="test",
      condition=f"{config['direction']}; Gram: {row['gram']}",
  )


def tuning_rows(ctx: Context, study) -> list[dict]:
  """Every trial of every variant on val (mean over the tuning seeds), the chosen one flagged."""
  rows = []
  for name in study.variants:
    variant = ctx.resolve(name)
    if variant is None:
      continue
    trials = ctx.trials(variant, study_grids(study, name, variant))
    found, complete = ctx.tune(variant, trials, tuning=study.tuning)
    rows += table_rows(found, trials, choose(found) if complete else None)
  return rows


def run(ctx: Context) -> dict:
  study = ctx.plan.get("translation")
  if not study:
    return {"tables": {"translation": [], "translation_tuning": [], "summary": []}}
  task = data.get_task(study.tuning.task)
  groups = []  # (gram, group)
  for name in study.variants:
    for gram in ("exact", "sketched") if name in study.sketched else ("exact",):
      extra = {"optimizer.sketch_dim": ctx.plan.sketch_dim} if gram == "sketched" else {}
      group = ctx.group("translation", task.name, name, extra=extra, study=study)
      if group is not None:
        groups.append((gram, group))
  rows, curves, summary = [], {}, []
  for gram, group in groups:
    greedy, greedy_std = mean_std([_end_point(r) for r in group.results])
    row = {
        "task": task.name,
        **group.describe(),
        "gram": gram if gram == "exact" else f"sketched, k = {ctx.plan.sketch_dim}",
        "seeds": len(group.results),
        **group.stats("test_bleu", "test", "bleu"),
        **group.stats("test_chrf", "test", "chrf"),
        **group.stats("dev_bleu", "dev", "bleu"),
        "dev_bleu_greedy": greedy,
        "dev_bleu_greedy_std": greedy_std,
        "step_seconds": group.step_seconds(),
    }
    curve = mean_curve([training_curve(r) for r in group.results])
    rows.append(row)
    summary += summary_rows(row, group, task)
    curves[row["variant"] + ("" if gram == "exact" else f", {row['gram']}")] = curve
  baseline = next((g for gram, g in groups if g.variant == BASELINE and gram == "exact"), None)
  comparisons = []
  if baseline is not None:
    base_row = rows[[g for _, g in groups].index(baseline)]
    base_curve = curves[base_row["variant"]]
    # AdamW's seed-mean greedy val BLEU after its last step (None: its runs did not log it).
    target = dict(base_curve).get(baseline.results[0]["config"]["num_train_steps"])
    for row, (_, group), curve in zip(rows, groups, curves.values(), strict=True):
      steps = _first_step_at(curve, target)
      ratio = group.step_ratio(baseline)
      row["target_dev_bleu"] = target
      row["steps_to_target"] = steps
      row["step_ratio"] = ratio
      row["seconds_to_target"] = None if steps is None else steps * row["step_seconds"]
      if group is not baseline:
        record = comparison(
            row,
            base_row,
            "test_bleu",
            study="translation",
            task=task.name,
            condition=f"{task.display_name} test BLEU"
            + ("" if row["gram"] == "exact" else f" ({row['gram']})"),
        )
        comparisons.append(record)
  verdict = fngd_verdict(ctx, study, comparisons)
  return {
      "tables": {
          "translation": rows,
          "translation_tuning": tuning_rows(ctx, study),
          "summary": summary,
      },
      "curves": curves,
      "comparisons": comparisons,
      "notes": [verdict] if verdict else [],
  }


def fngd_verdict(ctx: Context, study, comparisons: list[dict]) -> str | None:
  """The module docstring's rule for the exact-Gram proximal variant against AdamW."""
  best = ctx.resolve("best_proximal")
  record = next(
      (
          c
          for c in comparisons
          if c["subject"] == ctx.label(best or "") and "sketched" not in c["condition"]
      ),
      None,
  )
  if record is None:
    return None
  gain, difference = study.fngd_gain, record["difference"]
  if record["outcome"] == "ahead" and difference >= gain:
    outcome = "reproduces"
  elif record["outcome"] == "ahead":
    outcome = "reproduces in direction, not in size"
  else:
    outcome = "does not reproduce"
  return (
      f"FNGD's claim (+{gain:g} BLEU over AdamW on Multi30k) {outcome} here: "
      f"{record['subject']} − AdamW = {difference:+.1f} test BLEU ({record['outcome']})."
  )


def _bleu(key: str):
  """Mean ± seed std (``<key>_std``) in BLEU/chrF points (already 0–100, so not
  :func:`report.pct`), with its rule: no ± with one seed."""

  def cell(r):
    value = r.get(key)
    if value is None or value != value:
      return "—"
    return f"{value:.1f}" + (f" ± {r[f'{key}_std']:.1f}" if r["seeds"] > 1 else "")

  return cell


def markdown(study: dict) -> str:
  rows = study["tables"]["translation"]
  text = ""
  if rows:
    columns = [
        OPTIMIZER,
        LR,
        DAMPING,
        ("Gram", lambda r: r["gram"] if r["optimizer"].startswith("proximal") else "—"),
        SEEDS,
        ("test BLEU", _bleu("test_bleu")),
        ("test chrF", _bleu("test_chrf")),
        ("val BLEU", _bleu("dev_bleu")),
        ("val BLEU, greedy", _bleu("dev_bleu_greedy")),
        ("s/step (runs)", get("step_seconds")),
        ("× AdamW's step", get("step_ratio", lambda x: "—" if x != x else f"{x:.2f}")),
        ("steps to AdamW's greedy val BLEU", get("steps_to_target", _never)),
        ("seconds to it", get("seconds_to_target", lambda s: _never(s, "{:.0f}"))),
    ]
    target = rows[0].get("target_dev_bleu")
    text = markdown_table(rows, columns) + (
        "\n\nTest BLEU and chrF: sacrebleu on test_2016_flickr, beam search; val BLEU the "
        "same on val (the tuning split); greedy val BLEU: greedy decoding of val after the "
        "last step, the decoder of the evaluations during training. Steps to AdamW's greedy "
        "val BLEU"
        + ("" if target is None else f" ({target:.1f})")
        + ": the first evaluation where the seed-mean greedy val BLEU reaches AdamW's after "
        "its last step, greedy against greedy (beam search scores differently, so a beam "
        "target would not compare with the greedy curve); seconds: those steps × the fastest "
        "seed's step time (the runs shared the machine; ratios only within one machine kind)."
    )
    text += "\n\n![translation](PLOT:translation.png)"
  for note in study.get("notes", []):
    text += f"\n\n{note}"
  tuning = study["tables"].get("translation_tuning") or []
  if tuning:
    columns = [
        OPTIMIZER,
        LR,
        DAMPING,
        SEEDS,
        ("val BLEU (mean over seeds)", _bleu("score")),
        ("diverged seeds", get("diverged_seeds")),
        CHOSEN,
    ]
    text += (
        "\n\nTuning on val (every trial):\n\n"
        + markdown_table(tuning, columns)
        + "\n\nA diverged seed (a non-finite update; training stops there) counts with its "
        "diverged model's score, BLEU 0."
    )
  return text


def _never(value, fmt="{}") -> str:
  return "not reached" if value is None else fmt.format(value)


def plots(study: dict, out: Path) -> list[Path]:
  """Seed-mean greedy val BLEU (:func:`training_curve`) against training steps, one line per
  variant."""
  curves = {k: c for k, c in study["curves"].items() if c}
  if not curves:
    return []
  fig, ax = pyplot().subplots(figsize=(6, 4))
  for label, curve in curves.items():
    steps, values = zip(*curve)
    ax.plot(steps, values, marker=".", label=label)
  ax.set(
      xlabel="training step",
      ylabel="val BLEU (greedy)",
      title="Multi30k val BLEU during training (mean over seeds)",
  )
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out / "translation.png")
