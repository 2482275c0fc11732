"""The benchmarks' own code on tiny models: experiments/bench_step.py and
bench_objectives.py end to end, experiments/bench_sketch.py (bench_step's sketch section)
and experiments/bench_workers.py."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import bench_sketch
from nearprox.text import models


@pytest.fixture(scope="module")
def tiny_saved_model(tmp_path_factory):
  """A one-layer BERT saved like MiniLM (T = 64 fits), for the benchmarks' --model."""
  config = models.tiny_config(num_hidden_layers=1, max_position_embeddings=64)
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0))
  tokenizer = models.load_tokenizer(models.minilm_dir())
  return models.save_pretrained(model, params, tokenizer, tmp_path_factory.mktemp("tiny"))


def run_benchmark(module, *flags):
  return subprocess.run(
      [sys.executable, "-m", module, *flags],
      capture_output=True,
      text=True,
      timeout=600,
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


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin two probes")
def test_bench_workers_compares_one_process_with_pinned_ones(tiny_saved_model):
  result = run_benchmark("experiments.bench_workers", f"--model={tiny_saved_model}", "--steps=1")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r.split("|")[1].strip(): r for r in result.stdout.splitlines() if r.startswith("| ")}
  for step in ("sgd", "factored"):
    cells = [c.strip() for c in rows[step].strip("|").split("|")]
    assert cells[3] == "2" and float(cells[4].rstrip("×")) > 0, rows[step]
