"""The factored per-example gradients (nearprox.factored_grads) against exact oracles."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nearprox
from nearprox import base, factored_grads, layer_factors, sketch, spectral_filter, tied_embed_factor
from nearprox.text import models
from tests.encoder_numbers import encoder_gathered_numbers

DAMPING = 1e-2


# ----------------------------------------------------------------------------- helpers


def assert_trees_close(actual, expected, rtol=2e-4, atol=2e-6):
  """Leafwise allclose; atol is relative to the largest entry of the whole tree (some leaves,
  like attention key biases, have gradients that are exactly zero up to rounding)."""
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(expected)) + 1e-12
  for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)
  ):
    np.testing.assert_allclose(
        np.asarray(a),
        np.asarray(b),
        rtol=rtol,
        atol=atol * scale,
        err_msg=jax.tree_util.keystr(path),
    )


def filtered(per_example, params, mask=None, filter="tikhonov", **kwargs):
  tx = nearprox.scale_by_proximal(DAMPING, filter=filter, damping_mode="relative", **kwargs)
  updates, _ = tx.update(per_example, tx.init(params), mask=mask)
  return updates


def value_and_grads(loss_fn, params, args, method="factored", **kwargs):
  """Jitted (one compile beats hundreds of eager dispatches, even for tiny models)."""
  if method == "factored":
    fn = lambda p, *a: factored_grads.factored_value_and_grads(loss_fn, p, *a, **kwargs)
  else:
    fn = lambda p, *a: nearprox.per_example_value_and_grads(loss_fn, p, *a, method=method)
  return jax.jit(fn)(params, *args)


@jax.jit
def gram_of(per_example):
  return spectral_filter.gram_matrix(per_example)


def filtered_jit(per_example, params, mask=None, filter="tikhonov"):
  return jax.jit(filtered, static_argnames="filter")(per_example, params, mask, filter=filter)


def leaf_types(per_example):
  return jax.tree.leaves(
      jax.tree.map(lambda x: type(x).__name__, per_example, is_leaf=base.is_factor)
  )


class TokenModel(nn.Module):
  """Embedding, multi-head DenseGeneral in and out, a shared Dense, norms, pooled head."""

  vocab: int = 40
  dim: int = 8

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(self.vocab, self.dim)(ids)  # [B, T, D]
    h = nn.relu(nn.DenseGeneral((2, 4))(x))  # [B, T, heads, head_dim]
    x = x + nn.DenseGeneral(self.dim, axis=(-2, -1), use_bias=False)(h)
    shared = nn.Dense(self.dim)  # called twice
    x = shared(nn.LayerNorm()(x))
    x = shared(jnp.tanh(nn.RMSNorm()(x)))
    return nn.Dense(3)(x.mean(axis=1))


class UnsupportedModel(nn.Module):
  """A conv, a custom self.param and a table also read outside its layer's calls: the exact
  fallback."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(12, 6)
    x = nn.Conv(6, kernel_size=(3,))(embed(ids))
    scale = self.param("scale", nn.initializers.ones, (6,))
    x = nn.Dense(6)(x * scale)
    return x.mean(axis=1) @ embed.embedding.T  # the table read directly, not via attend


class TiedModel(nn.Module):
  """A table looked up and reused as the output projection (``Embed.attend``)."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(40, 8)
    x = nn.Dense(8)(embed(ids))
    return embed.attend(jnp.tanh(x.mean(axis=1)))[:, :3]


def token_problem(model, batch=6, length=5, vocab=40, seed=0):
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 0, vocab)
  labels = jax.random.randint(jax.random.key(seed + 1), (batch,), 0, 3)
  params = model.init(jax.random.key(seed + 2), ids)["params"]

  def loss_fn(p, ids, labels):
    logits = model.apply({"params": p}, ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  return loss_fn, params, (ids, labels)


def tiny_bert(batch=4, length=8, deterministic=True, seed=0):
  config = models.tiny_config(num_hidden_layers=1)
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(seed), batch, length)
  ids = jax.random.randint(jax.random.key(seed + 1), (batch, length), 1, config.vocab_size)
  attention_mask = jnp.ones((batch, length), jnp.int32).at[1, 5:].set(0).at[2, 3:].set(0)
  ids = ids * attention_mask  # padded tokens: id 0 and attention_mask 0
  labels = jnp.arange(batch) % 2
  dropout = jax.random.key(seed + 2)

  def loss_fn(p, ids, attention_mask, labels):
    logits = model.apply(
        {"params": p},
        ids,
        attention_mask=attention_mask,
        deterministic=deterministic,
        dropout_keys=None if deterministic else jax.random.split(dropout, ids.shape[0]),
    ).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  return loss_fn, params, (ids, attention_mask, labels)


@functools.partial(jax.jit, static_argnames="filters")
def all_filtered(per_example, params, mask, filters=("tikhonov", "natural")):
  """{(filter, masked): d} for both filters, without and with the mask: one compile."""
  return {
      (f, m is not None): filtered(per_example, params, m, f) for f in filters for m in (None, mask)
  }


@pytest.fixture(scope="module")
def token_case():
  loss_fn, params, args = token_problem(TokenModel())
  return loss_fn, params, args, value_and_grads(loss_fn, params, args, "vmap")[1]


# ------------------------------------------------------------------ equality with the oracles


def test_tiny_bert_factored_equals_vmap():
  loss_fn, params, args = tiny_bert()
  losses_v, grads_v = value_and_grads(loss_fn, params, args, "vmap")
  losses_f, grads_f = value_and_grads(loss_fn, params, args)
  np.testing.assert_allclose(losses_f, losses_v, rtol=1e-5)
  kinds = leaf_types(grads_f)
  assert kinds.count("DenseFactor") == 6 + 2  # q, k, v, out, ffn in, out; pooler, head
  assert kinds.count("EmbedFactor") == 3
  assert "ArrayImpl" in kinds  # biases and LayerNorms, materialized
  np.testing.assert_allclose(gram_of(grads_f), gram_of(grads_v), rtol=1e-4, atol=1e-7)
  mask = jnp.array([1, 1, 0, 1])
  assert_trees_close(all_filtered(grads_f, params, mask), all_filtered(grads_v, params, mask))


@pytest.mark.parametrize("kernel_combine", ["factored", "materialized"])
def test_token_model_factored_equals_vmap(token_case, kernel_combine):
  loss_fn, params, args, grads_v = token_case
  _, grads_f = value_and_grads(loss_fn, params, args, kernel_combine=kernel_combine)
  # Every kernel and table is factored, the shared Dense's two calls in one factor.
  assert isinstance(grads_f["Dense_0"]["kernel"], layer_factors.DenseFactor)
  assert grads_f["Dense_0"]["kernel"].inputs.shape == (6, 2 * 5, 8)
  assert isinstance(grads_f["DenseGeneral_0"]["kernel"], layer_factors.DenseFactor)
  assert isinstance(grads_f["DenseGeneral_1"]["kernel"], layer_factors.DenseFactor)
  assert isinstance(grads_f["Embed_0"]["embedding"], layer_factors.EmbedFactor)
  combine = jax.jit(spectral_filter.combine)
  assert_trees_close(combine(grads_f, jnp.arange(6.0)), combine(grads_v, jnp.arange(6.0)))
  mask = jnp.array([1, 0, 1, 1, 1, 0])
  assert_trees_close(all_filtered(grads_f, params, mask), all_filtered(grads_v, params, mask))


def test_masked_rows_with_nan_do_not_leak(token_case):
  loss_fn, params, args, grads_v = token_case
  _, grads_f = value_and_grads(loss_fn, params, args)
  poisoned = jax.tree.map(
      lambda x: x.at[1].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, grads_f
  )
  mask = jnp.array([1, 0, 1, 1, 1, 1])
  assert_trees_close(filtered_jit(poisoned, params, mask), filtered_jit(grads_v, params, mask))


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_update_is_invariant_to_the_scale_of_the_loss(filter):
  """A loss scaled by s scales every cotangent (and so the factors' δ and the materialized
  leaves) by s; with relative damping d/s is unchanged, far beyond float32's range for K."""
  loss_fn, params, args = token_problem(TokenModel())
  want = filtered_jit(value_and_grads(loss_fn, params, args)[1], params, filter=filter)
  for scale in (1e-30, 1e30):
    scaled_loss = lambda p, *a: scale * loss_fn(p, *a)
    got = filtered_jit(value_and_grads(scaled_loss, params, args)[1], params, filter=filter)
    assert_trees_close(jax.tree.map(lambda x: np.asarray(x, np.float64) / scale, got), want)


def test_dropout_matches_full_batch_jacobian():
  loss_fn, params, args = tiny_bert(deterministic=False)
  losses_f, grads_f = value_and_grads(loss_fn, params, args)
  # Exact oracle with the same single full-batch evaluation (same dropout masks).
  losses = loss_fn(params, *args)
  jacobian = jax.jit(jax.jacrev(lambda p: loss_fn(p, *args)))(params)
  np.testing.assert_allclose(losses_f, losses, rtol=1e-6)
  np.testing.assert_allclose(gram_of(grads_f), gram_of(jacobian), rtol=1e-4, atol=1e-7)
  assert_trees_close(filtered_jit(grads_f, params), filtered_jit(jacobian, params))


def test_unsupported_layers_fall_back_exactly():
  loss_fn, params, args = token_problem(UnsupportedModel(), vocab=12)
  args = (args[0], args[1] % 3)
  _, grads_v = value_and_grads(loss_fn, params, args, "vmap")
  _, grads_f = value_and_grads(loss_fn, params, args)
  assert isinstance(grads_f["Dense_0"]["kernel"], layer_factors.DenseFactor)
  assert factored_grads.leaf_kinds(loss_fn, params, *args) == {
      "['Conv_0']['bias']": "fallback",
      "['Conv_0']['kernel']": "fallback",
      "['Dense_0']['bias']": "bias",
      "['Dense_0']['kernel']": "kernel",
      "['Embed_0']['embedding']": "fallback",
      "['scale']": "fallback",
  }
  # Conv, the custom param and the tied table come back as exact dense per-example arrays.
  for leaf in (grads_f["Conv_0"]["kernel"], grads_f["scale"], grads_f["Embed_0"]["embedding"]):
    assert isinstance(leaf, jax.Array) and leaf.shape[0] == 6
  assert_trees_close(grads_f["Conv_0"], grads_v["Conv_0"])
  assert_trees_close(grads_f["Embed_0"], grads_v["Embed_0"])
  assert_trees_close(filtered_jit(grads_f, params), filtered_jit(grads_v, params))


@pytest.mark.parametrize("method", ["vmap", "factored"])
@pytest.mark.parametrize("model", [TokenModel, UnsupportedModel])
def test_aux_outputs_come_back_beside_the_losses(method, model):
  """has_aux: (losses, aux) from the same forward, the gradients unchanged (factored and
  fallback leaves alike)."""
  model = model()
  loss_fn, params, args = token_problem(model, vocab=12)
  args = (args[0], args[1] % 3)

  def loss_with_logits(p, ids, labels):
    logits = model.apply({"params": p}, ids)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return losses, {"logits": logits, "max": jnp.max(logits, axis=-1)}

  def both(p, *a):
    with_aux = nearprox.per_example_value_and_grads(
        loss_with_logits, p, *a, method=method, has_aux=True
    )
    return with_aux, nearprox.per_example_value_and_grads(loss_fn, p, *a, method=method)

  ((losses, aux), grads), (want_losses, want_grads) = jax.jit(both)(params, *args)
  logits = model.apply({"params": params}, args[0])
  np.testing.assert_allclose(aux["logits"], logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux["max"], logits.max(axis=-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  np.testing.assert_allclose(gram_of(grads), gram_of(want_grads), rtol=1e-6)


@pytest.mark.parametrize("method", ["vmap", "factored"])
def test_aux_without_a_batch_axis_is_rejected(method):
  loss_fn, params, args = token_problem(TokenModel())
  with pytest.raises(ValueError, match=r"aux output \['total'\].*batch axis"):
    nearprox.per_example_value_and_grads(
        lambda p, *a: (loss_fn(p, *a), {"total": loss_fn(p, *a).sum()}),
        params,
        *args,
        method=method,
        has_aux=True,
    )


# ----------------------------------------------------------------------------- factor leaves


def _dense_oracle(a, d):
  return jnp.einsum("btk,btl->bkl", a, d).reshape(a.shape[0], -1)


def test_dense_gram_ghost_and_materialize_agree():
  keys = jax.random.split(jax.random.key(3), 4)
  a, d = jax.random.normal(keys[0], (5, 7, 6)), jax.random.normal(keys[1], (5, 7, 4))
  a2, d2 = jax.random.normal(keys[2], (3, 2, 6)), jax.random.normal(keys[3], (3, 2, 4))
  ghost = layer_factors.DenseFactor(a, d, (6, 2, 2), np.dtype("float32"), gram_method="ghost")
  mat = dataclasses.replace(ghost, gram_method="materialize")
  other = layer_factors.DenseFactor(a2, d2, (6, 2, 2), np.dtype("float32"))
  expected = _dense_oracle(a, d) @ _dense_oracle(a, d).T
  np.testing.assert_allclose(ghost.gram(ghost), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mat.gram(mat), expected, rtol=1e-5, atol=1e-5)
  cross = _dense_oracle(a, d) @ _dense_oracle(a2, d2).T
  np.testing.assert_allclose(ghost.gram(other), cross, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mat.gram(other), cross, rtol=1e-5, atol=1e-5)
  coeffs = jnp.linspace(-1.0, 1.0, 5)
  expected_sum = (coeffs @ _dense_oracle(a, d)).reshape(6, 2, 2)
  for combine_method in layer_factors.COMBINE_METHODS:
    leaf = dataclasses.replace(mat, combine_method=combine_method)
    np.testing.assert_allclose(leaf.combine(coeffs), expected_sum, rtol=1e-5, atol=1e-5)
  assert layer_factors.dense_gram_method(32, 64, 32, 64, 384, 1536, True) == "materialize"
  assert layer_factors.dense_gram_method(32, 1, 32, 1, 384, 2, True) == "ghost"


def test_embed_gram_mask_and_materialize_agree():
  ids = jnp.array([[1, 2, 1, -1], [3, 3, 0, 2], [4, 4, 4, 4]])
  ids = jnp.where(ids < 0, ids + 5, ids)
  delta = jax.random.normal(jax.random.key(4), (3, 4, 3))
  dense = jax.vmap(lambda i, d: jnp.zeros((5, 3)).at[i].add(d))(ids, delta).reshape(3, -1)
  mask_form = layer_factors.EmbedFactor(ids, delta, 5, np.dtype("float32"), gram_method="ghost")
  mat_form = dataclasses.replace(mask_form, gram_method="materialize")
  for leaf in (mask_form, mat_form):
    np.testing.assert_allclose(leaf.gram(leaf), dense @ dense.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        leaf.combine(jnp.array([1.0, -2.0, 0.5])),
        (jnp.array([1.0, -2.0, 0.5]) @ dense).reshape(5, 3),
        rtol=1e-5,
    )


def test_factor_leaves_are_pytrees_with_batch_first():
  leaf = layer_factors.DenseFactor(
      jnp.ones((4, 3, 2)), jnp.ones((4, 3, 5)), (2, 5), np.dtype("float32")
  )
  children, treedef = jax.tree.flatten(leaf)
  assert [c.shape[0] for c in children] == [4, 4]
  rebuilt = jax.tree.unflatten(treedef, [c[:2] for c in children])
  assert isinstance(rebuilt, layer_factors.DenseFactor) and rebuilt.kernel_shape == (2, 5)
  with pytest.raises(ValueError, match="gram_method"):
    layer_factors.DenseFactor(leaf.inputs, leaf.cotangents, (2, 5), np.dtype("float32"), "fast")
  with pytest.raises(ValueError, match="cannot take inner products"):
    leaf.gram(
        layer_factors.EmbedFactor(
            jnp.zeros((4, 3), jnp.int32), jnp.ones((4, 3, 5)), 7, np.dtype("float32")
        )
    )


# ----------------------------------------------------------------------------- devices, jit, errors


@pytest.mark.parametrize("model", [TokenModel, TiedModel])
def test_global_gram_under_pmap_equals_single_device(model):
  devices = jax.local_device_count()
  assert devices == 8, "tests/conftest.py sets 8 host devices"
  loss_fn, params, args = token_problem(model(), batch=16)
  mask = jnp.ones((16,)).at[jnp.array([3, 10, 11])].set(0)

  def device_update(params, ids, labels, mask):
    _, grads = nearprox.per_example_value_and_grads(loss_fn, params, ids, labels, method="factored")
    return filtered(grads, params, mask, axis_name="batch", gram="global")

  shard = lambda x: x.reshape((devices, -1) + x.shape[1:])
  per_device = jax.pmap(device_update, axis_name="batch", in_axes=(None, 0, 0, 0))(
      params, *map(shard, args), shard(mask)
  )
  _, grads = value_and_grads(loss_fn, params, args)
  single = filtered_jit(grads, params, mask)
  assert_trees_close(jax.tree.map(lambda x: x[0], per_device), single)
  assert_trees_close(jax.tree.map(lambda x: x[5], per_device), single)


def test_jit_does_not_retrace():
  loss_fn, params, args = token_problem(TokenModel())
  traces = []
  tx = nearprox.proximal_sgd(0.1, DAMPING)

  @jax.jit
  def step(params, state, ids, labels):
    traces.append(None)
    _, grads = nearprox.per_example_value_and_grads(loss_fn, params, ids, labels, method="factored")
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for seed in range(3):
    _, _, (ids, labels) = token_problem(TokenModel(), seed=seed)
    params, state = step(params, state, ids, labels)
  assert len(traces) == 1


def test_global_bytes_formula_matches_shapes():
  config = models.tiny_config(num_labels=2)
  model = models.BertForSequenceClassification(config)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 2, 8))
  ids = jax.ShapeDtypeStruct((4, 8), jnp.int32)

  def loss_fn(p, ids):
    return model.apply({"params": p}, ids).logits[:, 0]

  measured = factored_grads.gathered_bytes_per_device(loss_fn, params, ids)
  numbers = encoder_gathered_numbers(
      config.num_hidden_layers, config.hidden_size, config.intermediate_size, 8, 2
  )
  assert measured == 4 * 4 * numbers
  # docs/method.md §2.8's figure: BERT-base, B = 32, T = 128.
  assert encoder_gathered_numbers(12, 768, 3072, 128, 2) * 4 * 32 == 2_771_632_640


def test_bad_inputs_raise():
  loss_fn, params, args = token_problem(TokenModel())
  with pytest.raises(ValueError, match="per-example losses"):
    factored_grads.factored_value_and_grads(lambda p, *a: loss_fn(p, *a).mean(), params, *args)
  with pytest.raises(ValueError, match="kernel_combine"):
    factored_grads.factored_value_and_grads(loss_fn, params, *args, kernel_combine="fast")


# ----------------------------------------------------------------------------- tied embeddings


def tiny_seq2seq():
  """A 1 + 1 layer encoder–decoder, padding in sources and targets; loss = mean token CE."""
  config = models.Seq2SeqConfig(
      vocab_size=50,
      num_encoder_layers=1,
      num_decoder_layers=1,
      hidden_size=16,
      num_heads=2,
      intermediate_size=32,
      max_length=8,
  )
  model = models.Seq2SeqTransformer(config)
  params = models.init_seq2seq(config, jax.random.key(0))
  source = jnp.array([[5, 6, 7, 2, 0], [8, 9, 2, 0, 0], [11, 12, 13, 14, 2], [6, 5, 2, 0, 0]])
  target_out = jnp.array([[4, 5, 6, 2], [7, 8, 2, 0], [20, 21, 5, 2], [2, 0, 0, 0]])
  target_in = jnp.concatenate([jnp.ones((4, 1), jnp.int32), target_out[:, :-1]], axis=1)
  target_in = jnp.where(target_out == 0, 0, target_in)

  def loss_fn(p, source, target_in, target_out):
    logits = model.apply({"params": p}, source, target_in)
    tokens = optax.softmax_cross_entropy_with_integer_labels(logits, target_out)
    real = (target_out != 0).astype(tokens.dtype)
    return jnp.sum(tokens * real, axis=1) / jnp.sum(real, axis=1)

  return loss_fn, params, (source, target_in, target_out)


@pytest.fixture(scope="module")
def seq2seq_case():
  loss_fn, params, args = tiny_seq2seq()
  return (
      loss_fn,
      params,
      args,
      value_and_grads(loss_fn, params, args, "vmap"),
      value_and_grads(loss_fn, params, args),
  )


def test_seq2seq_factored_equals_vmap(seq2seq_case):
  loss_fn, params, args, (losses_v, grads_v), (losses_f, grads_f) = seq2seq_case
  kinds = factored_grads.leaf_kinds(loss_fn, params, *args)
  assert "fallback" not in kinds.values() and "unused" not in kinds.values()
  assert kinds["['token_embed']['embedding']"] == "tied_embed"
  for part in ("query", "key", "value", "out"):  # cross-attention: decoder queries, memory keys
    assert kinds[f"['decoder']['layer_0']['cross_attention']['{part}']['kernel']"] == "kernel"
  tied = grads_f["token_embed"]["embedding"]
  assert isinstance(tied, tied_embed_factor.TiedEmbedFactor)
  assert tied.lookup.ids.shape == (4, 5 + 4)  # source and target lookups, concatenated
  assert tied.projection.inputs.shape == (4, 4, 50)  # the logits' cotangents
  np.testing.assert_allclose(losses_f, losses_v, rtol=1e-5)
  np.testing.assert_allclose(
      jax.jit(lambda t: t._per_example())(tied).reshape(4, 50, 16),
      grads_v["token_embed"]["embedding"],
      rtol=1e-4,
      atol=1e-6,
  )
  np.testing.assert_allclose(gram_of(grads_f), gram_of(grads_v), rtol=1e-4, atol=1e-7)
  combine = jax.jit(spectral_filter.combine)
  assert_trees_close(combine(grads_f, jnp.arange(4.0)), combine(grads_v, jnp.arange(4.0)))
  mask = jnp.array([1, 1, 0, 1])
  assert_trees_close(all_filtered(grads_f, params, mask), all_filtered(grads_v, params, mask))


@pytest.mark.parametrize("method", layer_factors.GRAM_METHODS)
def test_tied_gram_rescale_and_sketch_match_the_dense_gradients(seq2seq_case, method):
  *_, (_, grads_v), (_, grads_f) = seq2seq_case
  tied = dataclasses.replace(grads_f["token_embed"]["embedding"], gram_method=method)
  dense = np.asarray(grads_v["token_embed"]["embedding"], np.float64)  # [B, V, D]
  flat = dense.reshape(4, -1)
  # Against other examples too (the gram="global" case): rows 1..3 as the "other" side.
  other = jax.tree.map(lambda x: x[1:], tied)

  @jax.jit
  def numbers(tied, other):
    scaled = tied.rescale(jnp.int32(-5))
    return tied.gram(tied), tied.gram(other), scaled.gram(scaled), scaled.combine(jnp.ones(4))

  gram, cross, scaled_gram, scaled_sum = numbers(tied, other)
  np.testing.assert_allclose(gram, flat @ flat.T, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(cross, flat @ flat[1:].T, rtol=1e-4, atol=1e-8)
  np.testing.assert_allclose(scaled_gram, flat @ flat.T / 4**5, rtol=1e-4, atol=1e-10)
  # A float32 sum of B terms: its rounding error scales with Σ|terms|, not with |Σ terms|.
  want_sum, terms = dense.sum(0) / 2**5, np.abs(dense).sum(0) / 2**5
  assert np.all(np.abs(scaled_sum - want_sum) <= 1e-4 * np.abs(want_sum) + 1e-6 * terms)
  # |g| ≤ Σ_parts T·max|a|·max|δ| ≤ (T_l + T_p)·2^e
  assert 2.0 ** int(tied.log2_scale()) >= np.abs(dense).max() / (9 + 4)
  # Sketch: S₁ᵀ g_i S₂ with nearprox.sketch's matrices; sketched when it is the cheaper Gram.
  key = jax.random.key(7)
  features = tied.sketch(key, 16, 10_000)
  k1, k2 = sketch.side_dims(50, 16, 16)
  want = sketch.array_features(jnp.asarray(dense, jnp.float32), key, k1, k2)
  np.testing.assert_allclose(features, want, rtol=1e-4, atol=1e-6)


def test_seq2seq_sketched_filter_runs_on_the_factored_path(seq2seq_case):
  """With a sketch, every factored leaf (tied table included) feeds the same transformation."""
  *_, (_, grads_f) = seq2seq_case
  params = seq2seq_case[1]
  exact = filtered_jit(grads_f, params)
  sketched = jax.jit(lambda g: filtered(g, params, sketch_dim=1 << 20))(grads_f)
  assert_trees_close(sketched, exact)  # k beyond every leaf's size: nothing is sketched
  small = jax.jit(lambda g: filtered(g, params, sketch_dim=4))(grads_f)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(small))
