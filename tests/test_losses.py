"""Tests of nearprox.text.losses (per-example task losses, iEF weights), nearprox.text.objectives
(the per-example task/adversarial objective) and nearprox.text.robustness.

Most tests run on the tiny Flax BERT (hidden 32, 2 layers, T = 8). Tests of the
perturbation geometry, dropout keys and the task variants also run on a stand-in with the
BERT call signature (embedding + per-token dense + masked mean + dense), whose XLA compiles
are ~10x cheaper: BERT forward/backward compiles dominate this file's run time. Batches
have one partly padded row, two full rows and one fully padded row (batch["mask"] == 0).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nearprox
from nearprox.text import losses, models, objectives, perturbations, robustness
from nearprox.text.models.dropout import ExampleDropout
from nearprox.training import optimizers

B, T, H = 4, 8, 32
VALID = np.array([1.0, 1.0, 1.0, 0.0])  # batch["mask"]: row 3 is padding of a partial batch.


class StandIn(nn.Module):
  """BERT's call signature on a bag of embeddings: logits = W·mean_t tanh(A(e_t + δ_t))."""

  num_labels: int = 2
  question_answering: bool = False
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      deterministic=True,
      dropout_keys=None,
      word_embeddings_delta=None,
  ):
    x = nn.Embed(100, H, embedding_init=nn.initializers.normal(1.0))(input_ids)
    if word_embeddings_delta is not None:
      x = x + word_embeddings_delta
    x = ExampleDropout(self.dropout_rate)(jnp.tanh(nn.Dense(H)(x)), dropout_keys, deterministic)
    if self.question_answering:
      logits = nn.Dense(2)(x)
      return models.QuestionAnsweringOutput(start_logits=logits[..., 0], end_logits=logits[..., 1])
    mask = jnp.ones(input_ids.shape) if attention_mask is None else attention_mask
    mask = mask[..., None].astype(x.dtype)
    pooled = jnp.sum(x * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return models.SequenceClassifierOutput(logits=nn.Dense(self.num_labels)(pooled))


def _tree_allclose(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _row(tree, i):
  return jax.tree.map(lambda x: x[i : i + 1], tree)


def _init(model, key):
  """model.init as one XLA compile (eager init compiles every op separately)."""
  ids = jnp.zeros((2, T), jnp.int32)
  return jax.jit(lambda k: model.init(k, ids, deterministic=True)["params"])(key)


def _batch_and_keys():
  input_ids = jax.random.randint(jax.random.key(1), (B, T), 1, 100)
  attention_mask = jnp.ones((B, T), jnp.int32).at[0, 5:].set(0).at[3, :].set(0)
  batch = dict(
      input_ids=input_ids,
      attention_mask=attention_mask,
      token_type_ids=jnp.zeros((B, T), jnp.int32),
      labels=jnp.array([0, 1, 1, 0]),
      mask=jnp.asarray(VALID),
  )
  return batch, jax.random.split(jax.random.key(2), B)


@pytest.fixture(scope="module")
def setup():
  # initializer_range 0.2 (not BERT's 0.02): weights large enough that the losses vary.
  model = models.BertForSequenceClassification(models.tiny_config(initializer_range=0.2))
  params = _init(model, jax.random.key(0))
  return (model, params, *_batch_and_keys())


@pytest.fixture(scope="module")
def stand_in():
  model = StandIn()
  batch, keys = _batch_and_keys()
  params = _init(model, jax.random.key(0))
  return model, params, batch, keys


CONFIGS = {
    "clean": objectives.ObjectiveConfig(kind="clean"),
    "fgm": objectives.ObjectiveConfig(kind="fgm", epsilon=0.3),
    "pgd": objectives.ObjectiveConfig(
        kind="pgd", epsilon=0.5, step_size=0.2, num_steps=3, random_start=False
    ),
    "pgd_random_linf": objectives.ObjectiveConfig(
        kind="pgd", epsilon=0.05, step_size=0.02, num_steps=3, norm="linf", random_start=True
    ),
    "smart": objectives.ObjectiveConfig(
        kind="smart", epsilon=0.05, step_size=0.05, noise_std=1e-3, adv_weight=2.0
    ),
}


# One compilation per (model, objective), shared by the tests: the per-example losses and
# the gradient of their sum come from one jitted value_and_grad.
@functools.cache
def _value_and_grad(model, name, deterministic=True):
  loss_fn = objectives.make_per_example_loss(
      models.bert_logits_fn(model, deterministic), CONFIGS[name], hidden_size=H
  )

  def summed(params, batch, keys):
    per_example = loss_fn(params, batch, keys)
    return jnp.sum(per_example), per_example

  return jax.jit(jax.value_and_grad(summed, has_aux=True))


@functools.cache
def _loss_only(model, name, deterministic):
  return jax.jit(
      objectives.make_per_example_loss(
          models.bert_logits_fn(model, deterministic), CONFIGS[name], hidden_size=H
      )
  )


def _jitted(model, name, what="loss", deterministic=True):
  if what == "loss" and isinstance(model, StandIn):  # Only values are needed there.
    return _loss_only(model, name, deterministic)
  if what == "loss":
    return lambda *args: _value_and_grad(model, name, deterministic)(*args)[0][1]
  if what == "grad":
    return lambda *args: _value_and_grad(model, name, deterministic)(*args)[1]
  if what == "delta":
    return _delta_fn(model, name)
  raise ValueError(what)


@functools.cache
def _delta_fn(model, name):
  return jax.jit(
      functools.partial(
          objectives.adversarial_perturbation,
          models.bert_logits_fn(model),
          CONFIGS[name],
          hidden_size=H,
      )
  )


# ---------------------------------------------------------------------------------------
# Task losses.


def test_task_losses_match_their_definitions():
  logits = jax.random.normal(jax.random.key(3), (5, 3)) * 3
  labels = jnp.array([0, 2, 1, 1, 0])
  log_p = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(
      losses.cross_entropy_loss(logits, labels), -log_p[jnp.arange(5), labels], rtol=1e-6
  )
  np.testing.assert_allclose(
      losses.mse_loss(logits[:, :1], labels.astype(float)),
      (logits[:, 0] - labels) ** 2,
      rtol=1e-6,
  )
  start, end = logits, logits[:, ::-1]
  np.testing.assert_allclose(
      losses.span_cross_entropy_loss(start, end, labels, 2 - labels),
      0.5 * (losses.cross_entropy_loss(start, labels) + losses.cross_entropy_loss(end, 2 - labels)),
      rtol=1e-6,
  )
  other = jax.random.normal(jax.random.key(4), (5, 3))
  log_q = jax.nn.log_softmax(other)
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  expected = jnp.sum(p * (log_p - log_q) + q * (log_q - log_p), axis=-1)
  np.testing.assert_allclose(losses.symmetric_kl(logits, other), expected, rtol=1e-5)
  assert np.all(np.asarray(losses.symmetric_kl(logits, other)) > 0)
  np.testing.assert_allclose(losses.symmetric_kl(logits, logits), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="num_labels=1"):
    losses.mse_loss(logits, labels)


# ---------------------------------------------------------------------------------------
# Adversarial perturbations.


@pytest.mark.parametrize("name", ["fgm", "pgd", "pgd_random_linf"])
def test_attacks_raise_the_loss_over_clean(setup, name):
  model, params, batch, keys = setup
  clean = _jitted(model, "clean")(params, batch, keys)
  total = _jitted(model, name)(params, batch, keys)  # clean + adv_weight * adv
  adv = (total - clean) / CONFIGS[name].adv_weight
  assert np.all(np.asarray(adv[:3]) > np.asarray(clean[:3]) + 1e-3), (adv, clean)
  # The fully padded row has nothing to perturb.
  np.testing.assert_allclose(adv[3], clean[3], rtol=1e-5)
  if name == "fgm":  # combine="adv_only" returns the adversarial term alone.
    adv_only = dataclasses.replace(CONFIGS[name], combine="adv_only")
    only = objectives.make_per_example_loss(models.bert_logits_fn(model), adv_only, hidden_size=H)
    np.testing.assert_allclose(jax.jit(only)(params, batch, keys), adv, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["pgd", "pgd_random_linf"])
def test_pgd_stays_in_the_ball_and_off_padding(stand_in, name):
  model, params, batch, keys = stand_in
  config = CONFIGS[name]
  delta = _jitted(model, name, "delta")(params, batch, keys)
  assert delta.shape == (B, T, H)
  norms = np.asarray(perturbations.per_example_norm(delta, config.norm))
  assert np.all(norms <= config.epsilon * (1 + 1e-5)), norms
  assert np.all(norms[:3] > 0.99 * config.epsilon), norms  # K·α > ε: it reaches the sphere.
  padding = np.asarray(batch["attention_mask"]) == 0
  assert np.all(np.asarray(delta)[padding] == 0.0)
  assert np.all(np.abs(np.asarray(delta)[~padding]).sum(-1) > 0)


def test_fgm_is_epsilon_times_the_normalized_gradient(setup):
  model, params, batch, keys = setup
  logits_fn = models.bert_logits_fn(model)
  delta = _jitted(model, "fgm", "delta")(params, batch, keys)
  grad = jax.jit(
      jax.grad(
          lambda d: jnp.sum(
              losses.cross_entropy_loss(logits_fn(params, batch, d, None), batch["labels"])
          )
      )
  )(jnp.zeros((B, T, H)))
  grad = grad * perturbations.token_mask(batch)
  norms = jnp.sqrt(jnp.sum(grad**2, axis=(1, 2)))
  np.testing.assert_allclose(
      delta[:3], 0.3 * grad[:3] / norms[:3, None, None], rtol=1e-4, atol=1e-7
  )
  np.testing.assert_allclose(delta[3], 0.0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_changing_one_example_changes_only_its_loss(setup, name):
  model, params, batch, keys = setup
  loss_fn = _jitted(model, name)
  full = loss_fn(params, batch, keys)
  assert full.shape == (B,) and np.all(np.isfinite(np.asarray(full)))
  changed = dict(
      batch, input_ids=batch["input_ids"].at[0, :3].set(7), labels=batch["labels"].at[0].set(1)
  )
  other = loss_fn(params, changed, keys)
  assert abs(float(other[0] - full[0])) > 1e-4
  np.testing.assert_allclose(other[1:], full[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_of_one_gives_the_row_of_the_batch(stand_in, name):
  """What per_example_grads' vmap oracle relies on; with dropout (per-example keys)."""
  model, params, batch, keys = stand_in
  loss_fn = _jitted(model, name, deterministic=False)
  full = loss_fn(params, batch, keys)
  for i in range(B):
    np.testing.assert_allclose(
        loss_fn(params, _row(batch, i), _row(keys, i)), full[i : i + 1], rtol=1e-5, atol=1e-6
    )
  if name == "pgd_random_linf":  # raw uint32 keys [B, 2] work like typed keys [B]
    np.testing.assert_allclose(loss_fn(params, batch, jax.random.key_data(keys)), full, rtol=1e-6)


@pytest.mark.parametrize("name", ["fgm", "smart"])
def test_dropout_keys_are_per_example_and_match_the_vmap_oracle(stand_in, name):
  model, params, batch, keys = stand_in
  loss_fn = objectives.make_per_example_loss(
      models.bert_logits_fn(model, deterministic=False), CONFIGS[name], hidden_size=H
  )
  full = _jitted(model, name, deterministic=False)(params, batch, keys)
  oracle = jax.jit(functools.partial(nearprox.per_example_value_and_grads, loss_fn))
  values, grads = oracle(params, batch, keys)
  np.testing.assert_allclose(values, full, rtol=1e-5, atol=1e-6)
  assert all(g.shape[0] == B for g in jax.tree.leaves(grads))
  # Dropout is on: example i's loss follows its own key (rows 1 and 2 swap keys).
  swapped = _jitted(model, name, deterministic=False)(params, batch, keys[jnp.array([0, 2, 1, 3])])
  assert not np.allclose(swapped[1:3], full[1:3], rtol=1e-4)
  np.testing.assert_allclose(swapped[0], full[0], rtol=1e-6)
  with pytest.raises(ValueError, match="rng"):
    loss_fn(params, batch, None)


@functools.cache
def _fixed_delta_grad(model, smart):
  """∇θ Σ_i [task_i(θ) + w·adv_i(θ; δ)] with δ an ordinary (non-differentiated) input."""
  logits_fn = models.bert_logits_fn(model)

  def loss(p, batch, delta, weight):
    clean_logits = logits_fn(p, batch, None, None)
    adv_logits = logits_fn(p, batch, delta, None)
    clean = losses.cross_entropy_loss(clean_logits, batch["labels"])
    if smart:
      adv = losses.symmetric_kl(clean_logits, adv_logits)
    else:
      adv = losses.cross_entropy_loss(adv_logits, batch["labels"])
    return jnp.sum(clean + weight * adv)

  return jax.jit(jax.value_and_grad(loss))


@pytest.mark.parametrize("name", ["fgm", "pgd", "smart"])
def test_no_gradient_flows_through_the_perturbation(setup, name):
  """∇θ of the objective = ∇θ of clean + w·adv evaluated at the precomputed, fixed δ.

  (ℓ2 PGD, not ℓ∞: sign steps and clipping have zero derivative anyway.)"""
  model, params, batch, keys = setup
  config = CONFIGS[name]
  delta = _jitted(model, name, "delta")(params, batch, keys)
  assert float(jnp.max(jnp.abs(delta))) > 0
  value, expected = _fixed_delta_grad(model, config.kind == "smart")(
      params, batch, delta, config.adv_weight
  )
  # SMART's δ is a normalized gradient at a tiny random start: two separately compiled
  # programs round it differently by ~1e-4 relative. A gradient through it would differ by far
  # more (the normalization of a tiny gradient is steep).
  loose = 20 if config.kind == "smart" else 1
  value_now = jnp.sum(_jitted(model, name)(params, batch, keys))
  np.testing.assert_allclose(value_now, value, rtol=1e-5 * loose)
  grads = _jitted(model, name, "grad")(params, batch, keys)
  _tree_allclose(grads, expected, rtol=1e-4 * loose, atol=1e-5 * loose)


def test_smart_term_is_zero_without_perturbation_and_nonnegative(stand_in):
  model, params, batch, keys = stand_in
  logits_fn = models.bert_logits_fn(model)
  clean = _jitted(model, "clean")(params, batch, keys)
  # ε = 0: the projection leaves nothing.
  config = dataclasses.replace(CONFIGS["smart"], epsilon=0.0)
  loss = jax.jit(objectives.make_per_example_loss(logits_fn, config, hidden_size=H))
  np.testing.assert_allclose(loss(params, batch, keys), clean, rtol=1e-6, atol=1e-7)
  # σ = 0: the ascent would start at the KL's minimum, where its gradient is 0.
  config = dataclasses.replace(CONFIGS["smart"], noise_std=0.0)
  delta = objectives.adversarial_perturbation(logits_fn, config, params, batch, keys, hidden_size=H)
  np.testing.assert_array_equal(delta, 0.0)
  # Otherwise the term is > 0 on examples with tokens, 0 on the fully padded one.
  smart = _jitted(model, "smart")(params, batch, keys)
  term = np.asarray(smart - clean) / CONFIGS["smart"].adv_weight
  assert np.all(term[:3] > 1e-6) and abs(term[3]) < 1e-6, term


def test_regression_and_qa_tasks(stand_in):
  _, _, batch, keys = stand_in
  regression = StandIn(num_labels=1, dropout_rate=0.0)
  params = _init(regression, jax.random.key(7))
  batch = dict(batch, labels=jnp.array([0.5, -1.0, 2.0, 0.0]))
  config = objectives.ObjectiveConfig(kind="smart", epsilon=0.1, step_size=0.1)
  smart = jax.jit(
      objectives.make_per_example_loss(
          models.bert_logits_fn(regression), config, task="regression", hidden_size=H
      )
  )
  clean = jax.jit(
      objectives.make_per_example_loss(
          models.bert_logits_fn(regression), objectives.ObjectiveConfig(), task="regression"
      )
  )
  logits = regression.apply({"params": params}, batch["input_ids"], batch["attention_mask"]).logits
  np.testing.assert_allclose(clean(params, batch), (logits[:, 0] - batch["labels"]) ** 2, rtol=1e-5)
  term = np.asarray(smart(params, batch, keys) - clean(params, batch))
  assert np.all(term[:3] > 0) and term[3] == pytest.approx(0.0, abs=1e-9), term

  qa = StandIn(question_answering=True, dropout_rate=0.0)
  params = _init(qa, jax.random.key(8))
  batch = dict(
      batch, start_positions=jnp.array([1, 2, 0, 0]), end_positions=jnp.array([3, 2, 7, 0])
  )
  out = qa.apply({"params": params}, batch["input_ids"])
  expected = losses.span_cross_entropy_loss(
      out.start_logits, out.end_logits, batch["start_positions"], batch["end_positions"]
  )
  clean = objectives.make_per_example_loss(
      models.bert_logits_fn(qa), objectives.ObjectiveConfig(), task="qa"
  )
  np.testing.assert_allclose(clean(params, batch), expected, rtol=1e-5)
  config = objectives.ObjectiveConfig(kind="pgd", epsilon=0.1, step_size=0.05)
  loss = jax.jit(
      objectives.make_per_example_loss(models.bert_logits_fn(qa), config, task="qa", hidden_size=H)
  )
  full = loss(params, batch, keys)
  assert np.all(np.asarray(full[:3]) > 2 * np.asarray(expected[:3]))  # clean + adv > 2·clean
  np.testing.assert_allclose(loss(params, _row(batch, 1), _row(keys, 1)), full[1:2], rtol=1e-5)


# ---------------------------------------------------------------------------------------
# L2 regularization.


def test_l2_gradient_is_weight_times_params_on_kernels_only(setup):
  _, params, _, _ = setup
  weight = 0.3
  mask = optimizers.kernel_mask(params)
  names = {
      jax.tree_util.keystr(path): m for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]
  }
  assert (
      names["['classifier']['kernel']"]
      and names["['bert']['encoder']['layer_0']['attention']['self']['query']['kernel']"]
  )
  assert not names["['bert']['embeddings']['word_embeddings']['embedding']"]
  assert not names["['bert']['embeddings']['LayerNorm']['scale']"]
  assert not names["['classifier']['bias']"]

  tx = optimizers.l2_regularization(weight)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  penalty_grad = jax.jit(jax.grad(lambda p: optimizers.l2_penalty(p, weight)))(params)
  for upd, grad, p, m in zip(*(jax.tree.leaves(t) for t in (updates, penalty_grad, params, mask))):
    np.testing.assert_allclose(upd, weight * p if m else 0.0, rtol=1e-6)
    np.testing.assert_allclose(grad, weight * p if m else 0.0, rtol=1e-6)
  kernels = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  np.testing.assert_allclose(
      jax.jit(optimizers.l2_penalty, static_argnums=1)(params, weight),
      0.5 * weight * sum(float(jnp.sum(k**2)) for k in kernels),
      rtol=1e-5,
  )
  # A custom mask (everything) and composition after the filter in an optax chain.
  everything = jax.tree.map(lambda _: True, params)
  chain = optax.chain(optimizers.l2_regularization(weight, everything), optax.sgd(1.0))
  updates, _ = jax.jit(chain.update)(zeros, chain.init(params), params)
  _tree_allclose(updates, jax.tree.map(lambda p: -weight * p, params))


# ---------------------------------------------------------------------------------------
# Configuration errors.


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(kind="vat"), "kind"),
        (dict(kind="fgm", epsilon=-0.1), "epsilon"),
        (dict(kind="pgd", num_steps=0), "num_steps"),
        (dict(kind="pgd", num_steps=2.5), "num_steps"),
        (dict(kind="pgd", step_size=0.0), "step_size"),
        (dict(kind="pgd", norm="l1"), "norm"),
        (dict(kind="fgm", combine="max"), "combine"),
        (dict(kind="smart", combine="adv_only"), "combine"),
        (dict(kind="smart", noise_std=float("nan")), "noise_std"),
        (dict(kind="fgm", adv_weight=-1.0), "adv_weight"),
        (dict(l2_weight=-1e-4), "l2_weight"),
        (dict(kind="pgd", random_start="yes"), "random_start"),
        (dict(kind="fgm", epsilon=True), "epsilon"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, field):
  with pytest.raises(ValueError, match=f"ObjectiveConfig.{field}"):
    objectives.ObjectiveConfig(**kwargs)


def test_defaults_and_bad_arguments(setup):
  model, params, batch, keys = setup
  assert objectives.ObjectiveConfig(kind="smart") == objectives.ObjectiveConfig(
      kind="smart",
      epsilon=1e-3,
      step_size=1e-3,
      num_steps=1,
      norm="linf",
      noise_std=1e-5,
      adv_weight=1.0,
      random_start=False,
  )
  pgd = objectives.ObjectiveConfig(kind="pgd")
  assert (pgd.num_steps, pgd.norm, pgd.step_size) == (3, "l2", 0.1)
  assert objectives.ObjectiveConfig(kind="fgm").epsilon == 1.0
  logits_fn = models.bert_logits_fn(model)
  with pytest.raises(ValueError, match="hidden_size"):
    objectives.make_per_example_loss(logits_fn, pgd)
  with pytest.raises(ValueError, match="task"):
    objectives.make_per_example_loss(logits_fn, pgd, task="ner", hidden_size=H)
  with pytest.raises(ValueError, match="rng"):
    objectives.make_per_example_loss(logits_fn, pgd, hidden_size=H)(params, batch)
  with pytest.raises(ValueError, match="one key per example"):
    objectives.make_per_example_loss(logits_fn, pgd, hidden_size=H)(params, batch, keys[:2])


# ---------------------------------------------------------------------------------------
# Robustness evaluation.


def _synthetic_batch(key, n):
  """Separable task: label 1 sentences use tokens 50..99, label 0 sentences 1..49."""
  k_label, k_tokens = jax.random.split(key)
  labels = jax.random.bernoulli(k_label, 0.5, (n,)).astype(jnp.int32)
  tokens = jax.random.randint(k_tokens, (n, T), 1, 50) + 49 * labels[:, None]
  return dict(input_ids=tokens, attention_mask=jnp.ones((n, T), jnp.int32), labels=labels)


@pytest.fixture(scope="module")
def trained():
  model = models.BertForSequenceClassification(models.tiny_config())
  params = _init(model, jax.random.key(10))
  loss_fn = objectives.make_per_example_loss(
      models.bert_logits_fn(model), objectives.ObjectiveConfig()
  )
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, key):
    batch = _synthetic_batch(key, 32)
    grads = jax.grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for key in jax.random.split(jax.random.key(11), 200):
    params, state = step(params, state, key)
  return model, params


def test_attack_lowers_accuracy_monotonically(trained, tmp_path):
  model, params = trained
  logits_fn = models.bert_logits_fn(model)
  test = _synthetic_batch(jax.random.key(12), 64)
  batches = [jax.tree.map(lambda x: x[:32], test), jax.tree.map(lambda x: x[32:], test)]
  # A masked row with a wrong label must not count.
  batches[1]["mask"] = jnp.ones(32).at[0].set(0.0)
  batches[1]["labels"] = batches[1]["labels"].at[0].set(1 - batches[1]["labels"][0])
  epsilons = [0.0, 0.1, 0.2, 0.3, 0.5, 1.0]
  rows = robustness.attack_accuracy(
      logits_fn, params, batches, epsilons, hidden_size=H, num_steps=5
  )
  accuracy = np.array([r["accuracy"] for r in rows])
  assert [r["epsilon"] for r in rows] == epsilons
  assert all(r["num_examples"] == 63 for r in rows)
  assert accuracy[0] >= 0.95, accuracy  # the model learned the task
  assert np.all(np.diff(accuracy) <= 0), accuracy
  assert accuracy[-1] <= 0.1, accuracy
  assert rows[-1]["loss"] > rows[0]["loss"] + 1.0
  # ε = 0 is the clean accuracy.
  logits = jax.jit(logits_fn)(params, batches[0])
  clean = np.mean(np.argmax(logits, -1) == batches[0]["labels"])
  rows0 = robustness.attack_accuracy(
      logits_fn, params, batches[:1], [0.0], hidden_size=H, num_steps=5
  )
  assert rows0[0]["accuracy"] == pytest.approx(clean)
  # The script's API: rows in the order asked for, CSV + PNG written.
  from experiments import robustness_eval

  reverse = robustness_eval.evaluate_and_write(
      model, params, batches, epsilons[::-1], tmp_path / "r", num_steps=5, label="clean-trained"
  )
  assert [r["accuracy"] for r in reverse] == pytest.approx(list(accuracy[::-1]))
  back = robustness.read_csv(tmp_path / "r.csv")
  assert [r["accuracy"] for r in back] == pytest.approx(list(accuracy[::-1]))
  assert (tmp_path / "r.png").stat().st_size > 1000
  with pytest.raises(ValueError, match="epsilons"):
    robustness.attack_accuracy(logits_fn, params, batches, [-1.0], hidden_size=H)


@pytest.mark.parametrize("kind", ["fgm", "pgd", "smart"])
def test_loss_at_precomputed_perturbation_is_factored_and_equals_the_objective(kind):
  """make_loss_at_perturbation + adversarial_perturbation: every leaf on the fast path, and
  the filtered gradient equals the vmap oracle of make_per_example_loss; with iEF weights,
  the weights are those of the clean logits."""
  import collections

  import nearprox
  from nearprox import factored_grads
  from nearprox.text import models

  config = models.tiny_config()
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0), 2, 16)
  rng = np.random.default_rng(0)
  batch = {
      "input_ids": jnp.asarray(rng.integers(0, 100, (6, 12)), jnp.int32),
      "attention_mask": jnp.asarray(np.arange(12) < rng.integers(4, 13, (6, 1)), jnp.int32),
      "token_type_ids": jnp.zeros((6, 12), jnp.int32),
      "labels": jnp.asarray(rng.integers(0, 2, 6), jnp.int32),
  }
  keys = jax.random.split(jax.random.key(1), 6)
  objective = objectives.ObjectiveConfig(kind=kind)
  logits_fn = models.bert_logits_fn(model)
  delta = objectives.adversarial_perturbation(
      logits_fn, objective, params, batch, keys, hidden_size=config.hidden_size
  )
  at_delta = objectives.make_loss_at_perturbation(logits_fn, objective)
  kinds = collections.Counter(
      factored_grads.leaf_kinds(at_delta, params, batch, keys, delta).values()
  )
  assert "fallback" not in kinds and kinds["kernel"] > 0
  one_call = objectives.make_per_example_loss(logits_fn, objective, hidden_size=config.hidden_size)
  tx = nearprox.scale_by_proximal(0.1, damping_mode="relative")
  fast, _ = tx.update(
      nearprox.per_example_grads(at_delta, params, batch, keys, delta, method="factored"),
      tx.init(None),
  )
  oracle, _ = tx.update(
      nearprox.per_example_grads(one_call, params, batch, keys, method="vmap"), tx.init(None)
  )
  fast = np.concatenate([np.ravel(x) for x in jax.tree.leaves(fast)])
  oracle = np.concatenate([np.ravel(x) for x in jax.tree.leaves(oracle)])
  np.testing.assert_allclose(fast, oracle, atol=1e-5 * np.abs(oracle).max())
  # with_ief_weights: the same losses, and the iEF weights of the clean logits alone.
  weighted = objectives.make_loss_at_perturbation(logits_fn, objective, with_ief_weights=True)
  (values, weights), _ = nearprox.per_example_value_and_grads(
      weighted, params, batch, keys, delta, method="factored", has_aux=True
  )
  np.testing.assert_allclose(values, at_delta(params, batch, keys, delta), rtol=1e-5)
  clean_weights = losses.ief_weights("classification", logits_fn(params, batch), batch)
  np.testing.assert_allclose(weights, clean_weights, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# iEF weights of adversarial objectives: the clean task term (default) or the whole loss.


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _whole_loss_reference(task, config, batch, clean, perturbed):
  """s_i = ‖∂ℓ_i/∂z_i‖² + ‖∂ℓ_i/∂z̃_i‖², in closed form (NumPy, float64)."""
  a = config.adv_weight
  smart, adv_only = config.kind == "smart", config.combine == "adv_only"

  def softmax_parts(z, z_tilde, labels, half):
    """(clean, perturbed) logit gradients of one softmax cross-entropy head (times ``half``)."""
    p, q = _softmax(z), _softmax(z_tilde)
    y = np.eye(p.shape[-1])[np.asarray(labels)]
    task_clean = 0.0 if adv_only else half * (p - y)
    if smart:  # KL(sg(q)‖p) + KL(sg(p)‖q): ∂/∂z = p − q, ∂/∂z̃ = q − p
      return task_clean + a * half * (p - q), a * half * (q - p)
    return task_clean, (1.0 if adv_only else a) * half * (q - y)

  if task == "classification":
    parts = [softmax_parts(clean, perturbed, batch["labels"], 1.0)]
  elif task == "qa":
    parts = [
        softmax_parts(clean[0], perturbed[0], batch["start_positions"], 0.5),
        softmax_parts(clean[1], perturbed[1], batch["end_positions"], 0.5),
    ]
  else:  # regression: (p − y)² + a·(p̃ − y)² (FGM/PGD) or + a·(p̃ − p)² (SMART, no sg)
    p, q = np.asarray(clean, np.float64)[:, 0], np.asarray(perturbed, np.float64)[:, 0]
    y = np.asarray(batch["labels"], np.float64)
    if smart:
      parts = [(2 * (p - y) - 2 * a * (q - p), 2 * a * (q - p))]
    else:
      parts = [(2 * (p - y), 2 * a * (q - y))]
  total = 0.0
  for clean_grad, perturbed_grad in parts:
    for grad in (clean_grad, perturbed_grad):
      grad = np.broadcast_to(np.asarray(grad, np.float64), np.shape(perturbed_grad))
      total = total + np.sum(grad.reshape(grad.shape[0], -1) ** 2, axis=1)
  return total


WEIGHT_CASES = [
    ("classification", "fgm"),
    ("classification", "pgd"),
    ("classification", "pgd_random_linf"),
    ("classification", "smart"),
    ("classification", "fgm_adv_only"),
    ("qa", "fgm"),
    ("qa", "pgd"),
    ("qa", "smart"),
    ("regression", "fgm"),
    ("regression", "smart"),
]


@pytest.mark.parametrize("task,name", WEIGHT_CASES)
def test_whole_loss_ief_weights_are_the_logit_gradient_of_the_whole_loss(stand_in, task, name):
  _, _, batch, keys = stand_in
  if name == "fgm_adv_only":
    config = dataclasses.replace(CONFIGS["fgm"], combine="adv_only")
  else:
    config = CONFIGS[name]
  model = StandIn(
      num_labels=1 if task == "regression" else 2,
      question_answering=task == "qa",
      dropout_rate=0.0,
  )
  params = _init(model, jax.random.key(9))
  batch = dict(
      batch,
      start_positions=jnp.array([1, 2, 0, 0]),
      end_positions=jnp.array([3, 2, 7, 0]),
      **({"labels": jnp.array([0.5, -1.0, 2.0, 0.0])} if task == "regression" else {}),
  )
  logits_fn = models.bert_logits_fn(model)
  delta = objectives.adversarial_perturbation(
      logits_fn, config, params, batch, keys, task=task, hidden_size=H
  )
  clean = logits_fn(params, batch)
  perturbed = logits_fn(params, batch, delta)
  whole = dataclasses.replace(config, ief_weights="whole_loss")
  plain = objectives.make_loss_at_perturbation(logits_fn, config, task=task)
  for cfg, want in (
      (config, losses.ief_weights(task, clean, batch)),  # the default: the clean task term
      (whole, _whole_loss_reference(task, config, batch, clean, perturbed)),
  ):
    loss_fn = objectives.make_loss_at_perturbation(logits_fn, cfg, task=task, with_ief_weights=True)
    values, weights = jax.jit(loss_fn)(params, batch, keys, delta)
    np.testing.assert_allclose(values, plain(params, batch, keys, delta), rtol=1e-6)
    np.testing.assert_allclose(weights, want, rtol=1e-5, atol=1e-7)
  if name != "smart" or task != "regression":  # the two choices really differ
    assert np.abs(np.asarray(weights) - losses.ief_weights(task, clean, batch)).max() > 1e-3


def test_whole_loss_ief_weights_reach_the_filter_through_the_factored_path():
  """``per_example_value_and_grads(..., has_aux=True)`` returns the weights beside the losses,
  unchanged, with every leaf factored; and the training config passes the choice through."""
  from nearprox import factored_grads
  from nearprox.training import train

  config = models.tiny_config()
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0), 2, 16)
  batch, keys = _batch_and_keys()
  batch = {k: v for k, v in batch.items() if k != "mask"}
  objective = objectives.ObjectiveConfig(kind="fgm", ief_weights="whole_loss")
  logits_fn = models.bert_logits_fn(model)
  delta = objectives.adversarial_perturbation(
      logits_fn, objective, params, batch, keys, hidden_size=config.hidden_size
  )
  loss_fn = objectives.make_loss_at_perturbation(logits_fn, objective, with_ief_weights=True)
  (values, weights), grads = nearprox.per_example_value_and_grads(
      loss_fn, params, batch, keys, delta, method="factored", has_aux=True
  )
  assert (
      "fallback"
      not in factored_grads.leaf_kinds(
          lambda *a: loss_fn(*a)[0], params, batch, keys, delta
      ).values()
  )
  np.testing.assert_allclose(weights, jax.jit(loss_fn)(params, batch, keys, delta)[1], rtol=1e-5)
  want = _whole_loss_reference(
      "classification", objective, batch, logits_fn(params, batch), logits_fn(params, batch, delta)
  )
  np.testing.assert_allclose(weights, want, rtol=1e-5, atol=1e-7)
  assert jax.tree.leaves(grads)
  # The training config: objective.ief_weights reaches ObjectiveConfig (default: clean_term).
  from experiments.configs import default

  training = default.get_config()
  assert train.objective_config(training).ief_weights == "clean_term"
  training.objective.ief_weights = "whole_loss"
  assert train.objective_config(training) == dataclasses.replace(
      train.objective_config(default.get_config()), ief_weights="whole_loss"
  )
  with pytest.raises(
      ValueError, match=r"ief_weights must be one of \('clean_term', 'whole_loss'\)"
  ):
    objectives.ObjectiveConfig(kind="fgm", ief_weights="both")
