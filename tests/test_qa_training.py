"""SQuAD through the training loop: tiny-model runs, the span head's per-example gradients,
iEF weights, FGM, the Hugging Face export, padded and sharded evaluation."""

import collections
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nearprox
from experiments.configs import default, squad, tiny
from nearprox import factored_grads, spectral_filter
from nearprox.text import data, losses, models, objectives, qa
from nearprox.training import optimizers, parallel, task_io, train
from tests.squad_people import PEOPLE, document, paragraph, write_squad

MAX_LENGTH, DOC_STRIDE = 48, 16


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory):
  return write_squad(tmp_path_factory.mktemp("squad"))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tokenizer():
  return models.load_tokenizer(models.minilm_dir())


def qa_config(squad_dir, **overrides):
  """experiments/configs/tiny.py on the SQuAD files in ``squad_dir``; dotted-key overrides."""
  config = tiny.get_config()
  config.lock()
  config.update_from_flattened_dict(
      {
          "task": "squad",
          "data_dir": str(squad_dir),
          "max_length": MAX_LENGTH,
          "doc_stride": DOC_STRIDE,
          "parallel": "jit",
          "eval_batch_size": 6,
          "num_train_steps": 3,
          "log_every": 1,
          "checkpoint_every": 100,
          **overrides,
      }
  )
  return config


def dev_split(squad_dir, tokenizer):
  questions = data.load_squad("dev", squad_dir)
  return task_io.QAEvalSplit(
      questions, data.encode_squad(questions, tokenizer, MAX_LENGTH, DOC_STRIDE)
  )


def full_logits(model, params, arrays):
  """[F, T] start and end logits of the whole split in one call (no batching, no padding)."""
  out = model.apply(
      {"params": params}, arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"]
  )
  return np.asarray(out.start_logits), np.asarray(out.end_logits)


def scores_of(model, params, split):
  start, end = full_logits(model, params, split.arrays())
  predictions = qa.postprocess_predictions(split.questions, split.features, start, end)
  return qa.evaluate_predictions(split.questions, predictions)


def train_losses(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r["train/loss"] for r in records if "train/loss" in r]


def flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


# ------------------------------------------------------------------------------ the runs


@pytest.mark.parametrize("optimizer", ["proximal_sgd", "adamw"])
def test_tiny_qa_run_reports_the_scores_of_its_final_params(
    squad_dir, tokenizer, tmp_path, optimizer
):
  """A few steps on 12 questions; the reported dev F1 / exact match are those of the final
  parameters on all 8 dev questions (their 16 windows evaluated in padded batches of 6)."""
  overrides = {"optimizer.name": optimizer, "optimizer.per_example": "factored"}
  if optimizer == "adamw":
    overrides["optimizer.learning_rate"] = 1e-3
  config = qa_config(squad_dir, **overrides)
  report = train.train_and_evaluate(config, tmp_path)
  assert report["task"] == "squad" and report["steps"] == 3 and not report["preempted"]
  assert list(report["dev"]) == ["f1", "exact_match"]
  assert report["predicted_classes"] == {"dev": []}
  losses = train_losses(tmp_path)
  assert len(losses) == 3 and np.all(np.isfinite(losses))
  model, _, _ = task_io.create_model(config, 0, jax.random.key(0))
  assert isinstance(model, models.BertForQuestionAnswering)
  split = dev_split(squad_dir, tokenizer)
  assert len(split.features) % config.eval_batch_size  # the last batch is padded
  expected = scores_of(model, report["params"], split)
  assert report["dev"] == pytest.approx(expected, abs=1e-12)
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["dev"] == report["dev"]


def test_fgm_objective_trains_on_the_span_loss(squad_dir, tmp_path):
  """The first logged loss is the FGM objective of make_per_example_loss(task="qa") at the
  initial parameters on the first batch, and exceeds the clean loss there."""
  config = qa_config(
      squad_dir,
      **{"objective.kind": "fgm", "objective.epsilon": 1.0, "num_train_steps": 2},
  )
  report = train.train_and_evaluate(config, tmp_path)
  logged = train_losses(tmp_path)[0]
  assert set(report["dev"]) == {"f1", "exact_match"}

  rng = jax.random.key(config.seed)
  model, params, tokenizer = task_io.create_model(config, 0, jax.random.fold_in(rng, 1))
  splits = task_io.load_splits(config, tokenizer)
  batch = next(train.train_batches(splits["train"], config, data.get_task(config.task), 0))
  inputs = {k: jnp.asarray(batch[k]) for k in task_io.QA_INPUT_KEYS}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, 0), i))(batch["index"])
  logits_fn = models.bert_logits_fn(model)
  mask = batch["mask"]

  def mean_loss(objective):
    loss_fn = objectives.make_per_example_loss(
        logits_fn, objective, task="qa", hidden_size=model.config.hidden_size
    )
    return float(np.sum(loss_fn(params, inputs, keys) * mask) / np.sum(mask))

  fgm = mean_loss(train.objective_config(config))
  clean = mean_loss(objectives.ObjectiveConfig())
  assert logged == pytest.approx(fgm, rel=1e-4)
  # sum: clean + adversarial (≥ clean at ε = 1), so more than twice the clean loss
  assert fgm > 2 * clean


def test_shard_map_over_devices_agrees_with_jit(squad_dir, tmp_path):
  assert jax.device_count() == 8
  results = {}
  for mode in ("jit", "shard_map"):
    config = qa_config(
        squad_dir,
        **{
            "parallel": mode,
            "num_train_steps": 2,
            "optimizer.gram": "global",
            "eval_batch_size": 8,  # one window per device
        },
    )
    results[mode] = train.train_and_evaluate(config, tmp_path / mode)
  np.testing.assert_allclose(
      flat(results["shard_map"]["params"]), flat(results["jit"]["params"]), rtol=1e-4, atol=1e-6
  )
  assert results["shard_map"]["dev"] == pytest.approx(results["jit"]["dev"], abs=1e-12)


def test_hf_export_loads_in_transformers_with_the_same_logits(squad_dir, tokenizer, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = qa_config(
      squad_dir, **{"optimizer.name": "sgd", "num_train_steps": 1, "export_hf": True}
  )
  report = train.train_and_evaluate(config, tmp_path)
  torch_model = transformers.BertForQuestionAnswering.from_pretrained(report["hf_model"]).eval()
  model, _, _ = task_io.create_model(config, 0, jax.random.key(0))
  arrays = dev_split(squad_dir, tokenizer).arrays()
  start, end = full_logits(model, report["params"], arrays)
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(arrays[k], dtype=torch.long) for k in task_io.TOKEN_KEYS})
  np.testing.assert_allclose(start, ref.start_logits.numpy(), atol=1e-4)
  np.testing.assert_allclose(end, ref.end_logits.numpy(), atol=1e-4)
  assert np.abs(start).max() > 1e-3  # not a trivially zero head


# ------------------------------------------------------------------------------ the pieces


def qa_batch(squad_dir, tokenizer, size=6):
  """``size`` training windows, the last row masked (a padded copy)."""
  questions = data.load_squad("train", squad_dir)
  arrays = data.encode_squad(questions, tokenizer, MAX_LENGTH, DOC_STRIDE).arrays()
  batch = {k: jnp.asarray(v[:size]) for k, v in arrays.items()}
  batch["mask"] = jnp.asarray(np.arange(size) < size - 1, jnp.float32)
  batch["index"] = jnp.arange(size, dtype=jnp.int32)
  return batch


def tiny_qa_model(tokenizer, seed=0):
  config = models.tiny_config(vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
  model = models.BertForQuestionAnswering(config)
  params = models.init_params(model, jax.random.key(seed), 2, MAX_LENGTH)
  # A larger head spreads the span distributions, so the examples' iEF weights differ.
  params["qa_outputs"]["kernel"] = 50.0 * params["qa_outputs"]["kernel"]
  return model, params


def test_factored_per_example_gradients_equal_vmap_on_the_qa_head(squad_dir, tokenizer):
  model, params = tiny_qa_model(tokenizer)
  batch = qa_batch(squad_dir, tokenizer)
  inputs = {k: batch[k] for k in task_io.QA_INPUT_KEYS}
  keys = jax.random.split(jax.random.key(1), len(batch["mask"]))
  objective = objectives.ObjectiveConfig()
  loss_fn = objectives.make_loss_at_perturbation(models.bert_logits_fn(model), objective, task="qa")
  delta = jnp.zeros((*inputs["input_ids"].shape, model.config.hidden_size))
  kinds = factored_grads.leaf_kinds(loss_fn, params, inputs, keys, delta)
  assert kinds["['qa_outputs']['kernel']"] == "kernel"
  assert "fallback" not in collections.Counter(kinds.values())

  @functools.partial(jax.jit, static_argnames="method")
  def grams(method):
    losses, grads = nearprox.per_example_value_and_grads(
        loss_fn, params, inputs, keys, delta, method=method
    )
    return losses, spectral_filter.gram_matrix(grads)

  losses_f, gram_f = grams("factored")
  losses_v, gram_v = grams("vmap")
  np.testing.assert_allclose(losses_f, losses_v, rtol=1e-5)
  np.testing.assert_allclose(gram_f, gram_v, rtol=1e-4, atol=1e-6 * np.abs(gram_v).max())
  # The loss is the span loss: ½(CE(start) + CE(end)) at the labelled tokens.
  start, end = models.bert_logits_fn(model)(params, inputs)
  by_hand = 0.5 * (
      optax.softmax_cross_entropy_with_integer_labels(start, inputs["start_positions"])
      + optax.softmax_cross_entropy_with_integer_labels(end, inputs["end_positions"])
  )
  np.testing.assert_allclose(losses_v, by_hand, rtol=1e-5)


def test_train_step_with_ief_weights_on_qa(squad_dir, tokenizer):
  """The QA step with weighting="ief" filters the per-example gradients with the span-loss
  iEF weights ¼(‖softmax(s) − e_start‖² + ‖softmax(e) − e_end‖²) at the clean logits."""
  model, params = tiny_qa_model(tokenizer)
  batch = qa_batch(squad_dir, tokenizer)
  task = data.get_task("squad")
  logits_fn = models.bert_logits_fn(model)
  objective = objectives.ObjectiveConfig()
  config = default.get_config()
  config.update_from_flattened_dict(
      {
          "optimizer.weighting": "ief",
          "optimizer.momentum": 0.0,
          "optimizer.filter": "natural",
          "optimizer.warmup_fraction": 0.0,
      }
  )
  tx, per_example = optimizers.create_optimizer(config, 10, None)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  step = functools.partial(
      train.train_step,
      perturbation_fn=functools.partial(
          objectives.adversarial_perturbation, logits_fn, objective, task="qa", hidden_size=32
      ),
      loss_fn=objectives.make_loss_at_perturbation(
          logits_fn, objective, task="qa", with_ief_weights=True
      ),
      tx=tx,
      per_example=per_example,
      per_example_method="factored",
      axis_name=None,
      loss_returns_weights=True,
      input_keys=task_io.input_keys(task),
  )
  new_state, metrics = jax.jit(step)(state, batch, jax.random.key(3))

  @jax.jit
  def by_hand(params):
    inputs = {k: batch[k] for k in task_io.QA_INPUT_KEYS}
    start, end = logits_fn(params, inputs)
    residual = lambda z, y: jnp.sum(
        jnp.square(jax.nn.softmax(z) - jax.nn.one_hot(y, z.shape[-1])), -1
    )
    weights = 0.25 * (
        residual(start, inputs["start_positions"]) + residual(end, inputs["end_positions"])
    )
    grads = nearprox.per_example_grads(
        lambda p, b: losses.task_loss("qa", logits_fn(p, b), b),
        params,
        inputs,
        method="vmap",
    )
    steps = [
        tx.update(grads, tx.init(params), params, mask=batch["mask"], example_weights=w)[0]
        for w in (weights, None)
    ]
    return [optax.apply_updates(params, u) for u in steps], weights

  (want, uniform), weights = by_hand(params)
  assert np.ptp(np.asarray(weights)[:-1]) > 0.1 * np.max(weights)  # the weights matter here
  scale = np.abs(flat(want) - flat(params)).max()
  np.testing.assert_allclose(flat(new_state.params), flat(want), rtol=1e-4, atol=1e-4 * scale)
  assert np.abs(flat(uniform) - flat(want)).max() > 1e-2 * scale
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("batch_size", [6, 5])
def test_evaluation_of_padded_batches_equals_postprocessing_of_the_full_logits(
    squad_dir, tokenizer, batch_size
):
  config = qa_config(squad_dir)
  task = data.get_task("squad")
  model, params, _ = task_io.create_model(config, 0, jax.random.key(0))
  params = jax.tree.map(lambda x: x, params)
  params["qa_outputs"]["kernel"] = 50.0 * params["qa_outputs"]["kernel"]  # varied answers
  split = dev_split(squad_dir, tokenizer)
  num_windows = len(split.features)
  assert num_windows > len(split.questions) and num_windows % batch_size
  runner = parallel.Runner("jit")
  logits_fn = models.bert_logits_fn(model)
  runner.compile(lambda *a: None, lambda s, b: train.eval_step(s.params, b, logits_fn=logits_fn))
  state = train.TrainState(0, params, None)
  start, end = full_logits(model, params, split.arrays())
  rows = task_io.predict(runner, state, split.arrays(), batch_size)
  np.testing.assert_allclose(rows, np.stack([start, end], -1), rtol=1e-5, atol=1e-5)
  scores, counts = task_io.evaluate(runner, state, split, task, batch_size)
  assert counts == [] and list(scores) == ["f1", "exact_match"]
  assert scores == pytest.approx(scores_of(model, params, split), abs=1e-12)
  predictions = qa.postprocess_predictions(split.questions, split.features, start, end)
  assert len(set(predictions.values())) > 1  # the check is not about one constant answer


# ------------------------------------------------------------------------------ config, data


def test_squad_task_and_load_task_routing(tmp_path):
  task = data.get_task("squad")
  assert task.kind == "qa" and task.primary_metric == "f1" and task.num_labels == 0
  assert data.get_task("sst2").kind == "classification"
  with pytest.raises(ValueError, match="extractive QA.*answer texts"):
    task.metrics(np.zeros(2, int), np.zeros((2, 2)))
  # One file: split by article title (rule of nearprox.text.data.squad).
  titles = [f"Article_{i}" for i in range(40)]
  held = [t for t in titles if data.squad.article_is_held_out(t)]
  kept = [t for t in titles if not data.squad.article_is_held_out(t)]
  assert held and kept
  articles = [
      {"title": title, "paragraphs": [paragraph([PEOPLE[i % len(PEOPLE)]])]}
      for i, title in enumerate([held[0], kept[0]])
  ]
  for i, article in enumerate(articles):
    for q in article["paragraphs"][0]["qas"]:
      q["id"] += f"-{i}"
  path = tmp_path / "one.json"
  path.write_text(json.dumps(document(articles)))
  train_split = data.load_task("squad", "train", path)
  dev = data.load_task("squad", "validation", path, source="json")
  assert isinstance(train_split, data.SquadSplit)
  assert train_split.titles == [kept[0]] and dev.titles == [held[0]]
  with pytest.raises(data.DataError, match="JSON files, not source 'tsv'"):
    data.load_task("squad", "train", path, source="tsv")
  with pytest.raises(data.DataError, match="not 'json'"):
    data.load_task("sst2", "train", tmp_path, source="json")


def test_qa_splits_subset_questions_and_hold_out_questions(squad_dir, tokenizer):
  splits = task_io.load_splits(qa_config(squad_dir, max_eval_examples=3), tokenizer)
  assert list(splits) == ["train", "dev"]
  assert set(splits["train"]) == set(task_io.QA_INPUT_KEYS)
  dev = splits["dev"]
  assert len(dev.questions) == 3  # questions, each with all of its windows
  assert set(dev.features.example_index) == {0, 1, 2}
  assert len(dev.features) > 3
  full = task_io.load_splits(qa_config(squad_dir, holdout_examples=4), tokenizer)
  assert list(full) == ["train", "holdout"]
  held = full["holdout"].questions
  assert len(held) == 4
  again = task_io.load_splits(qa_config(squad_dir, holdout_examples=4, seed=7), tokenizer)
  assert again["holdout"].questions.ids == held.ids  # the same for every run seed
  everything = data.load_squad("train", squad_dir)
  rest = [e.id for e in everything.examples if e.id not in set(held.ids)]
  rest_split = everything.select([everything.ids.index(i) for i in rest])
  trained = data.encode_squad(rest_split, tokenizer, MAX_LENGTH, DOC_STRIDE).arrays()
  for key, value in trained.items():
    np.testing.assert_array_equal(full["train"][key], value)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"label_noise": 0.2}, "label_noise.*extractive QA"),
        ({"holdout_examples": 12}, "holdout_examples must lie in"),
        ({"doc_stride": MAX_LENGTH}, "doc_stride"),
    ],
)
def test_bad_qa_configs_are_clear_errors(squad_dir, tokenizer, override, match):
  with pytest.raises(ValueError, match=match):
    task_io.load_splits(qa_config(squad_dir, **override), tokenizer)


def test_squad_config_resolves():
  config = squad.get_config()
  assert config.task == "squad" and config.model.name == "minilm"
  assert (config.batch_size, config.max_length, config.doc_stride) == (16, 256, 64)
  assert data.get_task(config.task).kind == "qa"
