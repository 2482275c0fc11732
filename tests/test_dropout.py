"""Per-example dropout (nearprox.text.models.dropout) and the factored gradients with it on.

Example i's masks come from its own key, drawn inside one batched pass; the references are
the same model applied to example i alone (a batch of one) and, for the gradients, the vmap
oracle, which applies the model to one example at a time with that example's key.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nearprox import factored_grads
from nearprox.text import models
from nearprox.text.models.dropout import ExampleDropout, example_masks, site_id
from tests.test_factored import assert_trees_close, filtered_jit, gram_of, value_and_grads


class Site(nn.Module):
  """One ExampleDropout at path (name,), as inside a model."""

  rate: float
  site: str

  @nn.compact
  def __call__(self, x, keys, deterministic):
    return ExampleDropout(self.rate, name=self.site)(x, keys, deterministic)


def dropout(x, keys, rate=0.25, deterministic=False, name="site"):
  return Site(rate, name).apply({}, x, keys, deterministic)


def keys_of(seed, batch):
  return jax.random.split(jax.random.key(seed), batch)


# ------------------------------------------------------------------------ the module alone


def test_mask_of_example_i_depends_on_its_key_and_the_site_only():
  x = jnp.ones((4, 6, 8))
  keys = keys_of(0, 4)
  y = dropout(x, keys)
  for i in range(4):  # a batch of one reproduces its row; the other examples do not matter
    np.testing.assert_array_equal(dropout(x[i : i + 1], keys[i : i + 1])[0], y[i])
  # The reference formula: row i = bernoulli(fold_in(k_i, crc32(path)), 1 − p) / (1 − p).
  site = site_id(("site",))
  for i in range(4):
    kept = jax.random.bernoulli(jax.random.fold_in(keys[i], np.uint32(site)), 0.75, (6, 8))
    np.testing.assert_array_equal(y[i], np.where(kept, 1 / 0.75, 0.0).astype(np.float32))
  # Different examples, keys and sites draw different masks.
  assert not np.array_equal(y[0], y[1])
  assert not np.array_equal(y, dropout(x, keys_of(1, 4)))
  assert not np.array_equal(y, dropout(x, keys, name="other_site"))
  # Raw uint32 keys [B, 2] give the same masks as the typed keys.
  np.testing.assert_array_equal(dropout(x, jax.random.key_data(keys)), y)


def test_identity_when_deterministic_or_rate_zero():
  x = jax.random.normal(jax.random.key(0), (3, 5))
  np.testing.assert_array_equal(dropout(x, keys_of(0, 3), deterministic=True), x)
  np.testing.assert_array_equal(dropout(x, None, deterministic=True), x)
  np.testing.assert_array_equal(dropout(x, keys_of(0, 3), rate=0.0), x)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_and_scaling(rate):
  x = jnp.full((64, 128, 16), 2.0, jnp.bfloat16)
  y = dropout(x, keys_of(3, 64), rate=rate)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  kept = np.asarray(y != 0)
  # 131072 Bernoulli draws: the standard error of the mean is below 0.0014.
  assert abs(kept.mean() - (1 - rate)) < 0.01
  np.testing.assert_allclose(np.asarray(y, np.float32)[kept], 2.0 / (1 - rate), rtol=1e-2)
  # Each example keeps about 1 − rate of its own entries too (the masks are not shared).
  assert np.all(np.abs(kept.reshape(64, -1).mean(axis=1) - (1 - rate)) < 0.05)


def test_missing_or_misshaped_keys_raise():
  x = jnp.ones((3, 5))
  with pytest.raises(ValueError, match="needs per-example dropout keys"):
    dropout(x, None)
  with pytest.raises(ValueError, match="one key per example"):
    dropout(x, keys_of(0, 2))
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    dropout(x, keys_of(0, 3), rate=1.0)


def test_example_masks_vmaps_only_the_draw():
  keys = keys_of(0, 3)
  masks = example_masks(keys, 7, 0.5, (4,))
  for i in range(3):
    np.testing.assert_array_equal(
        masks[i], jax.random.bernoulli(jax.random.fold_in(keys[i], np.uint32(7)), 0.5, (4,))
    )


# -------------------------------------------------------------------------------- the models


def site_paths(fn, *args):
  """{path: site id} of every ExampleDropout call made by ``fn(*args)`` (traced only)."""
  sites = {}

  def record(next_fun, call_args, kwargs, context):
    if isinstance(context.module, ExampleDropout) and context.method_name == "__call__":
      sites[context.module.path] = context.module.site_id
    return next_fun(*call_args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(fn, *args)
  return sites


def tiny_bert(batch=3, length=6, seed=0, layers=1):
  config = models.tiny_config(
      num_hidden_layers=layers, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3
  )
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(seed), batch, length)
  ids = jax.random.randint(jax.random.key(seed + 1), (batch, length), 1, config.vocab_size)
  mask = jnp.ones((batch, length), jnp.int32).at[1, 4:].set(0)
  return model, params, {"input_ids": ids * mask, "attention_mask": mask}


def tiny_seq2seq(dropout_rate=0.3, layers=1):
  config = models.Seq2SeqConfig(
      vocab_size=50,
      num_encoder_layers=layers,
      num_decoder_layers=layers,
      hidden_size=16,
      num_heads=2,
      intermediate_size=32,
      dropout_rate=dropout_rate,
      max_length=8,
  )
  model = models.Seq2SeqTransformer(config)
  params = models.init_seq2seq(config, jax.random.key(0))
  source = jnp.array([[5, 6, 7, 2, 0], [8, 9, 2, 0, 0], [11, 12, 13, 14, 2], [6, 5, 2, 0, 0]])
  target_out = jnp.array([[4, 5, 6, 2], [7, 8, 2, 0], [20, 21, 5, 2], [2, 0, 0, 0]])
  target_in = jnp.concatenate([jnp.ones((4, 1), jnp.int32), target_out[:, :-1]], axis=1)
  target_in = jnp.where(target_out == 0, 0, target_in)
  return model, params, source, target_in, target_out


def test_bert_batch_row_equals_the_example_alone_with_its_key():
  model, params, batch = tiny_bert()
  logits_fn = jax.jit(models.bert_logits_fn(model, deterministic=False))
  keys = keys_of(4, 3)
  delta = 0.1 * jax.random.normal(jax.random.key(9), (3, 6, 32))
  out = logits_fn(params, batch, delta, keys)
  clean = models.bert_logits_fn(model)(params, batch, delta)
  assert not np.allclose(out, clean, atol=1e-3)
  assert not np.allclose(out, logits_fn(params, batch, delta, keys_of(5, 3)), atol=1e-3)
  for i in range(3):
    one = {k: v[i : i + 1] for k, v in batch.items()}
    np.testing.assert_allclose(
        logits_fn(params, one, delta[i : i + 1], keys[i : i + 1])[0], out[i], rtol=1e-5, atol=1e-6
    )
  with pytest.raises(ValueError, match="dropout keys"):
    logits_fn(params, batch, delta)


def test_seq2seq_batch_row_equals_the_example_alone_with_its_key():
  model, params, source, target_in, _ = tiny_seq2seq()
  logits_fn = jax.jit(models.seq2seq_logits_fn(model, deterministic=False))
  batch = {"source_ids": source, "target_input_ids": target_in}
  keys = keys_of(4, 4)
  out = logits_fn(params, batch, None, keys)
  assert not np.allclose(out, models.seq2seq_logits_fn(model)(params, batch), atol=1e-3)
  for i in range(4):
    one = {k: v[i : i + 1] for k, v in batch.items()}
    np.testing.assert_allclose(
        logits_fn(params, one, None, keys[i : i + 1])[0], out[i], rtol=1e-5, atol=1e-6
    )
  # Rate 0 with dropout on is the deterministic model.
  model0, params0, *_ = tiny_seq2seq(dropout_rate=0.0)
  np.testing.assert_allclose(
      models.seq2seq_logits_fn(model0, deterministic=False)(params0, batch, None, keys),
      models.seq2seq_logits_fn(model0)(params0, batch),
      rtol=1e-6,
  )


def test_sites_are_distinct_and_stable_in_deep_models():
  model, params, batch = tiny_bert(layers=12)
  bert = site_paths(
      lambda p, b, k: models.bert_logits_fn(model, deterministic=False)(p, b, None, k),
      params,
      batch,
      keys_of(0, 3),
  )
  # Embeddings, then per layer: attention probs, attention output, feed-forward; classifier.
  assert len(bert) == 1 + 3 * 12 + 1
  assert len(set(bert.values())) == len(bert)
  path = ("bert", "encoder", "layer_3", "attention", "self", "ExampleDropout_0")
  assert bert[path] == site_id(path)  # the id is a function of the path only
  model, params, source, target_in, _ = tiny_seq2seq(layers=6)
  seq2seq = site_paths(
      lambda p, s, t, k: model.apply({"params": p}, s, t, deterministic=False, dropout_keys=k),
      params,
      source,
      target_in,
      keys_of(0, 4),
  )
  # Embedding sums, and per layer each residual branch plus the feed-forward's hidden layer.
  assert len(seq2seq) == 2 + 6 * 3 + 6 * 4
  assert len(set(seq2seq.values())) == len(seq2seq)
  assert not set(seq2seq.values()) & set(bert.values())


# ------------------------------------------------------------ factored gradients with dropout


def bert_loss(model):
  logits_fn = models.bert_logits_fn(model, deterministic=False)

  def loss_fn(params, ids, mask, labels, keys):
    logits = logits_fn(params, {"input_ids": ids, "attention_mask": mask}, None, keys)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  return loss_fn


def seq2seq_loss(model):
  logits_fn = models.seq2seq_logits_fn(model, deterministic=False)

  def loss_fn(params, source, target_in, target_out, keys):
    batch = {"source_ids": source, "target_input_ids": target_in}
    tokens = optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, batch, None, keys), target_out
    )
    real = (target_out != 0).astype(tokens.dtype)
    return jnp.sum(tokens * real, axis=1) / jnp.sum(real, axis=1)

  return loss_fn


def bert_problem():
  model, params, batch = tiny_bert(batch=4)
  labels = jnp.arange(4) % 2
  args = (batch["input_ids"], batch["attention_mask"], labels, keys_of(7, 4))
  return bert_loss(model), params, args


def seq2seq_problem():
  model, params, source, target_in, target_out = tiny_seq2seq()
  return seq2seq_loss(model), params, (source, target_in, target_out, keys_of(7, 4))


@pytest.mark.parametrize("problem", [bert_problem, seq2seq_problem])
def test_factored_with_dropout_takes_no_fallback_and_equals_vmap(problem):
  loss_fn, params, args = problem()
  kinds = factored_grads.leaf_kinds(loss_fn, params, *args)
  assert "fallback" not in kinds.values() and "unused" not in kinds.values(), kinds
  losses_v, grads_v = value_and_grads(loss_fn, params, args, "vmap")
  losses_f, grads_f = value_and_grads(loss_fn, params, args)
  np.testing.assert_allclose(losses_f, losses_v, rtol=1e-5)
  # Dropout is on: other keys give other losses.
  assert not np.allclose(losses_f, loss_fn(params, *args[:-1], keys_of(8, 4)), rtol=1e-3)
  np.testing.assert_allclose(gram_of(grads_f), gram_of(grads_v), rtol=1e-4, atol=1e-7)
  assert_trees_close(filtered_jit(grads_f, params), filtered_jit(grads_v, params))
