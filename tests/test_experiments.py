"""The experiments package: the reproduce pipeline (smoke mode, on local Ray), the studies'
tables and comparisons, the verdict table and the results document.

The smoke test runs ``python -m experiments.reproduce --mode=smoke`` (tiny model, 3 steps,
one seed, five studies) and checks that the run records, CSV tables, summary records, plots,
chosen settings and the results document are produced, that the document's numbers are the
records' numbers (nothing typed in), that ``--config.*`` / ``--plan.*`` overrides reach the
runs, and that a second invocation resumes from the stored runs instead of training again.
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

from experiments import report, run_process, runs, studies, tuning
from experiments.studies import adversarial, core
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


SMOKE_STUDIES = "optimizers,damping,adversarial,sketch,squad"


def reproduce(tmp_path, *extra):
  return run_module(
      "experiments.reproduce",
      "--mode=smoke",
      f"--only={SMOKE_STUDIES}",
      f"--out={tmp_path / 'results'}",
      f"--doc={tmp_path / 'results.md'}",
      f"--workdir={tmp_path / 'work'}",
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
  """One invocation of five studies (one Ray session, shared tuning runs), then a second
  that finds every run stored."""
  squad_dir = write_squad(tmp_path / "squad")
  log = reproduce(tmp_path, f"--squad_dir={squad_dir}", "--stop_after=60")
  assert "[failed]" not in log and "[stop]" not in log
  out = tmp_path / "results" / "smoke"
  stored = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
  # Pass 1: one tuning trial each for sgd and proximal tikhonov (λ = 0.1) on held-out
  # training examples. Pass 2, at their choice: the reported runs, tikhonov at λ = 1 (the plan
  # override) and the FGM objective with an attack evaluation; tikhonov's reported run is also
  # the adversarial study's clean run and the sketch study's exact run, so it trains once,
  # with the attack; the sketched run on dev and at the tuning budget; two SQuAD runs.
  assert len(stored) == 10 and log.count("[run]") == 10
  assert log.count("== pass") == 2
  check_optimizer_damping_adversarial(tmp_path, out, stored)

  # Resume: everything is stored, so nothing trains and the tables are unchanged.
  summary = json.loads((out / "summary.json").read_text())
  again = reproduce(tmp_path, f"--squad_dir={squad_dir}", "--report_only")
  assert "[run]" not in again
  assert json.loads((out / "summary.json").read_text()) == summary

  check_sketch_and_squad(tmp_path, out, stored)  # last: it adds a step-cost record


def check_optimizer_damping_adversarial(tmp_path, out, stored):
  """The optimizer, damping and adversarial studies' tables, summary records and document."""
  # Their runs: SST-2 with the exact Gram.
  stored = [
      r
      for r in stored
      if r["config"]["task"] == "sst2" and not r["config"]["optimizer"].get("sketch_dim")
  ]
  assert len(stored) == 6
  clean = [r for r in stored if r["config"]["optimizer"]["name"] == "proximal_sgd"]
  assert sum(r["attack"] is not None for r in clean if not r["config"]["holdout_examples"]) == 2
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
      "chosen.json",
      "verdict.md",
  ):
    assert (out / name).stat().st_size > 0, name

  summary = json.loads((out / "summary.json").read_text())
  assert all(list(r) == list(studies.SUMMARY_FIELDS) for r in summary)
  # Every study's records, the optimizer study's first (one per task and optimizer).
  assert list(dict.fromkeys(r["study"] for r in summary)) == [
      "optimizers",
      "damping",
      "adversarial",
      "sketch",
      "squad",
  ]
  records = [r for r in summary if r["study"] == "optimizers"]
  assert len(records) == 2 and {r["condition"] for r in records} == {None}
  assert [r["condition"] for r in summary if r["study"] == "damping"] == ["relative λ=1"] * 5
  by_optimizer = {r["optimizer"]: r for r in records}
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
      and r["config"]["objective"]["kind"] != "fgm"
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

  readme = (tmp_path / "results.md").read_text()
  assert f"| {tuning.DISPLAY['majority']} | — | — | 1 | {100 * majority:.1f} |" in readme
  assert "# Results (mode `smoke`)" in readme and "python -m experiments.reproduce" in readme
  # Every study of the smoke plan but the five selected (multidevice, glue, noise, …).
  from experiments.configs import smoke

  assert readme.count("**not run**") == len(smoke.get_plan().studies) - 5
  assert "from 10 run records" in readme
  accuracy = 100 * sgd["mean"]
  assert f"| SGD | 0.01 | — | 1 | {accuracy:.1f} |" in readme
  tuning_rows = list(csv.DictReader(open(out / "optimizers_tuning.csv")))
  assert [(r["variant"], r["chosen"]) for r in tuning_rows] == [
      ("SGD", "True"),
      ("proximal SGD, tikhonov", "True"),
  ]
  assert f"{runs_by_name['sgd']['report']['train_step_seconds']:.3g}" in readme
  assert "results/smoke/optimizers_sst2.png" in readme
  difference = 100 * comparisons[0]["difference"]
  assert f"| {difference:+.1f} | **{comparisons[0]['outcome']}** |" in readme  # the verdict table
  chosen = json.loads((out / "chosen.json").read_text())
  assert chosen["aliases"]["best_proximal"] == "proximal_tikhonov"
  assert chosen["variants"]["sgd"]["overrides"]["optimizer.learning_rate"] == 0.01


def check_sketch_and_squad(tmp_path, out, stored):
  """Studies 7 and 8: the tuned proximal variant with the sketched and the exact Gram on
  SST-2, and SQuAD (a tiny corpus) with the plan's QA optimizers at their SST-2 settings."""
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

  readme = (tmp_path / "results.md").read_text()
  assert "Sketched vs exact Gram" in readme and "sketched, k = 64" in readme
  assert "At the tuning budget (3 steps" in readme
  f1 = 100 * by_optimizer["sgd"]["f1"]
  assert f"| SGD | 0.01 | — | 1 | {f1:.1f} |" in readme
  assert "| SQuAD held-out f1 | proximal SGD, tikhonov |" in readme
  assert "× exact step (timed apart)" in readme

  # With bench_optimizers' record, the sketch's cost is its sketched/exact step time ratio.
  from experiments.configs import smoke

  timed = {"proximal_tikhonov": 2.0, f"proximal_tikhonov{studies.SKETCHED}": 0.5}
  record = {"rows": [{"variant": v, "step_seconds": s} for v, s in timed.items()]}
  run_process.write_json(out / studies.STEP_COST_FILE, record)
  config = smoke.get_config()
  config.eval_batch_size = 16  # as reproduce() ran it: the runs' keys hash their config
  study = core.run_study(
      "sketch",
      studies.REGISTRY["sketch"],
      tuning.Context(smoke.get_plan(), runs.RunStore(config, out)),
  )
  assert not study["missing"]
  for name in ("sketch", "sketch_tuning_budget"):
    rows = {r["gram"]: r for r in study["tables"][name]}
    assert rows["sketched"]["timed_step_ratio"] == 0.25 and "timed_step_ratio" not in rows["exact"]
  assert studies.REGISTRY["sketch"].markdown(study).count("| 0.25× |") == 2


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
  ctx = tuning.Context(plan, runs.RunStore(config, tmp_path))
  row = core.majority_class_row(ctx, "mrpc", 64)
  # MRPC dev: 279 of 408 pairs are paraphrases, the training majority class too, so the
  # constant prediction has accuracy p = 279/408 and F1 2p/(1+p) on every seed.
  p = 279 / 408
  assert row["accuracy"] == pytest.approx(p) and row["accuracy_std"] == 0.0
  assert row["f1"] == pytest.approx(2 * p / (1 + p))
  assert row["variant"] == tuning.DISPLAY["majority"] and row["seeds"] == 2
  config.max_eval_examples = 100  # each seed's subset, as the runs evaluate it
  subset = core.majority_class_row(ctx, "mrpc", 64)
  assert subset["accuracy"] != pytest.approx(p) and subset["accuracy_std"] > 0


ROBUST = "accuracy under embedding PGD, ε=0.2"  # the summary records' name


def test_adversarial_study_compares_the_tuned_proximal_variant_with_adamw_under_attack():
  """Per objective, the accuracy under the PGD attack at the middle radius (0.2 of the full
  plan's grid), mean ± seed spread over the run files; a model that predicts one class at
  every radius is shown but not counted; the tally counts the rest."""
  from experiments.configs import full

  plan = full.get_plan()
  plan.objectives = ("clean", "fgm", "pgd")
  plan.robust_eval_objectives = ()  # the whole-split rows: their own test below
  robust = {  # accuracy under attack at ε = 0.2, one per seed
      ("adamw", "clean"): (0.33, 0.31, 0.35),
      ("adamw", "fgm"): (0.56, 0.58, 0.54),
      ("adamw", "pgd"): (0.55, 0.55, 0.55),
      ("proximal_adamw", "clean"): (0.30, 0.28, 0.32),
      ("proximal_adamw", "fgm"): (0.51, 0.50, 0.52),
      ("proximal_adamw", "pgd"): (0.5,),  # one class: 0.5 at every radius; one seed so far
  }
  weighting = {"adamw": "uniform", "proximal_adamw": "ief"}

  def result(variant, objective, accuracy_at):
    attack = [
        {"epsilon": e, "accuracy": accuracy_at(e), "num_examples": 256, "num_steps": 5}
        for e in plan.attack_epsilons
    ]
    return {
        "config": {
            "task": "sst2",
            "num_train_steps": 600,
            "optimizer": {"name": variant, "damping": 1.0, "weighting": weighting[variant]},
            "objective": {"kind": objective},  # stored before objective.ief_weights existed
        },
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
          result(variant, objective, lambda e, a=a: 0.5 if flat else a if e == 0.2 else 0.9 - e)
          for a in robust[variant, objective]
      ]
      labels = {"adamw": "AdamW", "proximal_adamw": "iEF → AdamW"}
      return tuning.Group(variant, labels[variant], {"optimizer.learning_rate": 1e-4}, found)

  store = type("Store", (), {"requested": [], "missing": {}})()
  study = core.run_study("adversarial", adversarial, Stored(plan, store))
  rows = {(r["optimizer"], r["objective"]): r for r in study["tables"]["adversarial"]}
  assert rows["adamw", "fgm"]["acc_eps_0.2"] == pytest.approx(0.56)
  assert rows["adamw", "fgm"]["acc_std_eps_0.2"] == pytest.approx(0.02)
  assert "| 56.0 ± 2.0 |" in adversarial.markdown(study)
  # Which iEF weights the adversarially trained iEF runs used is said, not left implicit.
  assert rows["proximal_adamw", "fgm"]["ief_weights"] == "clean_term"
  assert rows["proximal_adamw", "clean"]["ief_weights"] is None
  assert rows["adamw", "fgm"]["ief_weights"] is None
  assert '`objective.ief_weights = "clean_term"`, from the clean' in adversarial.markdown(study)
  records = {(r["variant"], r["condition"], r["metric"]): r for r in study["tables"]["summary"]}
  fgm = records["AdamW", "fgm training, 5-step PGD attack on 256 dev examples", ROBUST]
  assert (fgm["study"], fgm["mean"], fgm["seeds"]) == ("adversarial", pytest.approx(0.56), 3)
  assert fgm["std"] == pytest.approx(0.02)
  clean = records["iEF → AdamW", "pgd training, 5-step PGD attack on 256 dev examples", "accuracy"]
  assert (clean["mean"], clean["seeds"], clean["split"]) == (0.88, 1, "dev")
  by_objective = {r["objective"]: r for r in study["comparisons"]}
  assert {o: (r["outcome"], r["counted"]) for o, r in by_objective.items()} == {
      "clean": ("level", True),  # -3 points within the summed spread of 4
      "fgm": ("behind", True),  # -5 points beyond 2 + 1
      "pgd": ("behind", False),
  }
  assert by_objective["fgm"]["epsilon"] == 0.2
  table = report.verdict_table(report.verdict_rows({"adversarial": study}))
  assert (
      "| -5.0 | **behind** |" in table and "| not counted (a model predicts one class) |" in table
  )
  assert report.tally(study["comparisons"]) == "ahead 0, level 1, behind 1 (of 2 counted)"


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
  # Single-threaded XLA kernels (the Ray runner's one-CPU runs) are another kind as well.
  single = result(2, 0.8)
  single["machine"]["xla_cpu_threads"] = 1
  assert tuning.machine_kind(single) == "cpu, 2 cores, Linux-a-x86_64, 1 XLA thread"
  assert math.isnan(group(single).step_ratio(group(result(2, 1.0))))


def test_the_results_document_lists_each_machine_once_with_its_run_count():
  cpu = {"platform": "Linux", "cpus": 2, "jax": "0.10", "backend": "cpu", "devices": 1}
  cpu["device_kind"] = "cpu"
  gpu = {**cpu, "cpus": 16, "backend": "gpu", "device_kind": "NVIDIA H200"}
  single = {**cpu, "xla_cpu_threads": 1}
  lines = report.describe_machines([cpu, cpu, gpu, {**cpu, "cpus": 1}, single])
  assert lines == [
      "Linux, 1 CPU(s), JAX 0.10 on cpu (1 device(s), cpu): 1 run(s)",
      "Linux, 2 CPU(s), JAX 0.10 on cpu (1 device(s), cpu): 2 run(s)",
      "Linux, 2 CPU(s), JAX 0.10 on cpu (1 device(s), cpu, 1 XLA thread): 1 run(s)",
      "Linux, 16 CPU(s), JAX 0.10 on gpu (1 device(s), NVIDIA H200): 1 run(s)",
  ]


def test_the_partial_study_notice_counts_the_missing_runs():
  plan = ml_collections.ConfigDict({"studies": ("optimizers", "adversarial")})
  results = {"optimizers": {"missing": []}, "adversarial": {"missing": ["k1"]}}
  [text, _] = report.partial_notice(plan, results)
  assert text.startswith("**Partial study**: 1 run the studies asked for so far is not stored")
  results["optimizers"]["missing"] = ["k2"]
  [text, _] = report.partial_notice(plan, results)
  assert text.startswith("**Partial study**: 2 runs the studies asked for so far are not stored")
  assert report.partial_notice(plan, {n: {"missing": []} for n in plan.studies}) == []


# ------------------------------------------------------------------------------ issue 40


class SyntheticStore:
  """A run store that answers every request at once with a record whose final scores are
  ``score(overrides)`` (dev, test and held-out alike), a dev curve rising linearly to it by
  step ``reach(overrides)``, and, with an attack, ``score - ε`` at every radius."""

  def __init__(self, out, score, reach=lambda overrides: 1):
    from experiments.configs import full

    self.base_config, self.out = full.get_config(), out
    self.score, self.reach = score, reach
    self.requested, self.missing, self.calls = [], {}, []

  def run(self, label, overrides, devices=1, attack=None):
    self.calls.append((label, dict(overrides), attack))
    self.requested.append(len(self.requested))
    config = runs.apply_overrides(self.base_config, overrides).to_dict()
    final = self.score(overrides)
    steps, every = config["num_train_steps"], config["eval_every"]
    curve = [(s, final * min(1.0, s / self.reach(overrides))) for s in range(every, steps, every)]
    examples = (attack.examples or 872) if attack else None
    return {
        "config": config,
        "report": {
            **{split: {"accuracy": final} for split in ("dev", "test", "holdout")},
            "predicted_classes": {split: [5, 5] for split in ("dev", "test", "holdout")},
            "steps": steps,
            "train_step_seconds": 1.0,
        },
        "history": [{"step": s, "dev/accuracy": v} for s, v in curve]
        + [{"step": steps, "train/loss": 1.0 - final}],
        "attack": None
        if attack is None
        else [
            {"epsilon": e, "accuracy": final - e, "num_examples": examples, "num_steps": 5}
            for e in attack.epsilons
        ],
        "machine": {"device_kind": "cpu"},
        "wall_seconds": 1.0 * steps,
    }


def full_plan_context(out, score, reach=lambda overrides: 1):
  from experiments.configs import full
  from experiments.reproduce import plan_with_defaults

  return tuning.Context(plan_with_defaults(full.get_plan()), SyntheticStore(out, score, reach))


def ablation_score(overrides) -> float:
  """iEF → AdamW 0.88, its weights alone 0.875 (level), uniform weights 0.85 (behind), the
  sketched Gram 0.879; AdamW 0.87; a seed moves a score by 0.002."""
  name, seed = overrides["optimizer.name"], overrides["seed"]
  if name == "proximal_adamw":
    if overrides.get("optimizer.weighting") != "ief":
      base = 0.85
    else:
      base = 0.879 if overrides.get("optimizer.sketch_dim") else 0.88
  else:
    base = {"weighted_mean_adamw": 0.875, "adamw": 0.87}.get(name, 0.8)
  if overrides.get("holdout_examples"):  # the tuning: iEF first, then iEF → AdamW
    weighting = overrides.get("optimizer.weighting") == "ief"
    base = 0.9 if weighting and name == "proximal_adamw" else 0.89 if weighting else base
  return base + 0.002 * seed


def test_ablation_study_takes_the_weights_and_the_gram_away_in_turn(tmp_path):
  ctx = full_plan_context(tmp_path, ablation_score)
  study = core.run_study("ablation", studies.REGISTRY["ablation"], ctx)
  rows = study["tables"]["ablation"]
  assert [(r["task"], r["part"]) for r in rows] == [
      (task, part)
      for task in ("sst2", "tweets")
      for part in ("AdamW", "tuned", "weights only", "uniform weights", "sketched Gram")
  ]
  weights_only = [c for _, c, _ in ctx.store.calls if c["optimizer.name"] == "weighted_mean_adamw"]
  assert len(weights_only) == 6  # two tasks, three seeds
  # The tuned variant's settings, only the aggregation changed: same rate, same weights.
  chosen = ctx.best_trial("proximal_adamw")["trial"]
  assert all(
      c["optimizer.weighting"] == "ief"
      and c["optimizer.learning_rate"] == chosen["optimizer.learning_rate"]
      for c in weights_only
  )
  sst2 = {r["part"]: r for r in rows if r["task"] == "sst2"}
  assert sst2["tuned"]["mean"] == pytest.approx(0.882) and sst2["tuned"]["std"] == pytest.approx(
      0.002
  )
  assert sst2["weights only"]["damping"] is None
  outcomes = {
      (c["task"], c["subject_part"], c["baseline_part"]): c["outcome"] for c in study["comparisons"]
  }
  assert outcomes == {
      (task, subject, baseline): outcome
      for task in ("sst2", "tweets")
      for subject, baseline, outcome in (
          ("weights only", "tuned", "level"),
          ("uniform weights", "tuned", "behind"),
          ("sketched Gram", "tuned", "level"),
          ("weights only", "sketched Gram", "level"),
      )
  }
  # Its summary records: one per table row, the part as the condition.
  records = {(r["task"], r["condition"]): r for r in study["tables"]["summary"]}
  assert list(records) == [(r["task"], r["part"]) for r in rows]
  weights = records["sst2", "weights only"]
  assert (weights["study"], weights["variant"], weights["damping"]) == (
      "ablation",
      "(a) AdamW on the iEF-weighted mean gradient, no Gram",
      None,
  )
  assert weights["mean"] == sst2["weights only"]["mean"] == pytest.approx(0.877)
  assert records["tweets", "tuned"]["split"] == "test"  # the tweets' reported split
  text = studies.REGISTRY["ablation"].markdown(study)
  assert "(a) AdamW on the iEF-weighted mean gradient, no Gram" in text
  assert "(a) matches the tuned variant on: SST-2, tweets; not on: none." in text
  assert "| 88.2 ± 0.2 |" in text


def test_time_to_accuracy_uses_the_timed_step_and_marks_a_missing_one(tmp_path):
  # Dev curves reach their final score at step 300 (AdamW), 100 (the proximal variant).
  reach = lambda o: 300 if o["optimizer.name"] == "adamw" else 100
  ctx = full_plan_context(tmp_path, ablation_score, reach)
  timed = {"adamw": 0.8, "proximal_adamw": 1.4, f"proximal_adamw{studies.SKETCHED}": 1.0}
  record = {"task": "sst2", "batch_size": 32, "max_length": 64}
  record["rows"] = [{"variant": v, "step_seconds": s} for v, s in timed.items()]
  run_process.write_json(tmp_path / studies.STEP_COST_FILE, record)
  study = core.run_study("time_to_accuracy", studies.REGISTRY["time_to_accuracy"], ctx)
  assert all(c["eval_every"] == 20 for _, c, _ in ctx.store.calls if "holdout_examples" not in c)
  rows = {(r["optimizer"], r["gram"]): r for r in study["tables"]["time_to_accuracy"]}
  adamw = rows["adamw", "exact"]
  assert adamw["target_1"] == pytest.approx(0.872)  # AdamW's final mean dev accuracy
  assert adamw["steps_1"] == 300 and adamw["seconds_1"] == pytest.approx(240.0)
  assert adamw["steps_0.97"] == 300 * 0.97 // 20 * 20 + 20  # first evaluation above 97%
  sketched = rows["proximal_adamw", "sketched, k = 1024"]
  assert sketched["steps_1"] == 100  # 0.879 · step/100 passes 0.872 only at step 100
  assert sketched["time_ratio_1"] == pytest.approx(100 * 1.0 / 240)
  peer = next(r for (name, _), r in rows.items() if name not in ("adamw", "proximal_adamw"))
  assert peer["timed_step_seconds"] is None and peer["seconds_1"] is None
  records = {(r["condition"], r["metric"]): r for r in study["tables"]["summary"]}
  reach = "1× AdamW's final mean dev accuracy"
  sketched_at = "dev every 20 steps, Gram: sketched, k = 1024"
  assert records[sketched_at, f"steps to {reach}"]["mean"] == 100
  assert records[sketched_at, f"seconds to {reach}"]["mean"] == pytest.approx(100.0)
  ratio = records[sketched_at, f"time to {reach}, ratio to AdamW's"]
  assert ratio["mean"] == pytest.approx(100 / 240) and ratio["std"] is None
  assert records["dev every 20 steps", "accuracy"]["study"] == "time_to_accuracy"
  missing = [r for r in study["tables"]["summary"] if r["variant"] == peer["variant"]]
  assert {r["mean"] for r in missing if r["metric"].startswith("seconds")} == {None}
  text = studies.REGISTRY["time_to_accuracy"].markdown(study)
  assert "| missing |" in text and "(target ≤ 0.7×: met)" in text
  assert studies.REGISTRY["time_to_accuracy"].plots(study, tmp_path)


def test_a_diverged_seed_holds_its_last_score_to_the_end_of_its_curve():
  """A run that stopped at a non-finite update keeps its last dev score at the evaluations it
  skipped (its parameters could no longer change), so a mean over seeds spans the budget."""

  def result(history, steps, final, diverged_at=None):
    return {
        "config": {"eval_every": 100, "num_train_steps": 300},
        "report": {"steps": steps, "dev": {"accuracy": final}, "diverged_at_step": diverged_at},
        "history": history,
    }

  healthy = result(
      [{"step": 100, "dev/accuracy": 0.6}, {"step": 200, "dev/accuracy": 0.7}], 300, 0.8
  )
  diverged = result([{"step": 100, "dev/accuracy": 0.6}], 150, 0.5, diverged_at=150)
  assert core.dev_curve(diverged, "accuracy") == [(100, 0.6), (150, 0.5), (200, 0.5), (300, 0.5)]
  assert core.dev_curve(healthy, "accuracy") == [(100, 0.6), (200, 0.7), (300, 0.8)]
  mean = core.mean_curve([core.dev_curve(r, "accuracy") for r in (healthy, diverged)])
  assert mean == [(100, pytest.approx(0.6)), (200, pytest.approx(0.6)), (300, pytest.approx(0.65))]


def test_batch_size_study_scales_the_learning_rate_by_the_declared_rule(tmp_path):
  from experiments.studies import batch_size

  assert batch_size.steps_for(600 * 32, 512) == 38 and batch_size.steps_for(19200, 128) == 150
  assert batch_size.scaled_learning_rate(1e-4, 128, 32) == pytest.approx(2e-4)
  assert batch_size.learning_rate_trials(1e-4, 512, 32, (0.5, 1.0, 2.0)) == [
      {"optimizer.learning_rate": pytest.approx(lr)} for lr in (2e-4, 4e-4, 8e-4)
  ]

  def score(overrides):  # at B = 32 AdamW tunes to 2e-4, at B > 32 the largest trial wins
    if not overrides.get("holdout_examples"):
      return ablation_score(overrides)
    learning_rate = overrides["optimizer.learning_rate"]
    if overrides.get("batch_size", 32) > 32:
      return 0.8 + learning_rate
    off = abs(math.log10(learning_rate / 2e-4)) if overrides["optimizer.name"] == "adamw" else 0
    return ablation_score(overrides) - 0.001 * off

  ctx = full_plan_context(tmp_path, score)
  study = core.run_study("batch_size", batch_size, ctx)
  rows = {(r["optimizer"], r["batch_size"]): r for r in study["tables"]["batch_size"]}
  assert set(rows) == {(o, b) for o in ("adamw", "proximal_adamw") for b in (32, 128, 512)}
  assert [rows["adamw", b]["steps"] for b in (32, 128, 512)] == [600, 150, 38]
  assert rows["adamw", 32]["learning_rate"] == 2e-4  # the tuning's choice at B = 32
  assert rows["adamw", 512]["learning_rate"] == pytest.approx(2e-4 * math.sqrt(16) * 2)
  # The proximal variant's Gram is sketched at every batch size (tuning runs too), AdamW's none.
  assert {rows["proximal_adamw", b]["sketch_dim"] for b in (32, 128, 512)} == {1024}
  proximal_calls = [
      c
      for _, c, _ in ctx.store.calls
      if c.get("optimizer.name") == "proximal_adamw" and c.get("batch_size", 32) != 32
  ]
  assert proximal_calls and {c["optimizer.sketch_dim"] for c in proximal_calls} == {1024}
  proximal_lr = ctx.best_trial("proximal_adamw")["learning_rate"]
  assert rows["proximal_adamw", 128]["learning_rate"] == pytest.approx(proximal_lr * 2 * 2)
  tuned = [c for _, c, _ in ctx.store.calls if c.get("holdout_examples") and "batch_size" in c]
  assert {(c["batch_size"], c["num_train_steps"]) for c in tuned} == {(128, 50), (512, 13)}
  damping = ctx.best_trial("proximal_adamw")["damping"]  # carried to every batch size
  assert {c["optimizer.damping"] for c in tuned if "optimizer.damping" in c} == {damping}
  assert [c["condition"] for c in study["comparisons"]] == [
      "SST-2 dev acc., batch 128 (150 steps), sketched Gram (k = 1024)",
      "SST-2 dev acc., batch 512 (38 steps), sketched Gram (k = 1024)",
  ]
  records = {(r["optimizer"], r["condition"]): r for r in study["tables"]["summary"]}
  at_512 = records["adamw", "B=512, 19200 training examples"]
  assert (at_512["study"], at_512["batch_size"], at_512["steps"]) == ("batch_size", 512, 38)
  assert at_512["learning_rate"] == rows["adamw", 512]["learning_rate"]
  assert at_512["mean"] == rows["adamw", 512]["dev_accuracy"] and len(records) == len(rows)
  sketched = records["proximal_adamw", "B=512, 19200 training examples, sketched Gram, k=1024"]
  assert sketched["mean"] == rows["proximal_adamw", 512]["dev_accuracy"]
  text = batch_size.markdown(study)
  assert "f ∈ {0.5, 1, 2}" in text and "| η₀ (tuned) |" in text
  assert "| sketched, k = 1024 |" in text
  assert batch_size.plots(study, tmp_path)


def test_noise_seeds_and_whole_split_robust_accuracy(tmp_path):
  ctx = full_plan_context(tmp_path, ablation_score)
  noise = core.run_study("noise", studies.REGISTRY["noise"], ctx)
  seeds = {(r["label_noise"], r["optimizer"]): r["seeds"] for r in noise["tables"]["noise"]}
  assert seeds == {
      (level, name): 3 if level == 0.0 else 5
      for level in (0.0, 0.2, 0.4)
      for name in ("adamw", "proximal_adamw")
  }
  records = {(r["optimizer"], r["condition"]): r for r in noise["tables"]["summary"]}
  at_40 = records["proximal_adamw", "label noise 40%"]
  assert (at_40["study"], at_40["seeds"], at_40["metric"]) == ("noise", 5, "accuracy")
  assert records["adamw", "label noise 0%"]["seeds"] == 3
  low = records["adamw", "low-confidence test labels"]
  assert (low["task"], low["split"]) == ("tweets", "test_low_confidence")
  study = core.run_study("adversarial", adversarial, ctx)
  whole = study["tables"]["adversarial_whole_split"]
  assert [(r["optimizer"], r["objective"]) for r in whole] == [
      (name, objective) for name in ("adamw", "proximal_adamw") for objective in ("clean", "pgd")
  ]
  assert {r["attack_examples"] for r in whole} == {872}
  assert {r["attack_examples"] for r in study["tables"]["adversarial"]} == {256}
  conditions = [c["condition"] for c in study["comparisons"]]
  assert conditions[-2:] == [
      "SST-2 dev acc. under PGD ε=0.2, clean training, the whole dev split",
      "SST-2 dev acc. under PGD ε=0.2, pgd training, the whole dev split",
  ]
  assert "The same attack on the whole dev split (872 examples)" in adversarial.markdown(study)
  on_whole = [
      r
      for r in study["tables"]["summary"]
      if r["condition"] == "pgd training, 5-step PGD attack on the whole dev split"
      and r["metric"] == ROBUST
  ]
  assert [(r["optimizer"], r["mean"]) for r in on_whole] == [
      ("adamw", pytest.approx(0.872 - 0.2)),
      ("proximal_adamw", pytest.approx(0.882 - 0.2)),
  ]


def test_summary_json_gathers_every_study_s_labelled_records(tmp_path, monkeypatch):
  """Every study but translation (its own test) writes summary records: exactly
  SUMMARY_FIELDS, its own name as ``study``, no two alike in (study, condition, task,
  variant, metric, split); summary.json gathers them in the plan's order, and is not
  written without the optimizer study's."""
  from experiments.reproduce import summary_records
  from experiments.studies import glue, optimizers
  from tests.test_multitask import multitask_context

  # The majority-class references, without the GLUE files.
  def majority(ctx, task, max_length):
    return {"task": task, "optimizer": None, "variant": "majority", "accuracy": 0.68, "f1": 0.81}

  def scores(ctx, task, split, seeds):
    return {seed: dict.fromkeys(data.get_task(task).metric_names, 0.5) for seed in seeds}

  monkeypatch.setattr(glue, "majority_class_row", majority)
  monkeypatch.setattr(optimizers, "majority_class_scores", scores)
  ctx = multitask_context(tmp_path)
  names = [n for n in studies.STUDIES if n != "translation"]
  results = {n: core.run_study(n, studies.REGISTRY[n], ctx) for n in names}
  for name, study in results.items():
    records = study["tables"]["summary"]
    assert records, name
    assert {r["study"] for r in records} == {name}
    assert all(tuple(core.summary_record(**r)) == studies.SUMMARY_FIELDS for r in records)
  summary = summary_records(results)
  assert [r["study"] for r in summary] == [
      n for n in names for _ in results[n]["tables"]["summary"]
  ]
  assert all(list(r) == list(studies.SUMMARY_FIELDS) for r in summary)
  keys = [
      (r["study"], r["condition"], r["task"], r["variant"], r["metric"], r["split"])
      for r in summary
  ]
  assert len(set(keys)) == len(keys)
  assert summary_records({n: s for n, s in results.items() if n != "optimizers"}) is None

  by_study = lambda name: {
      (r["variant"], r["condition"], r["metric"]): r for r in results[name]["tables"]["summary"]
  }
  # Damping: the accuracy and the Gram spectrum of each relative λ, one seed.
  damping = by_study("damping")
  variant = results["damping"]["tables"]["damping"][0]
  label = ctx.label(f"proximal_{variant['filter']}")
  lam = f"relative λ={variant['damping']:g}"
  assert damping[label, lam, "accuracy"]["mean"] == variant["dev_accuracy"]
  assert damping[label, lam, "effective rank of K (mean)"]["split"] == "train"
  assert damping[label, lam, "accuracy"]["damping"] == variant["damping"]
  # GLUE: MRPC's official metric (F1) of each optimizer; the majority row is no record.
  glue_rows = {r["variant"]: r for r in results["glue"]["tables"]["glue"]}
  for record in results["glue"]["tables"]["summary"]:
    assert (record["task"], record["metric"], record["split"]) == ("mrpc", "f1", "dev")
    assert record["mean"] == glue_rows[record["variant"]]["f1"]
  assert len(results["glue"]["tables"]["summary"]) == len(glue_rows) - 1
  # Local vs global Gram: the Gram and the device count as the condition.
  assert {r["condition"] for r in results["multidevice"]["tables"]["summary"]} == {
      "local Gram, 8 host devices",
      "global Gram, 8 host devices",
  }
  # SQuAD: F1 of each QA optimizer at its settings (the QA windows' tokens).
  squad = results["squad"]["tables"]["summary"]
  assert [r["optimizer"] for r in squad] == [
      r["optimizer"] for r in results["squad"]["tables"]["squad"]
  ]
  assert {(r["task"], r["metric"], r["max_length"]) for r in squad} == {
      ("squad", "f1", ctx.plan.qa_settings["max_length"])
  }
  # Sketch: the exact and the sketched Gram on dev, and both at the tuning budget (held out).
  sketch = {(r["condition"], r["split"]): r for r in results["sketch"]["tables"]["summary"]}
  assert list(sketch) == [
      ("exact Gram", "dev"),
      ("sketched Gram, k=1024", "dev"),
      ("exact Gram, tuning budget", "holdout"),
      ("sketched Gram, k=1024, tuning budget", "holdout"),
  ]
  sketched = next(r for r in results["sketch"]["tables"]["sketch"] if r["gram"] == "sketched")
  assert sketch["sketched Gram, k=1024", "dev"]["mean"] == sketched["dev_accuracy"]
  assert sketch["exact Gram, tuning budget", "holdout"]["steps"] == ctx.plan.tuning.steps


def test_the_ief_normalization_ratio_is_tabulated_from_the_runs_that_log_it(tmp_path, monkeypatch):
  """Issue 42: λ/Σs, the factor between the default iEF step and eq. 8's, over every logged
  step of every seed of the runs that log it; variants that don't log it get no row."""
  ctx = full_plan_context(tmp_path, ablation_score)
  plain_run = ctx.store.run

  def run(label, overrides, devices=1, attack=None):
    result = plain_run(label, overrides, devices, attack) | {"wall_seconds": 600.0}
    if result["config"]["optimizer"]["weight_normalization"] == "damping":
      seed = result["config"]["seed"]
      result["history"] += [
          {"step": s, "train/gram/normalization_ratio": (1 + seed) * s / 100} for s in (50, 100)
      ]
    return result

  ctx.store.run = run
  module = studies.REGISTRY["optimizers"]

  def majority(ctx, task, split, seeds):
    return {s: dict.fromkeys(data.get_task(task).metric_names, 0.5) for s in seeds}

  monkeypatch.setattr(module, "majority_class_scores", majority)  # no data files read
  study = core.run_study("optimizers", module, ctx)
  rows = study["tables"]["normalization"]
  eq8 = tuning.DISPLAY["proximal_ief_eq8"]
  assert {r["variant"] for r in rows} == {eq8}
  sst2 = next(r for r in rows if r["task"] == "sst2")
  # seeds 0, 1, 2 at steps 50 and 100: 0.5, 1, 1, 2, 1.5, 3
  assert (sst2["seeds"], sst2["logged_steps"]) == (3, 6)
  assert (sst2["min"], sst2["median"], sst2["max"]) == pytest.approx((0.5, 1.25, 3.0))
  assert sst2["max_over_min"] == pytest.approx(6.0)
  text = module.markdown(study)
  assert "λ/Σs over training" in text and f"| {eq8} | SST-2 |" in text
