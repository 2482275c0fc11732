"""The tuning protocol of experiments/tuning.py on synthetic run results (no training)."""

import ml_collections
import pytest

from experiments import tuning


class FakeStore:
  """Answers ``run`` with a result whose held-out/dev score is ``score(overrides)``."""

  def __init__(self, score, collapse=lambda overrides: False, missing=lambda overrides: False):
    self.score, self.collapse, self.missing = score, collapse, missing
    self.calls = []

  def run(self, label, overrides, devices=1, attack=None):
    self.calls.append(dict(overrides))
    if self.missing(overrides):
      return None
    split = "holdout" if overrides.get("holdout_examples") else "dev"
    counts = [10, 0] if self.collapse(overrides) else [6, 4]
    name = overrides.get("optimizer.name")
    optimizer = {"name": name, "damping": overrides.get("optimizer.damping", 0.1)}
    return {
        "config": {
            "task": overrides["task"],
            "seed": overrides["seed"],
            "num_train_steps": overrides.get("num_train_steps"),
            "optimizer": optimizer,
        },
        "report": {
            split: {"accuracy": self.score(overrides)},
            "predicted_classes": {split: counts},
            "train_step_seconds": 1.0,
        },
        "history": [{"step": 10, "train/loss": 1.0 - self.score(overrides)}],
    }


def plan(**lr_grid):
  plan = ml_collections.ConfigDict()
  plan.seeds = (0, 1, 2)
  plan.tuning = ml_collections.ConfigDict(
      {"task": "sst2", "steps": 5, "holdout_examples": 100, "seeds": (0, 1)}
  )
  plan.lr_grid = lr_grid
  plan.damping_trials = {v: (0.1, 1.0) for v in lr_grid if v.startswith("proximal")}
  return plan


def test_the_choice_is_the_best_mean_over_seeds_not_seed_0():
  # lr 0.1 wins on seed 0 by a little and loses on seed 1 by a lot.
  table = {(0.1, 0): 0.80, (0.1, 1): 0.60, (0.01, 0): 0.79, (0.01, 1): 0.78}
  score = lambda o: table[o["optimizer.learning_rate"], o["seed"]]
  ctx = tuning.Context(plan(adamw=(0.01, 0.1)), FakeStore(score))
  rows, complete = ctx.tuning("adamw")
  assert complete and [r["score"] for r in rows] == pytest.approx([0.785, 0.70])
  assert ctx.best_trial("adamw")["trial"] == {"optimizer.learning_rate": 0.01}
  # Tuning runs are scored on held-out training examples at the tuning budget.
  assert all(c["holdout_examples"] == 100 and c["num_train_steps"] == 5 for c in ctx.store.calls)


def test_a_collapsed_seed_ranks_a_trial_last_and_ties_go_to_the_lower_loss():
  score = lambda o: 0.9 if o["optimizer.learning_rate"] == 1.0 else 0.7
  collapse = lambda o: o["optimizer.learning_rate"] == 1.0 and o["seed"] == 1
  ctx = tuning.Context(plan(sgd=(0.1, 1.0)), FakeStore(score, collapse))
  assert ctx.best_trial("sgd")["trial"] == {"optimizer.learning_rate": 0.1}
  rows, _ = ctx.tuning("sgd")
  assert [r["collapsed_seeds"] for r in rows] == [0, 1]
  tied = tuning._rank({"collapsed_seeds": 0, "score": 0.5, "train_loss_end": 0.3})
  assert tied > tuning._rank({"collapsed_seeds": 0, "score": 0.5, "train_loss_end": 0.4})


def test_a_choice_at_an_edge_of_its_grid_is_named_in_the_tuning_table():
  # lr 0.3 (the grid's top) wins at λ = 0.1; λ = 0.1 is the damping grid's bottom.
  score = lambda o: o["optimizer.learning_rate"] - o["optimizer.damping"]
  ctx = tuning.Context(plan(proximal_ef=(0.01, 0.1, 0.3)), FakeStore(score))
  chosen = ctx.best_trial("proximal_ef")["trial"]
  edges = tuning.grid_edges(ctx.trials("proximal_ef"), chosen)
  assert edges == ["learning rate at the top", "damping at the bottom"]
  inside = {"optimizer.learning_rate": 0.1, "optimizer.damping": 1.0}
  assert tuning.grid_edges(ctx.trials("proximal_ef"), inside) == ["damping at the top"]
  assert (
      tuning.grid_edges([{"optimizer.learning_rate": 0.1}], {"optimizer.learning_rate": 0.1}) == []
  )

  from experiments import report

  rows = [
      {"variant": "EF", "chosen": True, "edges": ", ".join(edges)},
      {"variant": "SGD", "chosen": True, "edges": ""},
      {"variant": "SGD", "chosen": False, "edges": ""},
  ]
  assert report.chosen_mark(rows[0]) == "✓ (learning rate at the top, damping at the bottom)"
  assert [report.chosen_mark(r) for r in rows[1:]] == ["✓", ""]
  note = report.edge_note(rows)
  assert note.startswith("Chosen at an edge of its grid: EF (learning rate at the top, damping")
  assert "SGD" not in note and report.edge_note(rows[1:]) == ""


def test_a_win_over_a_side_tuned_at_an_edge_of_its_grid_carries_that_caveat():
  from experiments import report
  from experiments.studies import core

  # AdamW's best rate lies inside its grid; Muon's best is its grid's top.
  score = lambda o: {2e-4: 0.90, 1e-4: 0.85}.get(o["optimizer.learning_rate"], 0.80)
  ctx = tuning.Context(plan(adamw=(1e-4, 2e-4, 5e-4), muon=(5e-5, 1e-4)), FakeStore(score))
  adamw, muon = (ctx.group("optimizers", "sst2", v) for v in ("adamw", "muon"))
  assert (adamw.edges, muon.edges) == ((), ("learning rate at the top",))
  row = lambda g: {**g.describe(), "mean": g.stat("dev", "accuracy")[0], "std": 0.0}
  ahead = core.comparison(row(adamw), row(muon), "mean", "std")
  behind = core.comparison(row(muon), row(adamw), "mean", "std")
  caveat = f"{muon.label}'s learning rate at the top of its tuning grid"
  assert (ahead["outcome"], ahead["caveat"]) == ("ahead", caveat)
  assert (behind["outcome"], behind["caveat"]) == ("behind", caveat)  # the loser is the subject
  # No winner, or a loser tuned inside its grid: no caveat.
  level = core.comparison(row(adamw), {**row(muon), "mean": 0.895}, "mean", "std")
  assert (level["outcome"], level["caveat"]) == ("level", "")
  reverse = core.comparison({**row(muon), "mean": 0.95}, row(adamw), "mean", "std")
  assert (reverse["outcome"], reverse["caveat"]) == ("ahead", "")
  table = report.verdict_table([{**ahead, "study": "optimizers", "condition": "SST-2"}])
  assert f"| **ahead** ({caveat}) |" in table


def test_a_context_asks_the_store_for_each_tuning_run_once():
  """Aliases, labels and studies ask for the same tuning again and again within a pass; the
  store is read once per run, and a caller's changes to the rows stay its own."""
  store = FakeStore(lambda o: o["optimizer.learning_rate"])
  ctx = tuning.Context(plan(adamw=(0.01, 0.1), proximal_ef=(0.1, 0.3)), store)
  first = ctx.best_trial("adamw")
  calls = len(store.calls)
  assert calls == 4  # two trials × two seeds
  rows, _ = ctx.tuning("adamw")
  rows[0]["score"] = -1.0
  assert ctx.best_trial("adamw") == first and len(store.calls) == calls
  assert ctx.tuning("adamw")[0][0]["score"] != -1.0
  ctx.best_trial("proximal_ef")  # another variant: its own runs
  assert len(store.calls) == calls + 8


def test_proximal_trials_tune_learning_rate_and_damping_jointly():
  ctx = tuning.Context(plan(proximal_ef=(0.1, 0.3), adamw=(1e-4, 3e-4, 1e-3, 3e-3)), None)
  assert ctx.trials("proximal_ef") == [
      {"optimizer.learning_rate": lr, "optimizer.damping": d}
      for lr in (0.1, 0.3)
      for d in (0.1, 1.0)
  ]
  assert len(ctx.trials("adamw")) == len(ctx.trials("proximal_ef")) == 4


def test_derived_variants_wait_for_the_first_stage_and_build_on_the_best_filter():
  # iEF at lr 0.3, λ = 1 is the best first-stage trial; tikhonov is worse everywhere.
  def score(o):
    if o.get("optimizer.step_size") == "graft":
      return 0.95
    if o.get("optimizer.weighting") == "ief":
      return 0.9 if (o["optimizer.learning_rate"], o["optimizer.damping"]) == (0.3, 1.0) else 0.8
    return 0.7

  grid = {"proximal_tikhonov": (0.01,), "proximal_ief": (0.1, 0.3), "proximal_graft": (0.01,)}
  # While one iEF trial is missing, nothing downstream is decided.
  missing = lambda o: o.get("optimizer.weighting") == "ief" and o["optimizer.learning_rate"] == 0.3
  ctx = tuning.Context(plan(**grid), FakeStore(score, missing=missing))
  assert ctx.resolve("best_filter") is None and ctx.tuning("proximal_graft") == ([], False)
  assert ctx.group("optimizers", "sst2", "proximal_graft") is None

  ctx = tuning.Context(plan(**grid), FakeStore(score))
  assert ctx.resolve("best_filter") == "proximal_ief"
  assert ctx.overrides("proximal_graft") == {
      **tuning.VARIANTS["proximal_ief"],
      "optimizer.step_size": "graft",
  }
  assert (
      ctx.label("proximal_graft") == "proximal SGD, iEF (natural, iEF weights), grafted step size"
  )
  assert ctx.resolve("best_proximal") == "proximal_graft"
  # Reported runs: the chosen trial at the full budget, one per seed, no held-out split.
  group = ctx.group("optimizers", "tweets", "best_proximal")
  assert group.variant == "proximal_graft" and len(group.results) == 3
  final_calls = [c for c in ctx.store.calls if c["task"] == "tweets"]
  assert [c["seed"] for c in final_calls] == [0, 1, 2]
  assert all(
      "holdout_examples" not in c and c["optimizer.step_size"] == "graft" for c in final_calls
  )


def test_tuned_variants_train_their_first_task_before_the_second_stage_is_tuned():
  from experiments import studies

  class SecondStageStarted(Exception):
    pass

  class Store(FakeStore):
    requested, missing = [], {}

    def run(self, label, overrides, devices=1, attack=None):
      if overrides.get("optimizer.step_size") == "graft":
        raise SecondStageStarted
      return super().run(label, overrides, devices, attack)

  grid = {"adamw": (1e-4,), "proximal_ief": (0.1,), "proximal_graft": (0.01,)}
  study_plan = plan(**grid)
  study_plan.optimizer_variants = tuple(grid)
  study_plan.optimizer_tasks = ("sst2", "tweets")
  store = Store(lambda overrides: 0.8)
  with pytest.raises(SecondStageStarted):
    studies.REGISTRY["optimizers"].run(tuning.Context(study_plan, store))
  reported = [
      (c["optimizer.name"], c["seed"])
      for c in store.calls
      if "holdout_examples" not in c and c["task"] == "sst2"
  ]
  assert reported == [(name, s) for name in ("adamw", "proximal_sgd") for s in (0, 1, 2)]
