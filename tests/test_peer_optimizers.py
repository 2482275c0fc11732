"""The peers of AdamW (optimizers.PEERS): built from the config as their libraries build them,
training the tiny BERT, and schedule-free AdamW evaluated and exported at its averaged
iterate in every parallel mode."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import tiny
from nearprox.text import data, models
from nearprox.training import optimizers, parallel, task_io, train
from nearprox.training.orbax_checkpoints import Checkpoints
from tests.tiny_sst2 import tiny_config, write_sst2

# Fixed-batch learning rates for the tiny BERT (hidden 32): each peer's usual scale.
LEARNING_RATES = {"muon": 1e-2, "schedule_free_adamw": 1e-2, "lion": 5e-3, "psgd_kron": 1e-2}
BATCH, LENGTH = 16, 16


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  return write_sst2(tmp_path_factory.mktemp("glue"))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def peer_config(name: str, **overrides):
  config = tiny.get_config()
  config.task = "sst2"
  config.optimizer.name = name
  config.optimizer.learning_rate = LEARNING_RATES[name]
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def tiny_model(config):
  task = data.get_task(config.task)
  model, params, _ = task_io.create_model(config, task.num_labels, jax.random.key(0))
  return task, model, params


def fixed_batch(vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """One classification batch: random tokens, labels, every row real."""
  rng = np.random.default_rng(seed)
  return {
      "input_ids": rng.integers(1000, vocab_size, (BATCH, LENGTH)).astype(np.int32),
      "attention_mask": np.ones((BATCH, LENGTH), np.int32),
      "token_type_ids": np.zeros((BATCH, LENGTH), np.int32),
      "labels": rng.integers(0, 2, BATCH).astype(np.int32),
      "mask": np.ones(BATCH, np.float32),
      "index": np.arange(BATCH, dtype=np.int32),
  }


def bert_like_params() -> dict:
  """A few leaves named and shaped as the BERT's (embedding, LayerNorm, hidden dense layer,
  head), small enough that PSGD's and Muon's updates compile in seconds."""
  keys = iter(jax.random.split(jax.random.key(0), 8))
  normal = lambda *shape: jax.random.normal(next(keys), shape)
  return {
      "bert": {
          "embeddings": {
              "word_embeddings": {"embedding": normal(50, 8)},
              "LayerNorm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
          },
          "encoder": {"layer_0": {"intermediate": {"dense": {"kernel": normal(8, 16)}}}},
          "pooler": {"dense": {"kernel": normal(16, 8), "bias": jnp.zeros(8)}},
      },
      "classifier": {"kernel": normal(8, 2), "bias": jnp.zeros(2)},
  }


def flat(params) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)])


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("name", optimizers.PEERS)
def test_peer_trains_the_tiny_bert_with_finite_falling_losses(name):
  """The training step of train.py (step_functions) with the peer from the config: eight
  steps on one batch, every loss finite, the last well below the first."""
  config = peer_config(name)
  task, model, params = tiny_model(config)
  tx, per_example = optimizers.create_optimizer(config, num_steps=8, axis_name=None)
  assert not per_example
  train_fn, _ = train.step_functions(config, task, model, tx, per_example, axis_name=None)
  step = jax.jit(train_fn)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  batch = fixed_batch(model.config.vocab_size)
  losses = []
  for _ in range(8):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses)), losses
  assert np.all(np.isfinite(flat(state.params)))
  assert losses[-1] < 0.9 * losses[0], losses


# ------------------------------------------------------------------------------ construction


def reference(name: str, config, num_steps: int):
  """The peer as its library builds it, after the same L2 term."""
  opt = config.optimizer
  warmup = round(opt.warmup_fraction * num_steps)
  schedule = optimizers.warmup_linear_decay(opt.learning_rate, warmup, num_steps)
  if name == "lion":
    peer = optax.lion(schedule, weight_decay=opt.weight_decay, mask=optimizers.kernel_mask)
  elif name == "psgd_kron":
    psgdax = pytest.importorskip("psgdax")
    peer = psgdax.kron(
        schedule,
        weight_decay=opt.weight_decay,
        weight_decay_mask=optimizers.kernel_mask,
        key=jax.random.PRNGKey(config.seed),
    )
  elif name == "schedule_free_adamw":  # the library decays every leaf: compared at 0
    peer = optax.contrib.schedule_free_adamw(opt.learning_rate, warmup_steps=warmup)
  else:  # its Adam's decay is unmasked and its Muon decay separate: compared at 0
    peer = optax.contrib.muon(
        schedule,
        muon_weight_dimension_numbers=optimizers.muon_dimension_numbers,
        consistent_rms=optimizers.MUON_CONSISTENT_RMS,
    )
  return optax.chain(optimizers.l2_regularization(config.objective.l2_weight), peer)


@pytest.mark.parametrize("name", optimizers.PEERS)
def test_peer_is_its_library_optimizer(name):
  """Five updates of BERT-like params equal the library's optimizer with the shared warmup +
  linear decay (schedule-free: its own warmup, then constant) and L2 term."""
  decoupled = {"muon": 0.0, "schedule_free_adamw": 0.0}.get(name, 0.01)
  config = peer_config(name, **{"optimizer.weight_decay": decoupled})
  params = bert_like_params()
  tx, _ = optimizers.create_optimizer(config, num_steps=20, axis_name=None)
  want_tx = reference(name, config, num_steps=20)
  state, want_state = tx.init(params), want_tx.init(params)
  update, want_update = jax.jit(tx.update), jax.jit(want_tx.update)
  for step in range(5):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape), params)
    got, state = update(grads, state, params)
    want, want_state = want_update(grads, want_state, params)
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, got)
  assert np.abs(flat(got)).max() > 0  # past the warmup's first step, they move


def test_muon_partition_hidden_matrices_to_muon_and_the_rest_to_adam():
  """Muon's authors: hidden layers' matrices only; the embeddings (input layer), the task
  head (output layer), biases and LayerNorm go to Adam. Both heads of the models."""
  for head, config in (
      ("classifier", tiny.get_config()),
      ("qa_outputs", tiny.get_config()),
  ):
    config.task = "squad" if head == "qa_outputs" else "sst2"
    _, _, params = tiny_model(config)
    mask = optimizers.muon_mask(params)
    to_muon = {
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, m in jax.tree_util.tree_leaves_with_path(mask)
        if m
    }
    hidden = {"attention/self/query", "attention/self/key", "attention/self/value"}
    hidden |= {"attention/output/dense", "intermediate/dense", "output/dense"}
    layers = [f"bert/encoder/layer_{i}/{name}/kernel" for i in range(2) for name in hidden]
    pooler = {"bert/pooler/dense/kernel"} if head == "classifier" else set()  # QA has none
    assert to_muon == {*layers, *pooler}
    # And the optimizer follows it: Muon's momentum exists only on those leaves.
    tx, _ = optimizers.create_optimizer(peer_config("muon"), num_steps=8, axis_name=None)
    muon_state = optax.tree_utils.tree_get(tx.init(params), "MuonState")
    with_momentum = {
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, _ in jax.tree_util.tree_leaves_with_path(muon_state.mu)
    }
    assert with_momentum == to_muon


def test_muon_orthogonalizes_the_encoder_decoder_s_3d_attention_kernels():
  """flax attention's [in, heads, head_dim] and [heads, head_dim, out] kernels are Muon's, as
  the matrices of their maps; the update equals optax.contrib.muon with those axes."""
  from nearprox.text.models import seq2seq

  cfg = seq2seq.Seq2SeqConfig(
      vocab_size=40,
      num_encoder_layers=1,
      num_decoder_layers=1,
      hidden_size=8,
      num_heads=2,
      intermediate_size=16,
      max_length=6,
  )
  params = seq2seq.init_seq2seq(cfg, jax.random.key(0))
  numbers = optimizers.muon_dimension_numbers(params)
  named = {
      jax.tree_util.keystr(path, simple=True, separator="/"): n
      for path, n in jax.tree_util.tree_leaves_with_path(
          numbers, is_leaf=lambda n: isinstance(n, optax.contrib.MuonDimensionNumbers)
      )
  }
  attention = "decoder/layer_0/cross_attention"
  assert named[f"{attention}/query/kernel"] == optax.contrib.MuonDimensionNumbers(0, (1, 2))
  assert named[f"{attention}/out/kernel"] == optax.contrib.MuonDimensionNumbers((0, 1), 2)
  assert named["encoder/layer_0/ff_in/kernel"] == optax.contrib.MuonDimensionNumbers(0, 1)
  # The shared token embedding (also the tied output layer), biases and LayerNorm: Adam.
  to_adam = {"token_embed/embedding", "encoder/layer_0/ff_in/bias", f"{attention}/query/bias"}
  to_adam |= {"decoder/final_norm/scale"}
  mask = optimizers.muon_mask(params)
  flat_mask = {
      jax.tree_util.keystr(path, simple=True, separator="/"): m
      for path, m in jax.tree_util.tree_leaves_with_path(mask)
  }
  assert {name for name, m in flat_mask.items() if m} == set(named)
  assert to_adam <= {name for name, m in flat_mask.items() if not m}
  assert len(named) == 4 + 8 + 2 * 2  # q/k/v/out: encoder self, decoder self + cross; ff ×2
  config = peer_config("muon", **{"optimizer.weight_decay": 0.0})
  tx, _ = optimizers.create_optimizer(config, num_steps=20, axis_name=None)
  want_tx = reference("muon", config, num_steps=20)
  state, want_state = tx.init(params), want_tx.init(params)
  for step in range(3):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape), params)
    got, state = tx.update(grads, state, params)
    want, want_state = want_tx.update(grads, want_state, params)
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, got)


# ------------------------------------------------------------------------------ errors


def test_unknown_optimizer_name_is_a_clear_error():
  config = peer_config("lion")
  config.optimizer.name = "kfac"
  with pytest.raises(ValueError, match=r"config.optimizer.name must be one of .*'muon'.*'kfac'"):
    optimizers.create_optimizer(config, num_steps=8, axis_name=None)


def test_psgd_kron_without_psgdax_says_how_to_install_it(monkeypatch):
  monkeypatch.setitem(sys.modules, "psgdax", None)  # `import psgdax` raises ImportError
  with pytest.raises(ImportError, match="needs psgdax: pip install psgdax"):
    optimizers.create_optimizer(peer_config("psgd_kron"), num_steps=8, axis_name=None)


@pytest.mark.parametrize("name", optimizers.PEERS)
def test_peer_state_survives_a_checkpoint(name, tmp_path):
  """What resume restores: the peer's state (Muon's masked partition, PSGD's factors and
  key, schedule-free's z) as saved, not the template it falls back to."""
  params = bert_like_params()
  tx, _ = optimizers.create_optimizer(peer_config(name), num_steps=8, axis_name=None)
  template = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  state, update = template, jax.jit(tx.update)
  for step in range(3):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape), params)
    updates, opt_state = update(grads, state.opt_state, state.params)
    state = train.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
  checkpoints = Checkpoints(tmp_path, every=1, keep=1)
  checkpoints.save(3, state, force=True)
  checkpoints.wait()
  restored = Checkpoints(tmp_path, every=1, keep=1).restore_latest(template)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------------------ schedule-free


def schedule_free_state(config, params, steps: int = 3):
  """A schedule-free state after ``steps`` updates: its y (params) and x differ."""
  tx, _ = optimizers.create_optimizer(config, num_steps=8, axis_name=None)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  for step in range(steps):
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape), params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    state = train.TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)
  return tx, state


def test_evaluation_params_are_schedule_free_eval_params_and_only_for_it():
  config = peer_config("schedule_free_adamw")
  _, _, params = tiny_model(config)
  _, state = schedule_free_state(config, params)
  inner = optax.tree_utils.tree_get(state.opt_state, "ScheduleFreeState")
  want = optax.contrib.schedule_free_eval_params(inner, state.params)
  got = optimizers.evaluation_params(state.opt_state, state.params)
  np.testing.assert_array_equal(flat(got), flat(want))
  assert not np.allclose(flat(got), flat(state.params))
  # Every other optimizer is evaluated at its params.
  params = bert_like_params()
  for name in (n for n in optimizers.OPTIMIZERS if n != "schedule_free_adamw"):
    other = tiny.get_config()
    other.optimizer.name = name
    tx, _ = optimizers.create_optimizer(other, num_steps=8, axis_name=None)
    assert optimizers.evaluation_params(tx.init(params), params) is params


@pytest.mark.parametrize("mode", parallel.MODES)
def test_schedule_free_is_evaluated_at_its_averaged_iterate(mode):
  """train.py's eval step, compiled by the Runner in each parallel mode, gives the logits of
  schedule_free_eval_params, not those of the params the gradients were taken at."""
  config = peer_config("schedule_free_adamw")
  task, model, params = tiny_model(config)
  tx, state = schedule_free_state(config, params)
  runner = parallel.Runner(mode)
  runner.compile(*train.step_functions(config, task, model, tx, False, runner.axis_name))
  arrays = {k: v for k, v in fixed_batch(model.config.vocab_size).items() if k != "mask"}
  arrays.pop("index")
  got = task_io.predict(runner, runner.put_state(state), arrays, batch_size=BATCH)

  def logits(params):
    tokens = [arrays[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
    return np.asarray(model.apply({"params": params}, *tokens).logits)

  evaluated = optimizers.evaluation_params(state.opt_state, state.params)
  np.testing.assert_allclose(got, logits(evaluated), rtol=1e-4, atol=1e-5)
  assert not np.allclose(got, logits(state.params), rtol=1e-4, atol=1e-5)


def test_schedule_free_run_reports_and_exports_its_averaged_iterate(glue_dir, tmp_path):
  """train_and_evaluate: the returned and exported params are schedule_free_eval_params of
  the final (checkpointed) state, and the dev score is theirs."""
  config = tiny_config(
      glue_dir,
      **{
          "optimizer.name": "schedule_free_adamw",
          "optimizer.learning_rate": 1e-2,
          "num_train_steps": 4,
          "checkpoint_every": 100,
          "export_hf": True,
          "parallel": "jit",
      },
  )
  report = train.train_and_evaluate(config, tmp_path)
  task, model, params = tiny_model(config)
  tx, _ = optimizers.create_optimizer(config, config.num_train_steps, None)
  template = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  final = Checkpoints(tmp_path / "checkpoints", 100, 1).restore_latest(template)
  assert int(final.step) == 4
  inner = optax.tree_utils.tree_get(final.opt_state, "ScheduleFreeState")
  averaged = optax.contrib.schedule_free_eval_params(inner, final.params)
  np.testing.assert_allclose(flat(report["params"]), flat(averaged), rtol=1e-6, atol=1e-7)
  assert not np.allclose(flat(report["params"]), flat(final.params))
  _, exported, tokenizer = models.load_pretrained(report["hf_model"], num_labels=2)
  np.testing.assert_allclose(flat(exported), flat(averaged), rtol=1e-6, atol=1e-7)
  dev = data.encode(data.load_task("sst2", "dev", glue_dir), tokenizer, config.max_length)
  logits = model.apply(
      {"params": averaged}, dev.input_ids, dev.attention_mask, dev.token_type_ids
  ).logits
  assert report["dev"] == pytest.approx(task.metrics(dev.labels, np.asarray(logits)))
