"""Multi-task training (issue 41): the task mix, mixed batches, one encoder with a head per
task, factored == vmap per-example gradients across heads, PCGrad in the chain, the CLI."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import nearprox
from experiments import runs
from experiments.configs import default
from experiments.configs import multitask as multitask_config
from nearprox import factored_grads, spectral_filter
from nearprox.text import data, models, objectives
from nearprox.training import optimizers, task_io
from tests.tiny_sst2 import write_mrpc, write_sst2

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "experiments" / "configs" / "tiny.py"
HEADS = (("sst2", 2), ("mrpc", 2), ("tweets", 3))


# ------------------------------------------------------------------------------ the task mix


def test_task_probabilities_follow_the_temperature_rule():
  sizes = [67349, 3668, 29749]
  np.testing.assert_allclose(data.task_probabilities(sizes, 1.0), np.array(sizes) / sum(sizes))
  root = np.sqrt(sizes)
  np.testing.assert_allclose(data.task_probabilities(sizes, 2.0), root / root.sum())
  np.testing.assert_allclose(data.task_probabilities(sizes, math.inf), [1 / 3] * 3)
  np.testing.assert_allclose(data.task_probabilities([10**9, 1], 1e-3), [1.0, 0.0])  # no overflow
  for bad in (0.0, -1.0, float("nan"), "2"):
    with pytest.raises(ValueError, match="temperature"):
      data.task_probabilities(sizes, bad)


def synthetic_arrays(sizes):
  """Training rows of len(sizes) tasks in one set of arrays: ``row`` = the row's own index."""
  task_ids = np.concatenate([np.full(n, t, np.int32) for t, n in enumerate(sizes)])
  return {"row": np.arange(len(task_ids)), "task_ids": task_ids}


def draws(arrays, probabilities, steps, batch_size=32, seed=0, **kwargs):
  batches = data.mixed_batches(arrays, probabilities, batch_size, seed=seed, **kwargs)
  return [next(batches) for _ in range(steps)]


def test_mixed_batches_sample_tasks_by_the_rule():
  """48,000 draws: each task's frequency lies within 5 binomial standard deviations of the
  rule's p_t at T = 2, and the same frequencies lie far outside that band for T = 1."""
  sizes = [5000, 200, 1200]
  arrays = synthetic_arrays(sizes)
  probabilities = data.task_probabilities(sizes, 2.0)
  batches = draws(arrays, probabilities, steps=1500)
  tasks = np.concatenate([b["task_ids"] for b in batches])
  frequencies = np.bincount(tasks, minlength=3) / len(tasks)
  band = 5 * np.sqrt(probabilities * (1 - probabilities) / len(tasks))
  np.testing.assert_array_less(np.abs(frequencies - probabilities), band)
  proportional = data.task_probabilities(sizes, 1.0)
  assert (np.abs(frequencies - proportional) > 3 * band).all()  # the test can fail
  # Every row carries its own task id and its own data: index is the row, mask is 1.
  for batch in batches[:5]:
    np.testing.assert_array_equal(batch["row"], batch["index"])
    np.testing.assert_array_equal(batch["task_ids"], arrays["task_ids"][batch["index"]])
    assert (batch["mask"] == 1).all()


def test_within_a_task_rows_come_without_replacement_epoch_by_epoch():
  sizes = [300, 40]
  arrays = synthetic_arrays(sizes)
  rows = np.concatenate([b["index"] for b in draws(arrays, [0.5, 0.5], steps=20, batch_size=16)])
  small = rows[arrays["task_ids"][rows] == 1]
  assert len(small) >= 120
  epochs = [small[i : i + 40] for i in range(0, 120, 40)]
  for epoch in epochs:  # each pass over the small task is a permutation of its 40 rows
    np.testing.assert_array_equal(np.sort(epoch), np.arange(300, 340))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_mixed_batches_resume_at_any_step_and_split_over_hosts():
  arrays = synthetic_arrays([50, 30, 20])
  probabilities = data.task_probabilities([50, 30, 20], 1.0)
  straight = draws(arrays, probabilities, steps=12, batch_size=8, seed=3)
  resumed = draws(arrays, probabilities, steps=5, batch_size=8, seed=3, start_step=7)
  for a, b in zip(straight[7:], resumed):
    np.testing.assert_array_equal(a["index"], b["index"])
  hosts = [
      draws(arrays, probabilities, 4, batch_size=8, seed=3, process_index=i, process_count=2)
      for i in range(2)
  ]
  for step in range(4):
    together = np.concatenate([hosts[0][step]["index"], hosts[1][step]["index"]])
    np.testing.assert_array_equal(together, straight[step]["index"])
  other_seed = draws(arrays, probabilities, steps=1, batch_size=8, seed=4)[0]
  assert not np.array_equal(other_seed["index"], straight[0]["index"])


@pytest.mark.parametrize(
    "tasks,temperature,match",
    [
        (("sst2",), 2.0, "at least two tasks"),
        (("sst2", "sst2"), 2.0, "must differ"),
        (("sst2", "nope"), 2.0, "unknown task 'nope'"),
        (("sst2", "squad"), 2.0, "not classification"),
        ("sst2", 2.0, "list of names"),
        (("sst2", "mrpc"), 0.0, "temperature"),
    ],
)
def test_bad_task_lists_are_clear_errors(tasks, temperature, match):
  with pytest.raises(ValueError, match=match):
    data.get_multitask(tasks, temperature)


def test_multitask_config_errors_come_before_any_loading():
  config = multitask_config.get_config()
  config.holdout_examples = 100
  with pytest.raises(ValueError, match="holdout_examples"):
    task_io.check_config(config, task_io.get_task(config))
  single = default.get_config()
  single.optimizer.name = "pcgrad_adamw"
  with pytest.raises(ValueError, match="needs config.task='multitask'"):
    optimizers.create_optimizer(single, 10, None)


def test_scores_report_every_task_and_the_mean_of_the_official_metrics():
  task = data.get_multitask(("sst2", "mrpc", "tweets"), 2.0)
  assert task.heads == HEADS and task.num_labels == 3
  by_task = {
      "sst2": {"accuracy": 0.9},
      "mrpc": {"f1": 0.8, "accuracy": 0.7},
      "tweets": {"accuracy": 0.6, "macro_f1": 0.5},
  }
  scores = task.scores(by_task)
  assert scores["mrpc/f1"] == 0.8 and scores["tweets/macro_f1"] == 0.5
  assert scores["mean"] == pytest.approx((0.9 + 0.8 + 0.6) / 3)
  assert "mean" not in task.scores({"tweets": by_task["tweets"]})  # a split without every task


# ------------------------------------------------------------------------------ the model


def tiny_multitask(batch=6, length=8, seed=0):
  model = models.BertForMultiTaskClassification(models.tiny_config(), heads=HEADS)
  params = models.init_params(model, jax.random.key(seed), 2, length)
  rng = np.random.default_rng(seed)
  inputs = {
      "input_ids": jnp.asarray(rng.integers(1, 100, (batch, length)), jnp.int32),
      "attention_mask": jnp.asarray(np.arange(length) < rng.integers(3, length + 1, (batch, 1))),
      "token_type_ids": jnp.zeros((batch, length), jnp.int32),
      "task_ids": jnp.asarray(np.arange(batch) % 3, jnp.int32),
  }
  inputs["attention_mask"] = inputs["attention_mask"].astype(jnp.int32)
  sizes = np.array([size for _, size in HEADS])[np.asarray(inputs["task_ids"])]
  inputs["labels"] = jnp.asarray(rng.integers(0, sizes), jnp.int32)
  return model, params, inputs


def test_each_example_gets_its_own_tasks_head():
  """Row i's logits are those of ``task_classifier`` (the encoder and task t_i's head alone)
  on example i; classes its task lacks get NO_CLASS; its loss is its own head's
  cross-entropy."""
  model, params, inputs = tiny_multitask()
  logits = models.bert_logits_fn(model)(params, inputs)
  tokens = [inputs[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
  for t, (name, size) in enumerate(HEADS):
    single, single_params = models.task_classifier(model, params, name)
    alone = single.apply({"params": single_params}, *tokens).logits
    rows = np.flatnonzero(np.asarray(inputs["task_ids"]) == t)
    np.testing.assert_allclose(logits[rows, :size], alone[rows], rtol=1e-5, atol=1e-6)
    assert (logits[rows, size:] == models.multitask.NO_CLASS).all()
  loss_fn = objectives.make_per_example_loss(
      models.bert_logits_fn(model), objectives.ObjectiveConfig()
  )
  expected = [
      -jax.nn.log_softmax(logits[i, : HEADS[int(inputs["task_ids"][i])][1]])[inputs["labels"][i]]
      for i in range(len(logits))
  ]
  np.testing.assert_allclose(loss_fn(params, inputs), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="needs task_ids"):
    model.apply({"params": params}, inputs["input_ids"])


def test_factored_equals_vmap_across_heads_with_dropout():
  """The train step's loss (dropout on, per-example keys): no leaf takes the fallback;
  per-example losses, the Gram and PCGrad's direction agree between the factored and the vmap
  gradients; a head's gradient is 0 on the other tasks' examples."""
  model, params, inputs = tiny_multitask()
  logits_fn = models.bert_logits_fn(model, deterministic=False)
  loss_fn = objectives.make_loss_at_perturbation(logits_fn, objectives.ObjectiveConfig())
  keys = jax.random.split(jax.random.key(5), 6)
  delta = jnp.zeros((6, 8, model.config.hidden_size))
  kinds = factored_grads.leaf_kinds(loss_fn, params, inputs, keys, delta)
  assert "fallback" not in kinds.values() and "unused" not in kinds.values(), kinds
  assert {kinds[f"['classifier']['{name}']['kernel']"] for name, _ in HEADS} == {"kernel"}
  mask = jnp.array([1, 1, 1, 1, 0, 1], jnp.float32)
  pcgrad = nearprox.pcgrad_aggregate(3)

  @jax.jit
  def both(params):  # one compilation for everything compared
    out = {}
    for method in ("factored", "vmap"):
      losses, grads = nearprox.per_example_value_and_grads(
          loss_fn, params, inputs, keys, delta, method=method
      )
      update = pcgrad.update(grads, pcgrad.init(params), task_ids=inputs["task_ids"], mask=mask)
      out[method] = (losses, spectral_filter.gram_matrix(grads), update[0])
    out["heads"] = {name: grads["classifier"][name]["kernel"] for name, _ in HEADS}
    return out

  out = both(params)
  (losses_f, gram_f, update_f), (losses_v, gram_v, update_v) = out["factored"], out["vmap"]
  np.testing.assert_allclose(losses_f, losses_v, rtol=1e-5)
  # The Gram is what every filter reads, PCGrad's direction what the task sums give.
  np.testing.assert_allclose(gram_f, gram_v, rtol=1e-4, atol=1e-7)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(update_v))
  for a, b in zip(jax.tree.leaves(update_f), jax.tree.leaves(update_v)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6 * scale)
  for t, (name, _) in enumerate(HEADS):  # the vmap rows of each head's kernel
    rows = np.asarray(out["heads"][name])
    other = np.asarray(inputs["task_ids"]) != t
    assert (rows[other] == 0).all() and (rows[~other] != 0).any()


def test_pcgrad_adamw_learning_rate_is_an_input_of_the_compiled_update():
  model, params, inputs = tiny_multitask()
  del model

  def lowered(learning_rate):
    config = multitask_config.get_config()
    config.optimizer.name = "pcgrad_adamw"
    config.optimizer.learning_rate = learning_rate
    tx, per_example = optimizers.create_optimizer(config, 20, None)
    assert per_example
    grads = jax.tree.map(lambda x: jnp.ones((6,) + x.shape), params)
    update = lambda g, s: tx.update(g, s, params, task_ids=inputs["task_ids"])
    return jax.jit(update).lower(grads, tx.init(params)).as_text()

  assert lowered(1e-4) == lowered(3e-3)


def test_pcgrad_task_weighting_reaches_the_aggregate_and_bad_values_are_errors(monkeypatch):
  seen = []
  real = nearprox.pcgrad_aggregate

  def recording(*args, **kwargs):
    seen.append(kwargs["task_weighting"])
    return real(*args, **kwargs)

  monkeypatch.setattr(nearprox, "pcgrad_aggregate", recording)
  config = multitask_config.get_config()
  config.optimizer.name = "pcgrad_adamw"
  for weighting in ("mean", "batch"):
    config.optimizer.pcgrad_task_weighting = weighting
    optimizers.create_optimizer(config, 20, None)
  assert seen == ["mean", "batch"]
  config.optimizer.pcgrad_task_weighting = "equal"
  with pytest.raises(ValueError, match="pcgrad_task_weighting must be one of"):
    optimizers.create_optimizer(config, 20, None)
  config.optimizer.name, config.optimizer.pcgrad_task_weighting = "adamw", "mean"
  with pytest.raises(ValueError, match="configures name='pcgrad_adamw'"):
    optimizers.create_optimizer(config, 20, None)


def test_a_multitask_run_key_is_the_key_of_its_stored_config():
  """``tasks`` is a tuple; a run record stores it as a JSON list: the key must not change."""
  config = runs.apply_overrides(default.get_config(), {"task": "multitask"})
  stored = ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))
  assert runs.run_key(stored, 1, None) == runs.run_key(config, 1, None)
  other = runs.apply_overrides(default.get_config(), {"tasks": ("sst2", "mrpc")})
  assert runs.run_key(other, 1, None) != runs.run_key(default.get_config(), 1, None)


# ------------------------------------------------------------------------------ the CLI


def test_cli_trains_a_multitask_model_and_exports_a_directory_per_head(tmp_path):
  """`python -m nearprox.training.train` with task=multitask (tiny BERT, synthetic SST-2 and
  MRPC, the real tweets) and PCGrad → AdamW: per-task metrics and their mean in report.json,
  PCGrad's statistics logged, and each exported head scores its task as the report says."""
  glue = write_mrpc(write_sst2(tmp_path / "glue"), n_train=64, n_dev=24)
  workdir = tmp_path / "run"
  command = [
      sys.executable,
      "-m",
      "nearprox.training.train",
      f"--config={TINY_CONFIG}",
      f"--workdir={workdir}",
      "--config.task=multitask",
      f"--config.data_dir={glue}",
      "--config.task_temperature=1000",  # about uniform: every task in every batch
      "--config.optimizer.name=pcgrad_adamw",
      "--config.optimizer.learning_rate=1e-3",
      "--config.num_train_steps=4",
      "--config.max_eval_examples=32",
      "--config.export_hf=True",
      "--config.parallel=jit",
  ]
  env = os.environ | {"PYTHONPATH": str(REPO), "NEARPROX_CACHE_DIR": str(tmp_path / "cache")}
  result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  assert report["task"] == "multitask" and report["tasks"] == ["sst2", "mrpc", "tweets"]
  expected = {"sst2/accuracy", "mrpc/f1", "mrpc/accuracy", "tweets/accuracy", "tweets/macro_f1"}
  assert set(report["dev"]) == expected | {"mean"}
  assert set(report["test"]) == {"tweets/accuracy", "tweets/macro_f1"}
  assert report["dev"]["mean"] == pytest.approx(
      np.mean([report["dev"][k] for k in ("sst2/accuracy", "mrpc/f1", "tweets/accuracy")])
  )
  assert {k: sum(v) for k, v in report["predicted_classes"]["dev"].items()} == {
      "sst2": 32,
      "mrpc": 24,
      "tweets": 32,
  }
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("train/pcgrad/conflict_fraction" in r for r in rows)
  assert any("dev/mean" in r for r in rows)
  for name, metric in (("sst2", "accuracy"), ("mrpc", "accuracy")):
    model, params, tokenizer = models.load_pretrained(report["hf_models"][name], num_labels=2)
    split = data.load_task(name, "dev", glue)
    encoded = data.encode(split, tokenizer, 16)
    keep = data.eval_subset(len(encoded), 32, 0)
    keep = np.arange(len(encoded)) if keep is None else keep
    tokens = [getattr(encoded, k)[keep] for k in ("input_ids", "attention_mask", "token_type_ids")]
    logits = model.apply({"params": params}, *tokens).logits
    accuracy = np.mean(np.argmax(logits, -1) == encoded.labels[keep])
    assert accuracy == pytest.approx(report["dev"][f"{name}/{metric}"], abs=1e-6)


# ------------------------------------------------------------------------------ the study


MULTITASK_DROP = {"adamw": 0.02, "pcgrad_adamw": 0.01, "proximal_adamw": 0.0, "proximal_sgd": 0.015}
TASK_SCORE = {"sst2": 0.88, "mrpc": 0.85, "tweets": 0.80}


def study_score(task: str, overrides) -> float:
  """Single-task: ``TASK_SCORE`` (+0.002 per seed); multi-task: minus ``MULTITASK_DROP`` of
  the optimizer. The tuning (held-out examples) ranks iEF → AdamW first among the proximal
  variants (test_experiments.ablation_score)."""
  from tests.test_experiments import ablation_score

  if overrides.get("holdout_examples"):
    return ablation_score(overrides)
  name = overrides["optimizer.name"]
  drop = MULTITASK_DROP[name] if overrides.get("task") == data.MULTITASK else 0.0
  return TASK_SCORE[task] - drop + 0.002 * overrides["seed"]


def multitask_context(out):
  """The full plan over a synthetic store whose records carry every task's metrics."""
  from experiments import tuning
  from experiments.configs import full
  from experiments.reproduce import plan_with_defaults
  from tests.test_experiments import SyntheticStore, ablation_score

  class Store(SyntheticStore):

    def run(self, label, overrides, devices=1, attack=None):
      record = super().run(label, overrides, devices, attack)
      report = record["report"]
      if overrides.get("task") == data.MULTITASK:
        for split in ("dev", "test"):
          tasks = [t for t in TASK_SCORE if split == "dev" or t == "tweets"]
          report[split] = {
              f"{t}/{m}": study_score(t, overrides)
              for t in tasks
              for m in data.get_task(t).metric_names
          }
          report["predicted_classes"][split] = {t: [5, 5] for t in tasks}
      elif overrides.get("task") in TASK_SCORE:
        task = data.get_task(overrides["task"])
        for split in ("dev", "test"):
          report[split] = {m: study_score(task.name, overrides) for m in task.metric_names}
      return record

  def tuning_score(overrides):  # the held-out scores the tuning ranks (the rest is replaced)
    return ablation_score(overrides) if overrides.get("holdout_examples") else 0.0

  return tuning.Context(plan_with_defaults(full.get_plan()), Store(out, tuning_score))


def test_multitask_study_compares_each_task_with_the_single_task_runs(tmp_path):
  from experiments import studies
  from experiments.studies import core

  ctx = multitask_context(tmp_path)
  module = studies.REGISTRY["multitask"]
  study = core.run_study("multitask", module, ctx)
  rows = study["tables"]["multitask"]
  assert [(r["optimizer"], r["training"]) for r in rows] == [
      ("adamw", "single-task"),
      ("adamw", "multi-task"),
      ("pcgrad_adamw", "multi-task"),
      ("proximal_adamw", "single-task"),
      ("proximal_adamw", "multi-task"),
      ("proximal_sgd", "single-task"),
      ("proximal_sgd", "multi-task"),
  ]
  # The multi-task runs: the study budget, the tuned settings; PCGrad at AdamW's choice.
  asked = [o for label, o, _ in ctx.store.calls if label.startswith("multitask:")]
  assert len(asked) == 12 and {o["seed"] for o in asked} == {0, 1, 2}
  adamw_rate = ctx.best_trial("adamw")["trial"]["optimizer.learning_rate"]
  pcgrad = [o for o in asked if o["optimizer.name"] == "pcgrad_adamw"]
  assert len(pcgrad) == 3 and {o["optimizer.learning_rate"] for o in pcgrad} == {adamw_rate}
  assert all(o["task"] == "multitask" and "tasks" not in o for o in asked)  # config defaults
  assert ctx.group("multitask", data.MULTITASK, "adamw").collapsed_seeds() == 0  # per task
  by = {(r["optimizer"], r["training"]): r for r in rows}
  single, multi = by[("adamw", "single-task")], by[("adamw", "multi-task")]
  expected_mean = np.mean(list(TASK_SCORE.values())) + 0.002  # seeds 0, 1, 2
  assert single["mean"] == pytest.approx(expected_mean)
  assert multi["mean"] == pytest.approx(expected_mean - 0.02)
  assert multi["mrpc"] == pytest.approx(0.85 - 0.02 + 0.002)
  assert single["mean_std"] == pytest.approx(0.002) and multi["seeds"] == 3
  # The verdict gets the tuned proximal variant vs AdamW on the multi-task mean only.
  verdict = [c for c in study["comparisons"] if c["preselected"]]
  assert [(c["subject"], c["baseline"], c["outcome"]) for c in verdict] == [
      (ctx.label("proximal_adamw"), "AdamW", "ahead")
  ]
  assert len(study["comparisons"]) == 4 + 4  # multi vs single per optimizer; four pairs
  summary = study["tables"]["summary"]
  assert all(tuple(r) == core.SUMMARY_FIELDS for r in summary)
  assert {(r["study"], r["condition"]) for r in summary} == {
      ("multitask", "shared encoder, mixed batches (T = 2)")
  }
  assert [r["task"] for r in summary[:4]] == [
      "multitask:sst2",
      "multitask:mrpc",
      "multitask:tweets",
      "multitask:mean",
  ]
  assert summary[2]["split"] == "test" and summary[1]["metric"] == "f1"
  text = module.markdown(study)
  assert "| PCGrad → AdamW | multi-task |" in text
  assert f"| {100 * (expected_mean - 0.02):.1f} ± 0.2 |" in text
  assert module.plots(study, tmp_path) == [tmp_path / "multitask.png"]
