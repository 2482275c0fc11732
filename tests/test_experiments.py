"""The experiments package: the reproduce pipeline (smoke mode), the default job, the verdict.

The smoke test runs ``python -m experiments.reproduce --mode=smoke`` (tiny model, 3 steps,
one seed, three studies) and checks that the run files, CSV tables, summary records, plots
and the generated README section are produced, that the README's numbers are the run files'
numbers (nothing typed in), that ``--config.*`` / ``--plan.*`` overrides reach the runs, and
that a second invocation resumes from the stored runs instead of training again.
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from experiments import default_job, report, run_process, runs, studies, tuning, verdict
from nearprox.text import data
from tests.squad_people import write_squad

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("NEARPROX_GLUE_DIR", REPO / ".." / "shared" / "data" / "glue"))


def run_module(module: str, *flags: str) -> str:
  completed = subprocess.run(
      [sys.executable, "-m", module, *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, "XLA_FLAGS": ""},
  )
  assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
  return completed.stdout


def reproduce(tmp_path, *extra, only="optimizers,damping,adversarial"):
  return run_module(
      "experiments.reproduce",
      "--mode=smoke",
      f"--only={only}",
      f"--out={tmp_path / 'results'}",
      f"--readme={tmp_path / 'README_results.md'}",
      f"--workdir={tmp_path / 'work'}",
      f"--link_root={tmp_path}",
      f"--data_dir={GLUE}",
      "--config.eval_batch_size=16",
      "--plan.damping_grid=1.0",
      *extra,
  )


@pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").exists(),
    reason="needs the GLUE SST-2 TSVs (NEARPROX_GLUE_DIR)",
)
def test_smoke_pipeline_produces_tables_from_run_files(tmp_path):
  log = reproduce(tmp_path)
  out = tmp_path / "results" / "smoke"
  stored = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
  # One tuning trial each for sgd and proximal tikhonov (λ = 0.1) on held-out training
  # examples, their reported runs, tikhonov at λ = 1 (the plan override), then the clean and
  # FGM objectives with an attack evaluation.
  assert len(stored) == 7
  assert log.count("[run]") == 7 and "[failed]" not in log
  tuned = [r for r in stored if r["config"]["holdout_examples"]]
  assert len(tuned) == 2 and all(set(r["report"]) >= {"holdout"} for r in tuned)
  for result in stored:
    assert result["report"]["steps"] == 3
    assert result["config"]["eval_batch_size"] == 16  # the --config override
    assert result["history"], "metrics.jsonl rows are kept in the run file"
    assert 0 < result["cpu_seconds"] and 0 < result["wall_seconds"]
    # Predicted classes of the evaluated examples: smoke's 16 held-out training examples in
    # the tuning runs (which never load dev), its 32 dev examples otherwise.
    counts = result["report"]["predicted_classes"]
    assert {k: sum(v) for k, v in counts.items()} == (
        {"holdout": 16} if result in tuned else {"dev": 32}
    )
  for name in (
      "optimizers_summary.csv",
      "optimizers_tuning.csv",
      "damping_damping.csv",
      "optimizers_sst2.png",
      "damping.png",
      "optimizers.json",
      "damping.json",
      "summary.json",
  ):
    assert (out / name).stat().st_size > 0, name

  summary = json.loads((out / "summary.json").read_text())
  assert [list(r) for r in summary] == [list(studies.SUMMARY_FIELDS)] * 2
  by_optimizer = {r["optimizer"]: r for r in summary}
  assert set(by_optimizer) == {"sgd", "proximal_sgd"}
  prox, sgd = by_optimizer["proximal_sgd"], by_optimizer["sgd"]
  assert prox["variant"] == "proximal SGD, tikhonov" and prox["damping"] == 0.1
  assert sgd["damping"] is None and sgd["split"] == "dev" and sgd["metric"] == "accuracy"
  assert (prox["steps"], prox["batch_size"], prox["max_length"], prox["seeds"]) == (3, 8, 16, 1)
  runs_by_name = {
      r["config"]["optimizer"]["name"]: r
      for r in stored
      if r["config"]["optimizer"]["damping"] == 0.1
      and not r["config"]["holdout_examples"]
      and r["attack"] is None
  }
  for name, record in by_optimizer.items():
    result = runs_by_name[name]
    assert record["mean"] == pytest.approx(result["report"]["dev"]["accuracy"])
    assert record["learning_rate"] == result["config"]["optimizer"]["learning_rate"]
    one_class = sum(c > 0 for c in result["report"]["predicted_classes"]["dev"]) == 1
    assert record["collapsed_seeds"] == int(one_class)
  # The majority-class reference: SST-2's most frequent training label on the dev examples
  # seed 0's runs are scored on, and per row the seeds that score no higher.
  train_labels = data.load_task("sst2", "train", GLUE).labels
  dev_labels = data.load_task("sst2", "dev", GLUE).labels
  config = runs_by_name["sgd"]["config"]
  keep = data.eval_subset(len(dev_labels), config["max_eval_examples"], config["seed"])
  majority = np.mean(dev_labels[keep] == np.argmax(np.bincount(train_labels)))
  optimizers_study = json.loads((out / "optimizers.json").read_text())
  [floor] = optimizers_study["tables"]["majority"]
  assert (floor["task"], floor["split"], floor["seeds"]) == ("sst2", "dev", 1)
  assert floor["mean"] == pytest.approx(majority)
  for row in optimizers_study["tables"]["summary"]:
    scored = runs_by_name[row["optimizer"]]["report"]["dev"]["accuracy"]
    assert row["not_above_majority_seeds"] == int(scored <= majority + 1e-9)
  with open(out / "damping_damping.csv") as f:
    damping = {float(r["damping"]): r for r in csv.DictReader(f)}
  assert set(damping) == {1.0}  # --plan.damping_grid
  assert 1.0 <= float(damping[1.0]["effective_rank_mean"]) <= 8.0  # B = 8
  with open(out / "adversarial_adversarial.csv") as f:
    adversarial = {r["objective"]: r for r in csv.DictReader(f)}
  # The plan's training perturbation (configs/quick.py, inherited by smoke) reaches the run.
  assert float(adversarial["fgm"]["train_epsilon"]) == 0.1
  fgm_run = next(r for r in stored if r["config"]["objective"]["kind"] == "fgm")
  assert fgm_run["config"]["objective"]["epsilon"] == 0.1
  assert [row["epsilon"] for row in fgm_run["attack"]] == [0.0, 1.0]
  comparisons = json.loads((out / "optimizers.json").read_text())["comparisons"]
  assert [(c["subject"], c["baseline"]) for c in comparisons] == [("proximal SGD, tikhonov", "SGD")]

  readme = (tmp_path / "README_results.md").read_text()
  assert f"| {tuning.DISPLAY['majority']} | — | — | 1 | {100 * majority:.1f} |" in readme
  assert "(mode **smoke**" in readme and "python -m experiments.reproduce --mode=smoke" in readme
  assert readme.count("**not run**") == 5  # multidevice, glue, noise, sketch, squad
  cpu_minutes = sum(r["cpu_seconds"] for r in stored) / 60
  assert f"the 7 runs that record their CPU time used {cpu_minutes:.1f} CPU-min" in readme
  accuracy = 100 * sgd["mean"]
  assert f"| SGD | 0.01 | — | 1 | {accuracy:.1f} |" in readme
  tuning_rows = list(csv.DictReader(open(out / "optimizers_tuning.csv")))
  assert [(r["variant"], r["chosen"]) for r in tuning_rows] == [
      ("SGD", "True"),
      ("proximal SGD, tikhonov", "True"),
  ]
  assert f"{runs_by_name['sgd']['report']['train_step_seconds']:.3g}" in readme
  assert "results/smoke/optimizers_sst2.png" in readme
  assert f"it is {verdict.WORDS[comparisons[0]['outcome']]} SGD" in readme

  # Resume: everything is stored, so nothing trains and the tables are unchanged.
  again = reproduce(tmp_path, "--report_only")
  assert "[run]" not in again
  assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").exists(),
    reason="needs the GLUE SST-2 TSVs (NEARPROX_GLUE_DIR)",
)
def test_sketch_and_squad_studies_compare_from_run_files(tmp_path):
  """Studies 7 and 8: the tuned proximal variant with the sketched and the exact Gram on
  SST-2, and SQuAD (a tiny corpus) with the plan's QA optimizers at their SST-2 settings."""
  squad_dir = write_squad(tmp_path / "squad")
  # With a deadline the runs train in a worker process, which the invocation would stop then.
  log = reproduce(tmp_path, f"--squad_dir={squad_dir}", "--stop_after=60", only="sketch,squad")
  assert "[failed]" not in log
  assert (tmp_path / "work" / "smoke" / "worker_README.md").exists()
  out = tmp_path / "results" / "smoke"
  stored = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
  # Two tuning runs (sgd, tikhonov), the exact and the sketched SST-2 run, the sketched
  # run at the tuning budget (its exact twin is the tikhonov tuning run), two SQuAD runs.
  assert len(stored) == 7 and log.count("[run]") == 7
  sketched = [r for r in stored if r["config"]["optimizer"].get("sketch_dim")]
  assert [r["config"]["optimizer"]["sketch_dim"] for r in sketched] == [64, 64]
  sketched = sorted(sketched, key=lambda r: r["config"]["holdout_examples"])
  qa = [r for r in stored if r["config"]["task"] == "squad"]
  assert sorted(r["config"]["optimizer"]["name"] for r in qa) == ["proximal_sgd", "sgd"]
  for result in qa:
    config = result["config"]
    assert (config["max_length"], config["doc_stride"], config["max_question_length"]) == (
        48,
        16,
        16,
    )
    assert set(result["report"]["dev"]) >= {"f1", "exact_match"}

  sketch = json.loads((out / "sketch.json").read_text())
  rows = {r["gram"]: r for r in sketch["tables"]["sketch"]}
  assert rows["sketched"]["sketch_dim"] == 64 and rows["exact"]["sketch_dim"] is None
  assert rows["sketched"]["dev_accuracy"] == sketched[0]["report"]["dev"]["accuracy"]
  record, check = sketch["comparisons"]
  assert (record["subject"], record["baseline"]) == ("the sketched Gram (k = 64)", "the exact Gram")
  assert check["budget"] == "tuning"
  at_tuning = {r["gram"]: r for r in sketch["tables"]["sketch_tuning_budget"]}
  tuned = next(r for r in stored if r["label"].startswith("tune:proximal_tikhonov"))
  assert at_tuning["exact"]["holdout_accuracy"] == tuned["report"]["holdout"]["accuracy"]
  assert at_tuning["sketched"]["holdout_accuracy"] == sketched[1]["report"]["holdout"]["accuracy"]
  assert check["subject_mean"] == at_tuning["sketched"]["holdout_accuracy"]
  squad = json.loads((out / "squad.json").read_text())
  by_optimizer = {r["optimizer"]: r for r in squad["tables"]["squad"]}
  for result in qa:
    row = by_optimizer[result["config"]["optimizer"]["name"]]
    assert row["f1"] == result["report"]["dev"]["f1"]
    assert row["exact_match"] == result["report"]["dev"]["exact_match"]
  (record,) = squad["comparisons"]
  assert (record["subject"], record["baseline"]) == ("proximal SGD, tikhonov", "SGD")

  readme = (tmp_path / "README_results.md").read_text()
  assert "Sketched vs exact Gram" in readme and "sketched, k = 64" in readme
  assert "held-out SST-2 training accuracy at the tuning budget (3 steps)" in readme
  f1 = 100 * by_optimizer["sgd"]["f1"]
  assert f"| SGD | 0.01 | — | 1 | {f1:.1f} |" in readme
  assert "On SQuAD's held-out articles, proximal SGD, tikhonov reaches held-out F1" in readme
  assert "× exact step (timed apart)" in readme and "in these runs, which shared" in readme

  # With bench_optimizers' record, the sketch's cost is its sketched/exact step time ratio.
  from experiments.configs import smoke

  timed = {"proximal_tikhonov": 2.0, f"proximal_tikhonov{studies.SKETCHED}": 0.5}
  record = {"rows": [{"variant": v, "step_seconds": s} for v, s in timed.items()]}
  run_process.write_json(out / studies.STEP_COST_FILE, record)
  config = smoke.get_config()
  config.eval_batch_size = 16  # as reproduce() ran it: the runs' keys hash their config
  executor = runs.Executor(config, out, tmp_path / "work" / "smoke", allow_new=False)
  sketch = studies.FUNCTIONS["sketch"](tuning.Context(smoke.get_plan(), executor))
  assert not sketch["missing"]
  for name in ("sketch", "sketch_tuning_budget"):
    rows = {r["gram"]: r for r in sketch["tables"][name]}
    assert rows["sketched"]["timed_step_ratio"] == 0.25 and "timed_step_ratio" not in rows["exact"]
  sentences = verdict.sketch(sketch)
  assert len(sentences) == 2
  assert all("at 0.25× its step time (both steps timed in one process" in s for s in sentences)


def test_default_job_trains_both_optimizers_and_reports(tmp_path):
  """`python -m experiments.default_job` (what `bash run.sh` runs) on the tiny model."""
  log = run_module(
      "experiments.default_job",
      f"--workdir={tmp_path}",
      "--config.model.name=tiny",
      "--config.num_train_steps=2",
      "--config.eval_every=1",
      "--config.batch_size=8",
      "--config.max_length=16",
      "--config.max_eval_examples=16",
      "--config.export_hf=False",
      "--config.parallel=jit",
  )
  summary = json.loads((tmp_path / "summary.json").read_text())
  # The study's choices once its tuning is complete, the default settings before.
  optimizers = [r["optimizer"] for r in summary.values()]
  assert optimizers[0].startswith("proximal") and optimizers[1:] == ["adamw", "sgd"]
  assert "Settings: " in log
  assert all(r["steps"] == 2 and r["objective"] == "fgm" for r in summary.values())
  sgd = list(summary.values())[2]
  assert "=== report ===" in log and f"{sgd['dev']['accuracy']:16.4f}" in log
  assert (tmp_path / "comparison.png").stat().st_size > 0


def test_default_job_report_keeps_its_columns_aligned_with_long_labels(tmp_path):
  """Labels longer than a column are listed above the table, which numbers its columns."""
  labels = ["proximal SGD, iEF (natural, iEF weights) → AdamW (tuned)", "AdamW (tuned)", "SGD"]
  reports = {
      label: {"dev": {"accuracy": 0.5 + i / 10}, "train_step_seconds": 1.0, "hf_model": None}
      for i, label in enumerate(labels)
  }
  lines = default_job.report_lines(reports, {label: tmp_path for label in labels})
  assert lines[1:4] == [f"({i}) {label}" for i, label in enumerate(labels, 1)]
  table = lines[5:8]
  assert table[0].split() == ["(1)", "(2)", "(3)"] and len({len(row) for row in table}) == 1
  assert table[1].split()[-3:] == ["0.5000", "0.6000", "0.7000"]


def test_default_job_takes_every_optimizer_at_the_study_s_choice(monkeypatch):
  """Once the tuning has decided, all three runs (SGD+momentum included) use its trials."""
  from experiments import tuning

  chosen = {"proximal_ief": 0.1, "adamw": 2e-4, "sgd_momentum": 1e-2}
  monkeypatch.setattr(
      tuning.Context,
      "resolve",
      lambda self, name: "proximal_ief" if name == "best_proximal" else name,
  )
  monkeypatch.setattr(
      tuning.Context,
      "best_trial",
      lambda self, variant: {"trial": {"optimizer.learning_rate": chosen[variant]}},
  )
  choices, tuned = default_job.study_choices()
  assert tuned and [label for label, _ in choices] == [
      "proximal SGD, iEF (natural, iEF weights) (tuned)",
      "AdamW (tuned)",
      "SGD+momentum (tuned)",
  ]
  for (_, overrides), variant in zip(choices, chosen):
    assert overrides == {**tuning.VARIANTS[variant], "optimizer.learning_rate": chosen[variant]}


def test_overrides_name_an_unknown_field():
  config = ml_collections.ConfigDict({"seed": 0, "optimizer": {"name": "sgd"}})
  assert runs.apply_overrides(config, {"optimizer.name": "adamw"}).optimizer.name == "adamw"
  assert config.optimizer.name == "sgd"  # a copy
  for key in ("optimizer.nmae", "sede", "model.name"):
    with pytest.raises(ValueError, match=f"override '{key}'"):
      runs.apply_overrides(config, {key: 1})


@pytest.mark.skipif(
    not (GLUE / "MRPC" / "dev.tsv").exists(), reason="needs the GLUE MRPC TSVs (NEARPROX_GLUE_DIR)"
)
def test_majority_class_row_scores_the_constant_prediction(tmp_path, monkeypatch):
  monkeypatch.setenv("NEARPROX_GLUE_DIR", str(GLUE))
  config = ml_collections.ConfigDict({"data_dir": None, "source": None, "max_eval_examples": 0})
  plan = ml_collections.ConfigDict({"seeds": (0, 1)})
  ctx = tuning.Context(plan, runs.Executor(config, tmp_path, tmp_path, allow_new=False))
  row = studies.majority_class_row(ctx, "mrpc", 64)
  # MRPC dev: 279 of 408 pairs are paraphrases, the training majority class too, so the
  # constant prediction has accuracy p = 279/408 and F1 2p/(1+p) on every seed.
  p = 279 / 408
  assert row["accuracy"] == pytest.approx(p) and row["accuracy_std"] == 0.0
  assert row["f1"] == pytest.approx(2 * p / (1 + p))
  assert row["variant"] == tuning.DISPLAY["majority"] and row["seeds"] == 2
  config.max_eval_examples = 100  # each seed's subset, as the runs evaluate it
  subset = studies.majority_class_row(ctx, "mrpc", 64)
  assert subset["accuracy"] != pytest.approx(p) and subset["accuracy_std"] > 0


def _glue_study(adamw_f1: float) -> dict:
  """A glue study dict as :func:`studies.glue` builds it, for MRPC rows with given scores."""

  def row(optimizer, label, f1, learned=True):
    return {
        "task": "mrpc",
        "optimizer": optimizer,
        "variant": label,
        "seeds": 3,
        "f1": f1,
        "f1_std": 0.0,
        "accuracy": f1,
        "accuracy_std": 0.0,
        "same_as_majority": not learned,
    }

  majority = {**row(None, tuning.DISPLAY["majority"], 0.812), "same_as_majority": False}
  prox = row("proximal_sgd", "proximal SGD, tikhonov", 0.812, learned=False)
  adamw = row("adamw", "AdamW", adamw_f1, learned=adamw_f1 != 0.812)
  counted = adamw_f1 != 0.812
  record = studies.comparison(prox, adamw, "f1", "f1_std", study="glue", counted=counted)
  tables = {"glue": [adamw, prox, majority]}
  return {"name": "glue", "tables": tables, "comparisons": [record]}


def test_verdict_tallies_the_comparison_records_not_its_text():
  learned = verdict.verdict({"glue": _glue_study(adamw_f1=0.85)})
  assert "behind AdamW (85.0 ± 0.0%; -3.80 points)" in learned
  assert "behind in 1 of the 1 comparisons" in learned
  # Both score exactly the majority class: no comparison is drawn or counted.
  trivial = verdict.verdict({"glue": _glue_study(adamw_f1=0.812)})
  assert "AdamW and proximal SGD, tikhonov score exactly what" in trivial
  assert "so it is not compared with AdamW" in trivial
  assert "In short" not in trivial


def _mrpc_optimizer_study(adamw_seeds_at_majority: int, tikhonov_seeds: int = 3) -> dict:
  """An optimizers study dict as :func:`studies.optimizers` builds it, for MRPC alone."""

  def row(optimizer, label, mean, at_majority, best_proximal=False, seeds=3):
    return {
        **dict.fromkeys(studies.SUMMARY_FIELDS),
        "task": "mrpc",
        "optimizer": optimizer,
        "variant": label,
        "steps": 600,
        "seeds": seeds,
        "learning_rate": 1e-4,
        "metric": "f1",
        "split": "dev",
        "mean": mean,
        "std": 0.02,
        "collapsed_seeds": 0,
        "not_above_majority_seeds": at_majority,
        "dev_accuracy": mean - 0.05,
        "target": 0.8,
        "reached": 3,
        "steps_to_target": 120.0,
        "best_proximal": best_proximal,
        "step_seconds": None,
        "step_ratio_to_sgd": None,
    }

  adamw = row("adamw", "AdamW", 0.837, adamw_seeds_at_majority)
  prox = row("proximal_adamw", "iEF → AdamW", 0.856, 0, best_proximal=True)
  tikhonov = row("proximal_tikhonov", "tikhonov", 0.861, 0, seeds=tikhonov_seeds)
  floor = {"task": "mrpc", "optimizer": None, "variant": tuning.DISPLAY["majority"]}
  floor |= {"seeds": 3, "split": "dev", "metric": "f1", "mean": 0.812, "std": 0.0}
  floor["dev_accuracy"] = 0.684
  context = {"study": "optimizers", "task": "mrpc"}
  chosen = studies.comparison(prox, adamw, "mean", "std", **context)
  other = studies.comparison(tikhonov, adamw, "mean", "std", **context)
  tables = {"summary": [adamw, prox, tikhonov], "majority": [floor]}
  comparisons = [{**chosen, "preselected": True}, {**other, "preselected": False}]
  return {"name": "optimizers", "tables": tables, "comparisons": comparisons}


def test_optimizer_table_and_verdict_show_the_majority_class_floor():
  study = _mrpc_optimizer_study(adamw_seeds_at_majority=1)
  markdown = report.md_optimizers(study)
  floor_row = f"| {tuning.DISPLAY['majority']} | — | — | 3 | 81.2 ± 0.0 | 68.4 | — | — | — |"
  assert floor_row in markdown
  assert "| AdamW | 0.0001 | — | 3 | 83.7 ± 2.0 | 78.7 | 0 | 1 | 120 |" in markdown
  [text, _] = verdict.optimizers(study)
  assert (
      "Seeds whose f1 is no higher than always predicting the majority class (81.2%): "
      "1 of 3 AdamW seeds." in text
  )
  assert "The other proximal variants against AdamW: tikhonov level (+2.40)." in text
  assert "Best overall: tikhonov (86.1%)." in text
  assert "scores 85.6 ± 2.0%; it is level with AdamW (83.7 ± 2.0%; +1.90 points)" in text
  assert "None of the 9 runs predicts a single class on the dev split." in text
  study["tables"]["summary"][2]["collapsed_seeds"] = 2
  [text, _] = verdict.optimizers(study)
  assert "Seeds predicting a single class on the dev split: 2 of 3 tikhonov seeds." in text
  [text, _] = verdict.optimizers(_mrpc_optimizer_study(adamw_seeds_at_majority=0))
  assert "majority class" not in text


def test_the_verdict_names_variants_whose_seeds_have_not_all_landed():
  [text, _] = verdict.optimizers(_mrpc_optimizer_study(0, tikhonov_seeds=2))
  assert "against AdamW: tikhonov level (+2.40, 2 of 3 seeds so far)." in text
  assert "Best overall: tikhonov (86.1%, 2 of 3 seeds so far)." in text


def test_the_adversarial_verdict_names_objectives_whose_seeds_have_not_all_landed():
  def row(variant, objective, seeds, robust, flat=False, step_ratio=2.0):
    accuracies = {
        "acc_eps_0": 0.88,
        "acc_eps_0.05": 0.8,
        "acc_eps_0.1": robust,
        "acc_eps_0.5": 0.01,
    }
    return {
        "variant": variant,
        "objective": objective,
        "seeds": seeds,
        "dev_accuracy": 0.88,
        "step_ratio_to_clean": step_ratio,
        "flat_under_attack": flat,
        **accuracies,
    }

  rows = [
      row("AdamW", "clean", 3, 0.6),
      row("AdamW", "fgm", 2, 0.7),
      row("AdamW", "pgd", 1, 0.5, flat=True),
      row("iEF → AdamW", "clean", 3, 0.6),
      row("iEF → AdamW", "fgm", 3, 0.75, step_ratio=math.nan),  # trained on another host
  ]
  adamw, ief = verdict.adversarial({"tables": {"adversarial": rows}})
  assert adamw == (
      "Adversarial training (AdamW, SST-2 dev): the clean-trained model keeps 60.0% under the "
      "ε=0.1 PGD attack (clean dev 88.0%); fgm 70.0% at ε=0.1 (clean dev 88.0%, 2.00× the "
      "clean step time, 2 of 3 seeds so far). Trained with pgd the model predicts (almost) one "
      "class at every ε: training collapsed at this learning rate, which is not robustness."
  )
  assert "seeds so far" not in ief
  assert "(clean dev 88.0%, step times not compared: no runs of both on one kind" in ief


def test_adversarial_study_compares_the_tuned_proximal_variant_with_adamw_under_attack():
  """Per objective, the accuracy under the PGD attack at the middle radius (0.2 of the full
  plan's grid), mean ± seed spread over the run files; a model that predicts one class at
  every radius is shown but not counted; the tally counts the rest."""
  from experiments.configs import full

  plan = full.get_plan()
  plan.objectives = ("clean", "fgm", "pgd")
  robust = {  # accuracy under attack at ε = 0.2, one per seed
      ("adamw", "clean"): (0.33, 0.31, 0.35),
      ("adamw", "fgm"): (0.56, 0.58, 0.54),
      ("adamw", "pgd"): (0.55, 0.55, 0.55),
      ("proximal_adamw", "clean"): (0.30, 0.28, 0.32),
      ("proximal_adamw", "fgm"): (0.51, 0.50, 0.52),
      ("proximal_adamw", "pgd"): (0.5,),  # one class: 0.5 at every radius; one seed so far
  }

  def result(variant, accuracy_at):
    attack = [
        {"epsilon": e, "accuracy": accuracy_at(e), "num_examples": 256, "num_steps": 5}
        for e in plan.attack_epsilons
    ]
    return {
        "config": {"task": "sst2", "optimizer": {"name": variant, "damping": 1.0}},
        "report": {
            "dev": {"accuracy": 0.88},
            "predicted_classes": {"dev": [400, 472]},
            "train_step_seconds": 1.0,
        },
        "attack": attack,
        "machine": {"device_kind": "cpu"},
    }

  class Stored(tuning.Context):

    def resolve(self, name):
      return "proximal_adamw" if name == "best_proximal" else name

    def group(self, label, task, name, extra=None, attack=None):
      variant, objective = self.resolve(name), extra["objective.kind"]
      flat = (variant, objective) == ("proximal_adamw", "pgd")
      found = [
          result(variant, lambda e, a=a: 0.5 if flat else a if e == 0.2 else 0.9 - e)
          for a in robust[variant, objective]
      ]
      labels = {"adamw": "AdamW", "proximal_adamw": "iEF → AdamW"}
      return tuning.Group(variant, labels[variant], {"optimizer.learning_rate": 1e-4}, found)

  executor = type("Executor", (), {"requested": [], "missing": {}})()
  study = studies.adversarial(Stored(plan, executor))
  rows = {(r["optimizer"], r["objective"]): r for r in study["tables"]["adversarial"]}
  assert rows["adamw", "fgm"]["acc_eps_0.2"] == pytest.approx(0.56)
  assert rows["adamw", "fgm"]["acc_std_eps_0.2"] == pytest.approx(0.02)
  assert "| 56.0 ± 2.0 |" in report.md_adversarial(study)
  by_objective = {r["objective"]: r for r in study["comparisons"]}
  assert {o: (r["outcome"], r["counted"]) for o, r in by_objective.items()} == {
      "clean": ("level", True),  # -3 points within the summed spread of 4
      "fgm": ("behind", True),  # -5 points beyond 2 + 1
      "pgd": ("behind", False),
  }
  assert by_objective["fgm"]["epsilon"] == 0.2
  [*_, sentence] = verdict.adversarial(study)
  assert sentence == (
      "Under the ε=0.2 PGD attack (accuracy, mean ± seed standard deviation), "
      "iEF → AdamW against AdamW: trained clean, 30.0 ± 2.0% vs "
      "33.0 ± 2.0%: level (-3.00 points); trained with fgm, 51.0 ± 1.0% vs 56.0 ± 2.0%: "
      "behind (-5.00 points); trained with pgd, 50.0% vs 55.0 ± 0.0%: not compared (a "
      "model collapsed to one class). None of the 16 runs predicts a single class on the dev "
      "split."
  )
  summary = verdict.verdict({"adversarial": study})
  assert "ahead in 0, level in 1 and behind in 1 of the 2 comparisons" in summary


def test_readme_compares_runs_trained_on_two_machines(tmp_path):
  from experiments import reproduce

  def result(machine, accuracy, loss):
    history = [{"step": s, "train/loss": loss} for s in (1, 2, 3, 4)]
    return {
        "key": "k",
        "report": {"holdout": {"accuracy": accuracy}},
        "history": history,
        "machine": {"device_kind": machine},
    }

  assert reproduce.duplicates_check(tmp_path, "r") == []
  run_process.write_json(tmp_path / "runs" / "k.json", result("NVIDIA H200", 0.875, 0.5))
  run_process.write_json(tmp_path / "duplicates" / "k.cpu.1.json", result("cpu", 0.870, 0.5005))
  (line,) = reproduce.duplicates_check(tmp_path, "r")
  assert "(NVIDIA H200 / cpu): 1 run(s)" in line
  assert "0.50 points" in line and "1.0e-03 relative" in line


def test_readme_lists_each_machine_once_with_its_runs_precisions():
  from experiments import reproduce

  cpu = {"platform": "Linux", "cpus": 2, "jax": "0.10", "backend": "cpu", "devices": 1}
  cpu["device_kind"] = "cpu"
  gpu = {**cpu, "cpus": 16, "backend": "gpu", "device_kind": "NVIDIA H200"}
  machines = [
      cpu,
      {**cpu, "matmul_precision": "default"},
      cpu,
      {**gpu, "matmul_precision": "highest"},
      {**cpu, "cpus": 1, "matmul_precision": "default"},  # a pinned worker's run
  ]
  text = reproduce.describe_machines(machines)
  assert text.count("Linux, 2 CPUs") == 1
  assert (
      "Linux, 1 CPU, JAX 0.10 on cpu (1 device(s), cpu; float32 matmul precision default: 1)"
      in text
  )
  assert "precision default: 1, not recorded: 2): 3 runs" in text
  assert "NVIDIA H200; float32 matmul precision highest: 1): 1 run" in text


def test_cpu_step_times_compare_only_on_one_host_and_core_count():
  def result(cpus, seconds, backend="cpu", kind="cpu", platform="Linux-a-x86_64-with-glibc2"):
    machine = {"backend": backend, "device_kind": kind, "cpus": cpus, "platform": platform}
    return {"machine": machine, "report": {"train_step_seconds": seconds}}

  assert tuning.machine_kind(result(2, 1.0)) == "cpu, 2 cores, Linux-a-x86_64"
  assert tuning.machine_kind(result(1, 1.0)) == "cpu, 1 core, Linux-a-x86_64"
  assert tuning.machine_kind(result(1, 1.0, platform=None)) == "cpu, 1 core"
  assert tuning.machine_kind(result(16, 1.0, "gpu", "NVIDIA H200")) == "NVIDIA H200"
  group = lambda *results: tuning.Group("v", "v", {"optimizer.learning_rate": 0.1}, list(results))
  two_cores, one_core = group(result(2, 1.0), result(2, 3.0)), group(result(1, 4.0))
  # The fastest seed's step time: a slower seed shared the machine with other work.
  assert two_cores.step_seconds() == 1.0 and two_cores.step_ratio(group(result(2, 0.5))) == 2.0
  assert math.isnan(two_cores.step_ratio(one_core))
  assert math.isnan(group(result(2, 1.0), result(1, 1.0)).step_seconds())
  # A faster host with the same core count is another kind of machine: a group whose seeds
  # ran on both has no one step time, and its ratio to another group is taken on the host
  # they share (here the fast one, where most of their runs trained), never across hosts.
  fast = lambda seconds: result(1, seconds, platform="Linux-b-x86_64-with-glibc2")
  mixed = group(result(1, 8.0), fast(5.0), fast(6.0))
  assert mixed.machine == "mixed" and math.isnan(mixed.step_seconds())
  assert mixed.step_seconds("cpu, 1 core, Linux-b-x86_64") == 5.0
  assert mixed.step_ratio(group(result(1, 2.0), fast(1.0), fast(1.5))) == 5.0
  assert mixed.step_ratio(group(result(1, 2.0))) == 4.0
  assert math.isnan(group(fast(5.0)).step_ratio(group(result(1, 2.0))))


def test_train_first_runs_parts_of_studies_before_the_rest(tmp_path, monkeypatch):
  """``plan.train_first`` trains every tuning trial, then calls the named studies (the
  optimizer study on one task, or one variant's runs there) in its order, skips studies left
  out by --only, and leaves no request counted for the main pass; a wrong entry is an error
  before anything trains."""
  from absl import app

  from experiments import reproduce
  from experiments.configs import full

  calls = []

  def recorder(name):
    def study(ctx):
      ctx.ex.requested.append(f"{name}-run")
      calls.append((name, tuple(ctx.plan.optimizer_tasks)))

    return study

  def tuned(ctx, variant):
    ctx.ex.requested.append(f"tune-{variant}")
    calls.append(("tuning", variant))

  def group(ctx, label, task, name):
    ctx.ex.requested.append(f"{label}-{task}-{name}")
    calls.append((label, task, name))

  monkeypatch.setattr(studies, "FUNCTIONS", {n: recorder(n) for n in ("optimizers", "squad")})
  monkeypatch.setattr(tuning.Context, "best_trial", tuned)
  monkeypatch.setattr(tuning.Context, "group", group)
  plan = full.get_plan()
  headline = [("optimizers", t, v) for t in ("tweets", "mrpc") for v in ("adamw", "best_proximal")]
  assert plan.train_first == (
      "tuning",
      "squad",
      "optimizers:sst2",
      *(":".join(entry) for entry in headline),
  )
  executor = runs.Executor(full.get_config(), tmp_path / "out", tmp_path / "work")
  reproduce.train_first(plan, ["optimizers", "squad"], executor)
  tasks = tuple(plan.optimizer_tasks)
  every_tuning = [("tuning", v) for v in plan.optimizer_variants]
  assert calls == [*every_tuning, ("squad", tasks), ("optimizers", ("sst2",)), *headline]
  assert executor.requested == []
  assert plan.optimizer_tasks == tasks  # the plan itself is unchanged
  calls.clear()
  reproduce.train_first(plan, ["squad"], executor)  # the tuning: whatever --only keeps
  assert calls == [*every_tuning, ("squad", tasks)]
  for entry, error in (
      ("squad:sst2", "names no task of the optimizer study"),
      ("optimizers:cola:adamw", "names no task of the optimizer study"),
      ("optimizers:mrpc:lamb", "names no variant of the plan"),
      ("optimisers:sst2", r"unknown \['optimisers:sst2'\]"),  # a typo is an error, not a skip
  ):
    plan.train_first = ("tuning", entry)
    calls.clear()
    with pytest.raises(app.UsageError, match=error):
      reproduce.train_first(plan, ["squad"], executor)
    assert calls == []  # checked before the first entry trains


def test_the_partial_study_notice_counts_the_missing_runs():
  from experiments import reproduce

  plan = ml_collections.ConfigDict({"studies": ("optimizers", "adversarial")})
  results = {"optimizers": {"missing": []}, "adversarial": {"missing": ["k1"]}}
  [text, _] = reproduce.partial_notice(plan, results)
  assert text.startswith("**Partial study**: 1 run the studies asked for so far does not exist")
  results["optimizers"]["missing"] = ["k2"]
  [text, _] = reproduce.partial_notice(plan, results)
  assert text.startswith("**Partial study**: 2 runs the studies asked for so far do not exist")
  assert reproduce.partial_notice(plan, {n: {"missing": []} for n in plan.studies}) == []
