"""The translation study (experiments/studies/translation.py) on synthetic run records: its
own tuning protocol on val from the multi30k config (tuning runs load no test split), the
chosen trials at the declared budget, the sketched Gram at the exact Gram's choice, time to
AdamW's BLEU greedy against greedy, the summary.json records, and the FNGD verdict's rule."""

import ml_collections
import pytest

from experiments import runs, studies
from experiments.studies import core, translation
from tests.test_experiments import SyntheticStore, ablation_score, full_plan_context

BUDGET = {"num_train_steps": 300, "eval_every": 50, "batch_size": 64}


def _study(gain=24.0):
  return ml_collections.ConfigDict(
      {
          "tuning": {
              "task": "multi30k",
              "steps": 100,
              "holdout_examples": 0,
              "seeds": (0, 1),
              "split": "dev",
              "base": "multi30k",
              "settings": BUDGET,
          },
          "variants": ("adamw", "best_proximal", "sgd_momentum"),
          "sketched": ("best_proximal",),
          "lr_grid": {
              "adamw": (5e-4, 1e-3),
              "best_proximal": (1e-4, 3e-4),
              "sgd_momentum": (0.1, 0.3),
          },
          "damping_trials": {"best_proximal": (0.1, 1.0)},
          "fngd_gain": gain,
      }
  )


def bleu(overrides) -> float:
  """AdamW 30 at its best rate 1e-3; the proximal variant 33 at 3e-4 and λ = 1 (32.5 with the
  sketched Gram); SGD+momentum 20; other trials 5 lower; a seed adds 0.1."""
  name, lr = overrides["optimizer.name"], overrides["optimizer.learning_rate"]
  if name == "adamw":
    score = 30.0 if lr == 1e-3 else 25.0
  elif name == "proximal_adamw":
    best = lr == 3e-4 and overrides["optimizer.damping"] == 1.0
    score = (33.0 if best else 28.0) - (0.5 if overrides.get("optimizer.sketch_dim") else 0.0)
  else:
    score = 20.0
  return score + 0.1 * overrides["seed"]


GREEDY_GAP = 5.0  # greedy decoding scores this much below beam search here


class TranslationStore(SyntheticStore):
  """SST-2 runs as :class:`SyntheticStore`; runs from the multi30k config score BLEU (beam
  search) and chrF (BLEU + 20). Their greedy val BLEU, GREEDY_GAP below, is logged as the
  training loop does: ``dev/bleu`` every 50 steps, ``dev/bleu_greedy`` after the last step
  (where the beam-search ``dev/bleu`` is logged too), rising linearly to its final value at
  step 100 (AdamW: 300)."""

  def run(self, label, overrides, devices=1, attack=None, base=None):
    if base is None:
      return super().run(label, overrides, devices, attack)
    self.calls.append((label, dict(overrides), base))
    self.requested.append(len(self.requested))
    config = runs.apply_overrides(runs.base_config(base), overrides).to_dict()
    final, steps = bleu(overrides), config["num_train_steps"]
    reach = 300 if overrides["optimizer.name"] == "adamw" else 100
    greedy = lambda s: (final - GREEDY_GAP) * min(1.0, s / reach)
    scores = {"bleu": final, "chrf": final + 20}
    return {
        "config": config,
        "report": {"dev": scores, "test": scores, "steps": steps, "train_step_seconds": 2.0},
        "history": [{"step": s, "dev/bleu": greedy(s)} for s in range(50, steps, 50)]
        + [
            {"step": steps, "train/loss": 1.0, "dev/bleu_greedy": greedy(steps)},
            {"step": steps, "dev/bleu": final, "test/bleu": final},
        ],
        "attack": None,
        "machine": {"device_kind": "cpu"},
    }


def _context(tmp_path, gain=24.0):
  ctx = full_plan_context(tmp_path, ablation_score)
  ctx.store = TranslationStore(tmp_path, ablation_score)
  ctx.plan.translation = _study(gain)
  return ctx


def test_translation_tunes_on_val_and_reports_test_at_the_budget(tmp_path):
  ctx = _context(tmp_path)
  study = core.run_study("translation", translation, ctx)
  calls = {label: c for label, c, base in ctx.store.calls if base == "multi30k"}
  tuning = [c for label, c in calls.items() if label.startswith("tune:multi30k:")]
  reported = [c for label, c in calls.items() if label.startswith("translation:")]
  # Two seeds per trial: AdamW 2, iEF → AdamW 2 × 2, SGD+momentum 2 trials.
  assert len(tuning) == 2 * (2 + 4 + 2)
  assert {(c["num_train_steps"], c["holdout_examples"], c["task"]) for c in tuning} == {
      (100, 0, "multi30k")
  }
  assert {(c["num_train_steps"], c["eval_every"], c["batch_size"]) for c in reported} == {
      (300, 50, 64)
  }
  # Tuning runs score val and load no test split; reported runs load both (the default).
  assert all(c["eval_splits"] == ("dev",) for c in tuning)
  assert not any("eval_splits" in c for c in reported)
  rows = {(r["optimizer"], r["gram"]): r for r in study["tables"]["translation"]}
  assert set(rows) == {
      ("adamw", "exact"),
      ("proximal_adamw", "exact"),
      ("proximal_adamw", "sketched, k = 1024"),
      ("sgd", "exact"),
  }
  adamw, proximal = rows["adamw", "exact"], rows["proximal_adamw", "exact"]
  assert adamw["learning_rate"] == 1e-3 and adamw["seeds"] == 3
  assert adamw["test_bleu"] == pytest.approx(30.1) and adamw["test_bleu_std"] == pytest.approx(0.1)
  assert (proximal["learning_rate"], proximal["damping"]) == (3e-4, 1.0)
  sketched = rows["proximal_adamw", "sketched, k = 1024"]
  assert (sketched["learning_rate"], sketched["damping"]) == (3e-4, 1.0)  # the exact's choice
  assert sketched["test_bleu"] == pytest.approx(32.6)
  # Greedy against greedy: AdamW's greedy val BLEU after its last step is 25.1; the proximal
  # variant's greedy curve (28.1 from step 100 on) reaches it at step 100, AdamW's at 300.
  # (Against AdamW's beam-search 30.1 no greedy point of the proximal variant gets there; a
  # curve ending in its beam-search point would reach it at 300.)
  assert adamw["target_dev_bleu"] == pytest.approx(30.1 - GREEDY_GAP)
  assert adamw["dev_bleu_greedy"] == pytest.approx(25.1)
  assert adamw["dev_bleu"] == pytest.approx(30.1)
  assert adamw["steps_to_target"] == 300 and proximal["steps_to_target"] == 100
  assert sketched["steps_to_target"] == 100 and rows["sgd", "exact"]["steps_to_target"] is None
  assert proximal["seconds_to_target"] == pytest.approx(200.0)
  assert study["curves"]["AdamW"][-1] == (300, pytest.approx(25.1))
  outcomes = [(c["subject_mean"], c["condition"], c["outcome"]) for c in study["comparisons"]]
  assert [(round(m, 1), condition, outcome) for m, condition, outcome in outcomes] == [
      (33.1, "Multi30k test BLEU", "ahead"),
      (32.6, "Multi30k test BLEU (sketched, k = 1024)", "ahead"),
      (20.1, "Multi30k test BLEU", "behind"),
  ]
  [verdict] = study["notes"]
  assert "reproduces in direction, not in size" in verdict and "+3.0 test BLEU" in verdict
  text = translation.markdown(study)
  assert "| 30.1 ± 0.1 |" in text and "Tuning on val (every trial)" in text
  assert "| 25.1 ± 0.1 |" in text and "Steps to AdamW's greedy val BLEU (25.1)" in text
  assert translation.plots(study, tmp_path)
  chosen = [r for r in study["tables"]["translation_tuning"] if r["chosen"]]
  assert len(chosen) == 3 and {r["metric"] for r in chosen} == {"dev_bleu"}
  # Both grids are two points wide, so every choice sits at an edge: the tuning table says
  # which, and a win over AdamW (its rate at the top) carries that caveat.
  edges = {r["optimizer"]: r["edges"] for r in chosen}
  assert edges["adamw"] == "learning rate at the top"
  assert edges["proximal_adamw"] == "learning rate at the top, damping at the top"
  assert "| ✓ (learning rate at the top, damping at the top) |" in text
  caveat = "AdamW's learning rate at the top of its tuning grid"
  assert [c["caveat"] for c in study["comparisons"][:2]] == [caveat, caveat]


def test_fngd_verdict_rule(tmp_path):
  [verdict] = core.run_study("translation", translation, _context(tmp_path, gain=2.0))["notes"]
  assert "claim (+2 BLEU over AdamW on Multi30k) reproduces here" in verdict


def test_no_declaration_no_runs(tmp_path):
  ctx = full_plan_context(tmp_path, ablation_score)
  del ctx.plan["translation"]
  study = core.run_study("translation", studies.REGISTRY["translation"], ctx)
  assert study["tables"]["translation"] == [] and study["requested"] == 0


def test_the_full_plan_tunes_every_optimizer_with_six_trials_on_val(tmp_path):
  """The declaration in configs/full.py: six trials per optimizer (the protocol's number),
  two seeds each, at a third of the budget, every run from the multi30k config."""
  ctx = full_plan_context(tmp_path, ablation_score)
  ctx.store = TranslationStore(tmp_path, ablation_score)
  study = ctx.plan.translation
  assert study.tuning.split == "dev" and study.tuning.holdout_examples == 0
  assert study.tuning.steps * 3 == study.tuning.settings.num_train_steps + 1
  core.run_study("translation", studies.REGISTRY["translation"], ctx)
  calls = [(label, c) for label, c, base in ctx.store.calls if base == "multi30k"]
  tuning = [(label, c) for label, c in calls if label.startswith("tune:")]
  assert {c["num_train_steps"] for label, c in calls if label.startswith("translation:")} == {
      study.tuning.settings.num_train_steps
  }
  per_variant = {}
  for label, c in tuning:
    assert label.startswith("tune:multi30k:") and c["num_train_steps"] == study.tuning.steps
    assert c["task"] == "multi30k" and c["holdout_examples"] == 0
    per_variant.setdefault(label.split(":")[2], set()).add(label.rsplit(":seed=", 1)[0])
  assert {v: len(t) for v, t in per_variant.items()} == {
      "adamw": 6,
      "proximal_adamw": 6,
      "sgd_momentum": 6,
      "muon": 6,
  }
  assert len({label for label, _ in tuning}) == 2 * 4 * 6  # two seeds of each trial


def test_summary_records_test_bleu_and_chrf_of_every_row(tmp_path):
  """What experiments/reproduce.py writes to summary.json: the SUMMARY_FIELDS of each record
  of tables["summary"], two per table row (test BLEU and chrF, mean and seed std)."""
  study = core.run_study("translation", translation, _context(tmp_path))
  summary = study["tables"]["summary"]
  rows = study["tables"]["translation"]
  assert len(summary) == 2 * len(rows) == 8
  records = [{k: r[k] for k in core.SUMMARY_FIELDS} for r in summary]  # as reproduce does
  assert all(tuple(r) == core.SUMMARY_FIELDS for r in summary)
  by = {(r["variant"], r["metric"]): r for r in records}
  adamw_bleu, adamw_chrf = by["AdamW", "bleu"], by["AdamW", "chrf"]
  assert adamw_bleu["mean"] == pytest.approx(30.1) and adamw_bleu["std"] == pytest.approx(0.1)
  assert adamw_chrf["mean"] == pytest.approx(50.1)
  assert {r["task"] for r in records} == {"multi30k"} and {r["split"] for r in records} == {"test"}
  assert (adamw_bleu["seeds"], adamw_bleu["steps"], adamw_bleu["batch_size"]) == (3, 300, 64)
  assert adamw_bleu["learning_rate"] == 1e-3 and adamw_bleu["damping"] is None
  assert adamw_bleu["collapsed_seeds"] is None and adamw_bleu["max_length"] == 48
  sketched = [r for r in summary if "sketched" in r["variant"]]
  assert len(sketched) == 2 and sketched[0]["mean"] == pytest.approx(32.6)
  assert sketched[0]["optimizer"] == "proximal_adamw" and sketched[0]["damping"] == 1.0
  assert {r["study"] for r in summary} == {"translation"}
  assert {r["condition"] for r in summary} == {
      "en-de; Gram: exact",
      "en-de; Gram: sketched, k = 1024",
  }


def test_a_one_seed_score_has_no_seed_spread():
  """A trial with one seed so far shows its score alone, not "± 0.0" (report.pct's rule)."""
  cell = translation._bleu("score")
  assert cell({"score": 17.651, "score_std": 0.0, "seeds": 1}) == "17.7"
  assert cell({"score": 9.57, "score_std": 0.31, "seeds": 2}) == "9.6 ± 0.3"
  assert cell({"score": float("nan"), "score_std": 0.0, "seeds": 2}) == "—"


def test_a_diverged_seed_counts_with_its_score_and_is_flagged(tmp_path):
  """A seed that diverged is scored as its diverged model (BLEU 0), not dropped from the
  trial's mean, and the tuning table says how many seeds diverged; older records, from
  before training stopped at a non-finite update, are known by their non-finite loss."""

  class DivergingStore(TranslationStore):

    def run(self, label, overrides, devices=1, attack=None, base=None):
      result = super().run(label, overrides, devices, attack, base)
      if (
          base
          and overrides["optimizer.name"] == "sgd"
          and overrides["optimizer.learning_rate"] == 0.3
      ):
        result["report"]["dev"] = {"bleu": 0.0, "chrf": 0.0}
        if overrides["seed"] == 0:
          result["report"]["diverged_at_step"] = 40
        else:
          result["history"][-2]["train/loss"] = float("nan")
      return result

  ctx = _context(tmp_path)
  ctx.store = DivergingStore(tmp_path, ablation_score)
  study = core.run_study("translation", translation, ctx)
  sgd = {
      r["learning_rate"]: r
      for r in study["tables"]["translation_tuning"]
      if r["optimizer"] == "sgd"
  }
  assert (sgd[0.3]["score"], sgd[0.3]["diverged_seeds"]) == (0.0, 2)
  assert sgd[0.1]["diverged_seeds"] == 0 and sgd[0.1]["chosen"]
  text = translation.markdown(study)
  assert "| 0.0 ± 0.0 | 2 |  |" in text and "diverged seeds" in text
