"""Smoke test of experiments/reproduce.py: tiny model, 3 steps, one seed, two studies.

Checks that the run files, CSV tables, plots and the generated README section are produced
and that the README's numbers are the run files' numbers (nothing typed in), and that a
second invocation resumes from the stored runs instead of training again.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GLUE = Path(os.environ.get("NEARPROX_GLUE_DIR", REPO / ".." / "shared" / "data" / "glue"))


def reproduce(tmp_path, *extra):
  command = [
      sys.executable,
      str(REPO / "experiments" / "reproduce.py"),
      "--smoke",
      "--only",
      "optimizers,damping,adversarial",
      "--out",
      str(tmp_path / "results"),
      "--readme",
      str(tmp_path / "README_results.md"),
      "--workdir",
      str(tmp_path / "work"),
      "--link-root",
      str(tmp_path),
      *extra,
  ]
  completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
  return completed.stdout


@pytest.mark.skipif(
    not (GLUE / "SST-2" / "train.tsv").exists(),
    reason="needs the GLUE SST-2 TSVs (NEARPROX_GLUE_DIR)",
)
def test_smoke_pipeline_produces_tables_from_run_files(tmp_path):
  log = reproduce(tmp_path, "--data-dir", str(GLUE))
  out = tmp_path / "results" / "smoke"
  stored = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
  # sgd + proximal tikhonov (λ=0.1 is the sweep run itself) + tikhonov at λ=1, then the
  # clean and FGM objectives with an attack evaluation.
  assert len(stored) == 5
  assert log.count("[run]") == 5 and "[failed]" not in log
  for result in stored:
    assert result["report"]["steps"] == 3
    assert result["history"], "metrics.jsonl rows are kept in the run file"
  for name in (
      "optimizers_summary.csv",
      "optimizers_lr_sweep.csv",
      "damping_damping.csv",
      "optimizers_sst2.png",
      "damping.png",
      "optimizers.json",
      "damping.json",
  ):
    assert (out / name).stat().st_size > 0, name

  with open(out / "optimizers_summary.csv") as f:
    summary = list(csv.DictReader(f))
  assert sorted(r["variant"] for r in summary) == ["proximal_tikhonov", "sgd"]
  by_variant = {
      r["config"]["optimizer"]["name"]: r
      for r in stored
      if r["config"]["optimizer"]["damping"] == 0.1
  }
  prox = next(r for r in summary if r["variant"] == "proximal_tikhonov")
  assert float(prox["mean"]) == pytest.approx(
      by_variant["proximal_sgd"]["report"]["dev"]["accuracy"]
  )
  with open(out / "damping_damping.csv") as f:
    damping = {float(r["damping"]): r for r in csv.DictReader(f)}
  assert set(damping) == {0.1, 1.0}
  with open(out / "adversarial_adversarial.csv") as f:
    adversarial = {r["objective"]: r for r in csv.DictReader(f)}
  # The plan's training perturbation (configs/quick.py, inherited by smoke) reaches the run.
  assert float(adversarial["fgm"]["train_epsilon"]) == 0.1
  fgm_run = next(r for r in stored if r["config"]["objective"]["kind"] == "fgm")
  assert fgm_run["config"]["objective"]["epsilon"] == 0.1
  assert [row["epsilon"] for row in fgm_run["attack"]] == [0.0, 1.0]
  assert 1.0 <= float(damping[1.0]["effective_rank_mean"]) <= 8.0  # B = 8

  readme = (tmp_path / "README_results.md").read_text()
  assert "(mode **smoke**" in readme
  assert readme.count("**not run**") == 3  # multidevice, glue, noise
  sgd_step = by_variant["sgd"]["report"]["train_step_seconds"]
  assert (
      f"| SGD | 0.01 | 1 | {100 * by_variant['sgd']['report']['dev']['accuracy']:.1f} |" in readme
  )
  assert f"{sgd_step:.3g}" in readme
  assert "results/smoke/optimizers_sst2.png" in readme

  # Resume: everything is stored, so nothing trains and the tables are unchanged.
  again = reproduce(tmp_path, "--data-dir", str(GLUE), "--report-only")
  assert "[run]" not in again
  with open(out / "optimizers_summary.csv") as f:
    assert list(csv.DictReader(f)) == summary


@pytest.fixture
def experiment_modules(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO / "experiments"))
  import runs  # noqa: E401 (the experiments folder is not a package)
  import studies
  import verdict

  return runs, studies, verdict


@pytest.mark.skipif(
    not (GLUE / "MRPC" / "dev.tsv").exists(), reason="needs the GLUE MRPC TSVs (NEARPROX_GLUE_DIR)"
)
def test_majority_class_row_scores_the_constant_prediction(
    experiment_modules, tmp_path, monkeypatch
):
  runs, studies, _ = experiment_modules
  import ml_collections

  monkeypatch.setenv("NEARPROX_GLUE_DIR", str(GLUE))
  config = ml_collections.ConfigDict({"data_dir": None, "source": None, "max_eval_examples": 0})
  plan = ml_collections.ConfigDict({"seeds": (0, 1)})
  ctx = studies.Context(plan, runs.Executor(config, tmp_path, tmp_path, allow_new=False))
  row = studies.majority_class_row(ctx, "mrpc", 64)
  # MRPC dev: 279 of 408 pairs are paraphrases, the training majority class too, so the
  # constant prediction has accuracy p = 279/408 and F1 2p/(1+p) on every seed.
  p = 279 / 408
  assert row["accuracy"] == pytest.approx(p) and row["accuracy_std"] == 0.0
  assert row["f1"] == pytest.approx(2 * p / (1 + p))
  assert row["variant"] == "majority" and row["seeds"] == 2
  config.max_eval_examples = 100  # each seed's subset, as the runs evaluate it
  subset = studies.majority_class_row(ctx, "mrpc", 64)
  assert subset["accuracy"] != pytest.approx(p) and subset["accuracy_std"] > 0


def test_glue_verdict_counts_no_comparison_between_non_learners(experiment_modules):
  _, _, verdict = experiment_modules
  base = {"task": "mrpc", "seeds": 3, "f1_std": 0.0, "accuracy_std": 0.0}
  majority = {**base, "variant": "majority", "f1": 0.812, "accuracy": 0.684}
  prox = {**base, "variant": "proximal_tikhonov", "f1": 0.812, "accuracy": 0.684}
  for adamw_f1, adamw_accuracy, compared in ((0.812, 0.684, False), (0.85, 0.75, True)):
    adamw = {**base, "variant": "adamw", "f1": adamw_f1, "accuracy": adamw_accuracy}
    text = verdict.glue({"tables": {"glue": [adamw, prox, majority]}})[0]
    assert ("AdamW (" in text) == compared, text
    assert "majority class" in text
    assert ("AdamW and proximal SGD, tikhonov score" in text) == (not compared), text
