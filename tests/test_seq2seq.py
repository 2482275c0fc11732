"""The encoder–decoder Transformer (nearprox.text.models.seq2seq) and its decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nearprox.text import decoding, models

PAD, BOS, EOS = 0, 1, 2


def tiny(vocab=50, dropout=0.0, max_length=12, seed=0):
  config = models.Seq2SeqConfig(
      vocab_size=vocab,
      num_encoder_layers=1,
      num_decoder_layers=1,
      hidden_size=16,
      num_heads=2,
      intermediate_size=32,
      dropout_rate=dropout,
      max_length=max_length,
  )
  model = models.Seq2SeqTransformer(config)
  return model, models.init_seq2seq(config, jax.random.key(seed))


def logits(model, params, source, target, **kwargs):
  return model.apply({"params": params}, jnp.asarray(source), jnp.asarray(target), **kwargs)


SOURCE = [[5, 6, 7, 2, 0], [8, 9, 2, 0, 0], [11, 12, 13, 14, 2]]
TARGET = [[1, 4, 5, 6], [1, 7, 8, 0], [1, 20, 21, 22]]


# ----------------------------------------------------------------------------- the model


def test_shapes_and_encode_decode_compose():
  model, params = tiny()
  out = logits(model, params, SOURCE, TARGET)
  assert out.shape == (3, 4, 50)
  memory = model.apply({"params": params}, jnp.asarray(SOURCE), method="encode")
  assert memory.shape == (3, 5, 16)
  again = model.apply(
      {"params": params}, memory, jnp.asarray(SOURCE), jnp.asarray(TARGET), method="decode"
  )
  np.testing.assert_allclose(again, out, rtol=1e-6, atol=1e-6)
  # One table, tied to the output projection: no separate output kernel.
  assert set(params) == {"token_embed", "encoder", "decoder"}
  assert params["token_embed"]["embedding"].shape == (50, 16)


def test_padding_does_not_change_the_real_positions():
  model, params = tiny()
  short_source = [[5, 6, 7, 2]]
  padded_source = [[5, 6, 7, 2, 0, 0, 0]]
  target = [[1, 4, 5]]
  padded_target = [[1, 4, 5, 0, 0]]
  want = logits(model, params, short_source, target)
  got = logits(model, params, padded_source, padded_target)
  np.testing.assert_allclose(got[:, :3], want, rtol=1e-5, atol=1e-5)
  # A perturbation of padded source positions changes nothing either.
  delta = jnp.zeros((1, 7, 16)).at[:, 4:].set(5.0)
  perturbed = logits(model, params, padded_source, padded_target, source_embedding_delta=delta)
  np.testing.assert_allclose(perturbed, got, rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_and_examples_are_independent():
  model, params = tiny()
  base = logits(model, params, SOURCE, TARGET)
  changed_target = np.array(TARGET)
  changed_target[:, 2:] = 33
  changed = logits(model, params, SOURCE, changed_target)
  np.testing.assert_allclose(changed[:, :2], base[:, :2], rtol=1e-5, atol=1e-5)
  assert not np.allclose(changed[:, 2:], base[:, 2:], atol=1e-3)
  # Row 0 alone gives row 0 of the batch.
  alone = logits(model, params, SOURCE[:1], TARGET[:1])
  np.testing.assert_allclose(alone[0], base[0], rtol=1e-5, atol=1e-5)


def test_source_delta_moves_the_logits_and_bad_shapes_raise():
  model, params = tiny()
  base = logits(model, params, SOURCE, TARGET)
  delta = 0.5 * jax.random.normal(jax.random.key(1), (3, 5, 16))
  moved = logits(model, params, SOURCE, TARGET, source_embedding_delta=delta)
  assert not np.allclose(moved, base, atol=1e-3)
  zero = logits(model, params, SOURCE, TARGET, source_embedding_delta=jnp.zeros((3, 5, 16)))
  np.testing.assert_allclose(zero, base, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="source_embedding_delta shape"):
    logits(model, params, SOURCE, TARGET, source_embedding_delta=jnp.zeros((3, 4, 16)))
  with pytest.raises(ValueError, match="max_length"):
    logits(model, params, np.ones((1, 13), np.int32), TARGET[:1])
  with pytest.raises(ValueError, match="integer array"):
    logits(model, params, np.ones((1, 3), np.float32), TARGET[:1])


def test_logits_fn_mirrors_bert_logits_fn():
  model, params = tiny(dropout=0.3)
  batch = {"source_ids": jnp.asarray(SOURCE), "target_input_ids": jnp.asarray(TARGET)}
  clean = models.seq2seq_logits_fn(model, deterministic=True)(params, batch)
  np.testing.assert_allclose(clean, logits(model, params, SOURCE, TARGET), rtol=1e-6)
  noisy = models.seq2seq_logits_fn(model, deterministic=False)
  with pytest.raises(ValueError, match="dropout keys"):
    noisy(params, batch)
  keys = jax.random.split(jax.random.key(0), 3)
  delta = jnp.ones((3, 5, 16))
  out = noisy(params, batch, delta, keys)
  assert out.shape == (3, 4, 50) and not np.allclose(out, clean, atol=1e-3)
  # Example i's dropout depends on its own key only: a batch of one reproduces its row.
  one = {k: v[1:2] for k, v in batch.items()}
  np.testing.assert_allclose(
      noisy(params, one, delta[1:2], keys[1:2])[0], out[1], rtol=1e-5, atol=1e-6
  )


def test_bad_configs_raise():
  with pytest.raises(ValueError, match="multiple of num_heads"):
    models.Seq2SeqConfig(vocab_size=10, hidden_size=10, num_heads=4)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    models.Seq2SeqConfig(vocab_size=2)
  with pytest.raises(ValueError, match="must differ"):
    models.Seq2SeqConfig(vocab_size=10, bos_id=0)
  with pytest.raises(ValueError, match="dropout_rate"):
    models.Seq2SeqConfig(vocab_size=10, dropout_rate=1.0)


# ----------------------------------------------------------------------------- decoding


def sharp_tiny(seed):
  """V = 5 (pad, bos, eos, two words): larger weights make the choices far from ties."""
  model, params = tiny(vocab=5, max_length=6, seed=seed)
  return model, jax.tree.map(lambda x: 2.0 * x, params)


DECODE_SOURCE = jnp.array([[3, 4, 2, 0], [4, 4, 3, 2], [3, 2, 0, 0]])


def test_incremental_decoding_equals_the_full_decoder():
  model, params = sharp_tiny(0)
  length = 5
  cache, step = decoding._start(model, params, DECODE_SOURCE, length, 1)
  targets = jnp.array([[1, 3, 4, 4, 3], [1, 4, 3, 2, 0], [1, 2, 0, 0, 0]])
  want = logits(model, params, DECODE_SOURCE, targets)
  for t in range(length):
    got, cache = step(cache, targets[:, t])
    real = targets[:, t] != PAD  # the full decoder also masks padded keys; decoding ignores them
    np.testing.assert_allclose(got[real], want[real, t], rtol=1e-4, atol=1e-5)


def brute_force_best(model, params, source, max_length, alpha):
  """The best hypothesis over every sequence of words ending in eos, by the same score."""
  cfg = model.config
  words = [w for w in range(cfg.vocab_size) if w not in (PAD, BOS, EOS)]
  hypotheses = [
      list(body) + [EOS]
      for n in range(1, max_length + 1)
      for body in itertools.product(words, repeat=n - 1)
  ]
  inputs = np.zeros((len(hypotheses), max_length), np.int32)
  for row, y in enumerate(hypotheses):
    inputs[row, : len(y)] = [BOS] + y[:-1]
  sources = jnp.repeat(source[None], len(hypotheses), axis=0)
  out = logits(model, params, sources, inputs)
  last = jnp.arange(max_length) == max_length - 1
  logp = np.asarray(decoding.step_log_probs(cfg, out, last[None, :, None]))
  scores = [
      sum(logp[row, t, tok] for t, tok in enumerate(y))
      / decoding.gnmt_length_penalty(len(y), alpha)
      for row, y in enumerate(hypotheses)
  ]
  best = hypotheses[int(np.argmax(scores))]
  return best + [PAD] * (max_length - len(best))


@pytest.mark.parametrize("seed", [0, 1])
def test_exhaustive_beam_search_finds_the_brute_force_best(seed):
  model, params = sharp_tiny(seed)
  max_length, alpha = 4, 0.6
  # Words {3, 4}: at most 8 alive prefixes and 12 candidates a step, so K = 16 is exhaustive.
  search = jax.jit(
      lambda p, s: decoding.beam_search(
          model, p, s, beam_size=16, length_penalty=alpha, max_length=max_length
      )
  )
  got = np.asarray(search(params, DECODE_SOURCE))
  for row in range(DECODE_SOURCE.shape[0]):
    want = brute_force_best(model, params, DECODE_SOURCE[row], max_length, alpha)
    assert got[row].tolist() == want


@pytest.mark.parametrize("seed", [3])
def test_beam_of_one_is_greedy_and_outputs_are_padded_after_eos(seed):
  model, params = tiny(vocab=30, max_length=8, seed=seed)
  source = jax.random.randint(jax.random.key(seed), (4, 6), 3, 30).at[:, -1].set(EOS)
  greedy = jax.jit(lambda p, s: decoding.greedy_decode(model, p, s, max_length=7))(params, source)
  beam = jax.jit(lambda p, s: decoding.beam_search(model, p, s, beam_size=1, max_length=7))(
      params, source
  )
  np.testing.assert_array_equal(beam, greedy)
  wide = decoding.beam_search(model, params, source, beam_size=4, max_length=7)
  for ids in (np.asarray(greedy), np.asarray(wide)):
    assert ids.shape == (4, 7)
    for row in ids:
      end = row.tolist().index(EOS)  # every output holds an eos
      assert (row[end + 1 :] == PAD).all() and not np.isin(row[:end], [PAD, BOS, EOS]).any()


def test_decoding_bad_arguments_raise():
  model, params = tiny(vocab=5, max_length=6)
  with pytest.raises(ValueError, match="max_length"):
    decoding.greedy_decode(model, params, DECODE_SOURCE, max_length=7)
  with pytest.raises(ValueError, match="beam_size"):
    decoding.beam_search(model, params, DECODE_SOURCE, beam_size=0, max_length=3)
