"""The benchmarks' own code on tiny models: experiments/bench_sketch.py (bench_step's sketch
section) and experiments/bench_workers.py."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import bench_sketch
from nearprox.text import models


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
def test_bench_workers_compares_one_process_with_pinned_ones(tmp_path):
  config = models.tiny_config(num_hidden_layers=1, max_position_embeddings=64)  # T = 64
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0))
  tokenizer = models.load_tokenizer(models.minilm_dir())
  path = models.save_pretrained(model, params, tokenizer, tmp_path / "tiny")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.bench_workers", f"--model={path}", "--steps=1"],
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, "XLA_FLAGS": ""},  # one host device per probe, as in a study
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r.split("|")[1].strip(): r for r in result.stdout.splitlines() if r.startswith("| ")}
  for step in ("sgd", "factored"):
    cells = [c.strip() for c in rows[step].strip("|").split("|")]
    assert cells[3] == "2" and float(cells[4].rstrip("×")) > 0, rows[step]
