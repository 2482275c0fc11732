"""The benchmarks' own code on tiny models: experiments/bench_step.py and
bench_objectives.py end to end, experiments/bench_sketch.py (bench_step's sketch section)
and experiments/bench_optimizers.py."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import bench_harness, bench_sketch
from experiments.bench_harness import GB
from nearprox.text import models


@pytest.fixture(scope="module")
def tiny_saved_model(tmp_path_factory):
  """A one-layer BERT saved like MiniLM (T = 64 fits; the tokenizer's vocabulary, which the
  sketch section's batch is drawn from), for the benchmarks' --model."""
  tokenizer = models.load_tokenizer(models.minilm_dir())
  config = models.tiny_config(
      num_hidden_layers=1, max_position_embeddings=64, vocab_size=tokenizer.vocab_size
  )
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0))
  return models.save_pretrained(model, params, tokenizer, tmp_path_factory.mktemp("tiny"))


def run_benchmark(module, *flags):
  return subprocess.run(
      [sys.executable, "-m", module, *flags],
      capture_output=True,
      text=True,
      timeout=900,
      env={**os.environ, "XLA_FLAGS": ""},  # one host device, as the benchmarks run
  )


def test_bench_step_writes_every_section_of_its_quick_run(tiny_saved_model, tmp_path):
  output = tmp_path / "bench_step.md"
  result = run_benchmark(
      "experiments.bench_step",
      f"--model={tiny_saved_model}",
      "--quick",
      "--repeats=1",
      "--sketch_dims=16",
      "--family_dims=16",
      "--translation=",  # the translation row has its own test below
      f"--output={output}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  text = output.read_text()
  for section in (
      "## Step time and peak memory, relative to SGD",
      "## Where the factored step's time goes (MiniLM, B=32, T=64)",
      "## Estimated Gram: scale_by_proximal(sketch_dim=k)",
      "#### Sketch families at equal k",
  ):
    assert section in text, section
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert sum("(ii) proximal, factored (default)" in r for r in rows) == 1
  assert sum(r.startswith("| factored: proximal update") for r in rows) == 1
  # k = 16: a row of the sketch table and one per family in the families' table.
  assert sum(r.startswith("| 16 |") for r in rows) == 1 + len(bench_sketch.SKETCH_FAMILIES)
  assert "- k = 16: time" in text and "target factored step ≤ 1.3× the SGD step" in text
  assert not re.search(r"\bnan\b", text), text  # every number measured
  assert not (tmp_path / "bench_step.md.partial").exists()  # kept only while it runs


def test_bench_objectives_times_every_objective_against_clean():
  result = run_benchmark("experiments.bench_objectives", "--model=tiny", "--repeats=1")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {line[:24].strip(): line.split() for line in result.stdout.splitlines()[2:]}
  assert set(rows) == {"clean", "fgm", "pgd K=3", "pgd K=3 random start", "smart K=1"}
  assert rows["clean"][-1] == "1.00" and all(float(r[-1]) > 0 for r in rows.values())


@pytest.fixture(scope="module")
def tiny_batch():
  model = models.BertForSequenceClassification(models.tiny_config(num_hidden_layers=1))
  params = models.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  data = (rng.integers(1, 100, (8, 16)), np.ones((8, 16), np.int32), rng.integers(0, 2, 8))
  return model, params, data


def test_a_step_that_needs_more_memory_than_is_available_is_not_run(tiny_batch, monkeypatch):
  """Not killed for memory mid-benchmark: the step is reported as not run, with why."""
  model, params, data = tiny_batch
  assert bench_harness.available_bytes() > 0  # this machine's /proc/meminfo
  results = bench_harness.bench(model, params, 8, 16, ("sgd",), 1, 16, 100, data)
  peak = results["sgd"][1]
  assert results["sgd"][0] > 0 and results["sgd"][3] == ""
  monkeypatch.setattr(bench_harness, "available_bytes", lambda: peak / 2)
  results = bench_harness.bench(model, params, 8, 16, ("sgd",), 1, 16, 100, data)
  assert results["sgd"][0] is None
  assert (
      results["sgd"][3] == f"not run: needs ~{peak / GB:.1f} GB, {peak / 2 / GB:.1f} GB available"
  )


def test_a_benchmark_keeps_its_finished_parts_until_it_ends(tmp_path, capsys):
  """While it runs the finished parts are in <output>.partial and the last finished output
  is left as it was; at the end the output is written and the partial file removed."""
  path = tmp_path / "results" / "bench.md"
  output = bench_harness.MarkdownOutput(path)
  path.write_text("the last finished run\n")
  lines = ["# title", "| a |"]
  output.emit(lines, lines[1:])
  assert capsys.readouterr().out == "| a |\n"
  assert output.partial.read_text() == "# title\n| a |\n"
  assert path.read_text() == "the last finished run\n"
  lines += ["| b |"]
  output.emit(lines, lines[2:])
  assert output.partial.read_text() == "# title\n| a |\n| b |\n"
  output.finish(lines)
  assert path.read_text() == "# title\n| a |\n| b |\n" and not output.partial.exists()


def test_sketch_accuracy_is_exact_without_sketched_leaves_and_within_the_bound_with(tiny_batch):
  accuracy = bench_sketch.sketch_accuracy(*tiny_batch, [16, 4096], counts=2, error_counts=6)
  exact, sketched = accuracy[4096], accuracy[16]
  # k beyond every leaf's size: nothing is sketched, so d̂ = d for every filter and weighting.
  assert exact["sketched"] == exact["features"] == 0 and exact["error"] == 0.0
  np.testing.assert_allclose(list(exact["cos"].values()), 1.0, atol=1e-5)
  assert len(exact["cos"]) == 4
  # k = 16 sketches some kernels: an error that is not zero and stays inside its bound.
  assert sketched["sketched"] > 0 and sketched["features"] > 0
  assert 0.0 < sketched["error"] <= sketched["bound"]
  assert 0.0 < sketched["sketched_share"] < 1.0
  assert all(0.5 < c <= 1.0 + 1e-6 for c in sketched["cos"].values()), sketched["cos"]


def test_family_rows_compare_every_family_with_the_library_s(tiny_batch):
  rows = bench_sketch.family_rows(*tiny_batch, [16], repeats=1, seeds=2)
  assert len(rows) == len(bench_sketch.SKETCH_FAMILIES)
  cells = [row.strip("|").split("|") for row in rows]
  assert cells[0][4].strip() == "1.00×"  # times relative to the first family, the library's
  assert all(np.isfinite(float(c[5])) and float(c[5]) > 0 for c in cells)


def test_bench_optimizers_times_the_study_s_steps_for_its_cost_sentence(tmp_path, monkeypatch):
  """experiments/bench_optimizers.py builds each variant's study step (a derived one on the
  filter the tuning chose, its first trial while the tuning has not chosen), times them
  interleaved, and its record becomes the optimizer study's step_cost, its cost table and
  README's cost line."""
  from experiments import bench_optimizers, report, run_process, runs, studies, tuning
  from experiments.configs import smoke
  from experiments.studies import optimizers
  from experiments.studies.core import run_study
  from tests.tiny_sst2 import write_sst2

  monkeypatch.setenv("NEARPROX_GLUE_DIR", str(write_sst2(tmp_path / "glue")))
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  plan, config = smoke.get_plan(), smoke.get_config()
  plan.optimizer_variants = ("sgd_momentum", "adamw", "proximal_ief", "proximal_adamw")
  plan.lr_grid = {"sgd_momentum": (0.01,), "adamw": (1e-4,), "proximal_ief": (0.1, 0.3)}
  plan.lr_grid["proximal_adamw"] = (1e-4,)
  plan.damping_trials = {"proximal_ief": (0.1,), "proximal_adamw": (1.0,)}
  plan.sketch_check_variant = "proximal_ief"
  out = tmp_path / "results" / "smoke"
  # No stored run: every trial is the first; the derived one needs the filter choice; the
  # sketch study's variant is timed again with its sketched Gram.
  sketched = f"proximal_ief{studies.SKETCHED}"
  assert list(bench_optimizers.variant_configs(plan, config, out)) == [
      *plan.optimizer_variants[:3],
      sketched,
  ]
  resolve = tuning.Context.resolve
  monkeypatch.setattr(
      tuning.Context,
      "resolve",
      lambda self, name: "proximal_ief" if name == "best_filter" else resolve(self, name),
  )
  configs = bench_optimizers.variant_configs(plan, config, out)
  label, chained, settings = configs["proximal_adamw"]
  assert label == "proximal SGD, iEF (natural, iEF weights) → AdamW"
  assert (chained.optimizer.name, chained.optimizer.weighting) == ("proximal_adamw", "ief")
  assert settings == "learning_rate 0.0001, damping 1 (first trial: the tuning has not chosen yet)"
  assert configs["proximal_ief"][1].optimizer.learning_rate == 0.1
  label, sketch_config, _ = configs[sketched]
  assert label == f"{configs['proximal_ief'][0]}, sketched Gram (k = {plan.sketch_dim})"
  assert sketch_config.optimizer.sketch_dim == plan.sketch_dim
  assert sketch_config.optimizer.learning_rate == 0.1

  seconds = bench_optimizers.measure(configs, repeats=2, log=lambda _: None)
  assert set(seconds) == set(configs) and all(0 < s < 60 for s in seconds.values())
  record = bench_optimizers.result(plan, configs, seconds, 2, load=(0.5, 0.25))
  assert (record["load_average_at_start"], record["load_average_at_end"]) == (0.5, 0.25)
  rows = {r["variant"]: r for r in record["rows"]}
  assert record["sgd_variant"] == "sgd_momentum" and rows["sgd_momentum"]["ratio_to_sgd"] == 1
  assert rows["proximal_adamw"]["ratio_to_adamw"] == pytest.approx(
      seconds["proximal_adamw"] / seconds["adamw"]
  )
  assert (
      rows[sketched]["sketch_dim"] == plan.sketch_dim and rows["proximal_ief"]["sketch_dim"] is None
  )
  run_process.write_json(out / studies.STEP_COST_FILE, record)

  study = run_study("optimizers", optimizers, tuning.Context(plan, runs.RunStore(config, out)))
  assert study["step_cost"] == record
  table = optimizers.markdown_step_cost(record)
  assert table.count("\n| ") == 1 + len(configs)  # the header row and one per variant
  ief = rows["proximal_ief"]["ratio_to_sgd"]
  assert f"| {ief:.2f}× |" in table
  assert bench_optimizers.markdown(record).endswith(f"times {table}\n")  # the .md it writes
  # The README's cost line: the chosen variant's steps against AdamW's.
  line = report.step_cost_line(record, "proximal_adamw")
  adamw = rows["proximal_adamw"]["ratio_to_adamw"]
  assert f"{adamw:.2f}× (proximal SGD, iEF (natural, iEF weights) → AdamW)" in line
  assert report.step_cost_line(None, "proximal_adamw") == ""


def test_bench_optimizers_takes_the_sketched_step_apart_against_adamw(tmp_path, monkeypatch):
  """The breakdown of the sketched variant's training step: AdamW's step and its own, their
  parts, each with its time, FLOPs and bytes as multiples of AdamW's step, in the markdown."""
  from experiments import bench_optimizers, studies
  from experiments.configs import smoke
  from tests.tiny_sst2 import write_sst2

  monkeypatch.setenv("NEARPROX_GLUE_DIR", str(write_sst2(tmp_path / "glue")))
  plan, config = smoke.get_plan(), smoke.get_config()
  plan.optimizer_variants = ("adamw", "proximal_ief")
  plan.lr_grid = {"adamw": (1e-4,), "proximal_ief": (0.1,)}
  plan.damping_trials = {"proximal_ief": (0.1,)}
  plan.sketch_check_variant = "proximal_ief"
  configs = bench_optimizers.variant_configs(plan, config, tmp_path / "results" / "smoke")
  breakdown = bench_optimizers.sketched_breakdown(configs, repeats=1)
  assert breakdown["variant"] == f"proximal_ief{studies.SKETCHED}"
  rows = {r["part"]: r for r in breakdown["rows"]}
  adamw = rows["AdamW: training step"]
  assert adamw["time_ratio"] == adamw["flops_ratio"] == adamw["bytes_ratio"] == 1
  sketched = rows[f"{configs[breakdown['variant']][0]}: training step"]
  # The tiny model's embedding table dominates: the factored path never forms its gradient.
  assert 0 < sketched["flops_ratio"] and 0 < sketched["bytes_ratio"]
  assert "sketched: the same capture with the iEF weights" in rows
  assert all(r["seconds"] > 0 and r["gflops"] > 0 for r in rows.values())
  record = {
      "mode": "smoke",
      "model": "tiny",
      "task": "sst2",
      "batch_size": 8,
      "max_length": 16,
      "repeats": 1,
      "sgd_variant": None,
      "machine": {"platform": "p", "cpus": 2, "jax": "j", "backend": "cpu", "device_kind": "d"},
      "load_average_at_start": 0.5,
      "command": "c",
      "rows": [
          {"variant": v, "label": label, "settings": "", "step_seconds": 1.0}
          | {"ratio_to_sgd": None, "ratio_to_adamw": 1.0}
          for v, (label, _, _) in configs.items()
      ],
      "breakdown": breakdown,
  }
  text = bench_optimizers.markdown(record)
  assert "load average 0.50 at the start)" in text  # a record from before the end's reading
  record["load_average_at_end"] = 0.25
  text = bench_optimizers.markdown(record)
  assert "load average 0.50 at the start, 0.25 at the end)" in text
  assert f"## Where the time of the step of {configs[breakdown['variant']][0]} goes" in text
  # The steps' table and the breakdown's: a header row and a row per variant and per part.
  assert text.count("\n| ") == (1 + len(configs)) + (1 + len(rows))


def test_bench_optimizers_without_data_says_where_it_looked(tmp_path):
  result = run_benchmark(
      "experiments.bench_optimizers",
      "--mode=smoke",
      f"--out={tmp_path}",
      f"--data_dir={tmp_path / 'no_glue'}",
  )
  assert result.returncode == 1
  assert f"{tmp_path / 'no_glue'}: no SST-2/train.tsv" in result.stderr
  assert "(give --data_dir or $NEARPROX_GLUE_DIR)" in result.stderr
  assert not (tmp_path / "smoke").exists()  # nothing written


def test_bench_step_translation_row_on_a_tiny_encoder_decoder():
  # In a subprocess: bench_step defines absl flags that other modules of the suite
  # (experiments.reproduce) define too.
  code = (
      "import json; from absl import flags; from experiments import bench_step; "
      "flags.FLAGS(['bench_step']); "
      "print(json.dumps(bench_step.translation_rows(40, 1, 16, 4, 8, ('sgd', 'factored'), 1)))"
  )
  result = subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, "XLA_FLAGS": ""},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(result.stdout.strip().splitlines()[-1])
  assert [r.split(" | ")[1] for r in rows] == ["(i) SGD", "(ii) proximal, factored (default)"]
  assert all(r.startswith("| Translation 1+1 layers, d=16, V=40") for r in rows)
  assert all("ms" in r and "GB" in r for r in rows)  # timed, with FLOPs and memory columns
