"""The translation study (experiments/studies/translation.py) on synthetic run records: its
own tuning protocol on val from the multi30k config, the chosen trials at the declared
budget, the sketched Gram at the exact Gram's choice, and the FNGD verdict's rule."""

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


class TranslationStore(SyntheticStore):
  """SST-2 runs as :class:`SyntheticStore`; runs from the multi30k config score BLEU and chrF
  (BLEU + 20), with a val curve reaching its final value at step 100 (AdamW: 300)."""

  def run(self, label, overrides, devices=1, attack=None, base=None):
    if base is None:
      return super().run(label, overrides, devices, attack)
    self.calls.append((label, dict(overrides), base))
    self.requested.append(len(self.requested))
    config = runs.apply_overrides(runs.base_config(base), overrides).to_dict()
    final, steps = bleu(overrides), config["num_train_steps"]
    reach = 300 if overrides["optimizer.name"] == "adamw" else 100
    curve = [(s, final * min(1.0, s / reach)) for s in range(50, steps, 50)]
    scores = {"bleu": final, "chrf": final + 20}
    return {
        "config": config,
        "report": {"dev": scores, "test": scores, "steps": steps, "train_step_seconds": 2.0},
        "history": [{"step": s, "dev/bleu": v} for s, v in curve]
        + [{"step": steps, "train/loss": 1.0}],
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
  # Val BLEU reaches AdamW's final 30.1 at step 100 for the proximal variant, 300 for AdamW.
  assert adamw["steps_to_target"] == 300 and proximal["steps_to_target"] == 100
  assert proximal["seconds_to_target"] == pytest.approx(200.0)
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
  assert translation.plots(study, tmp_path)
  chosen = [r for r in study["tables"]["translation_tuning"] if r["chosen"]]
  assert len(chosen) == 3 and {r["metric"] for r in chosen} == {"dev_bleu"}


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
