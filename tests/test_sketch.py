"""The sketched Gram (nearprox.sketch, scale_by_proximal(sketch_dim=k)) against exact oracles."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nearprox
from nearprox import factored_grads, layer_factors, sketch
from nearprox.text import models
from tests.encoder_numbers import encoder_gathered_numbers

DAMPING = 0.1


# ----------------------------------------------------------------------------- helpers


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def assert_same_update(got, want):
  """Equal up to float32 rounding: entries near zero are compared at the update's scale (a
  different summation order, e.g. a Gram assembled across devices, moves them by ~1e-6 of it;
  a wrong filter, weight or normalization moves them by much more)."""
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * np.max(np.abs(want)))


def kron_variance(g: np.ndarray, h: np.ndarray, k1: int, k2: int) -> float:
  """Var ⟨S₁ᵀGS₂, S₁ᵀHS₂⟩ for Gaussian S (docs/method.md §2.9); Rademacher S give at most this.
  A side with k ≥ its dimension is not sketched (S = I) and drops its terms."""
  inv1 = 0.0 if k1 >= g.shape[0] else 1.0 / k1
  inv2 = 0.0 if k2 >= g.shape[1] else 1.0 / k2
  n, m = h @ g.T, g.T @ h
  nn_, mm = np.sum(n * n), np.sum(m * m)
  return (
      inv1 * (nn_ + np.trace(n @ n))
      + inv2 * (mm + np.trace(m @ m))
      + inv1 * inv2 * (nn_ + mm + np.sum(g * h) ** 2 + np.sum(g * g) * np.sum(h * h))
  )


def random_factor(batch=6, length=5, d_in=24, d_out=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  a = jax.random.normal(keys[0], (batch, length, d_in))
  d = jax.random.normal(keys[1], (batch, length, d_out)) * jnp.linspace(0.5, 2.0, d_out)
  return layer_factors.DenseFactor(a, d, (d_in, d_out), np.dtype("float32"))


def per_example_matrices(leaf):
  return np.einsum("btk,btl->bkl", np.asarray(leaf.inputs, np.float64), leaf.cotangents)


class WideModel(nn.Module):
  """Embedding, two 64-wide Dense layers (sketched at small k), a norm and a T = 1 head."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(40, 64)(ids)
    x = nn.relu(nn.Dense(64)(x))
    x = nn.Dense(64)(nn.LayerNorm()(x))
    return nn.Dense(3)(x.mean(axis=1))


def wide_problem(batch=16, length=8, seed=0):
  model = WideModel()
  ids = jax.random.randint(jax.random.key(seed), (batch, length), 0, 40)
  labels = jax.random.randint(jax.random.key(seed + 1), (batch,), 0, 3)
  params = model.init(jax.random.key(7), ids)["params"]

  def loss_fn(p, ids, labels):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, ids), labels)

  return loss_fn, params, (ids, labels)


@jax.jit
def factored(params, ids, labels):
  loss_fn = wide_problem()[0]
  return factored_grads.factored_value_and_grads(loss_fn, params, ids, labels)[1]


@functools.partial(jax.jit, static_argnames=("sketch_dim", "filter"))
def filtered(per_example, count, mask=None, weights=None, sketch_dim=None, filter="tikhonov"):
  tx = nearprox.scale_by_proximal(
      DAMPING, filter=filter, damping_mode="relative", sketch_dim=sketch_dim
  )
  state = tx.init(None)._replace(count=count)
  return tx.update(per_example, state, mask=mask, example_weights=weights)


# ----------------------------------------------------------------------------- the estimator


@pytest.mark.parametrize("sketch_dim", [4, 64, 256])  # 256: 16 × 16, the output side whole
def test_kronecker_sketch_is_unbiased_within_its_variance_bound(sketch_dim):
  leaf = random_factor()
  g = per_example_matrices(leaf)
  exact = np.einsum("ikl,jkl->ij", g, g)
  k1, k2 = sketch.side_dims(24, 16, sketch_dim)
  draws = 400
  keys = jax.random.split(jax.random.key(11), draws)
  phi = jax.jit(
      jax.vmap(lambda key: sketch.kronecker_features(leaf.inputs, leaf.cotangents, key, k1, k2))
  )(keys)
  estimates = np.einsum("rik,rjk->rij", np.asarray(phi, np.float64), np.asarray(phi, np.float64))
  variance = np.array([[kron_variance(gi, gj, k1, k2) for gj in g] for gi in g])
  # Unbiased: the mean of 400 draws is within 5 standard errors of K in every entry (about
  # normal by the central limit theorem: a 6e-7 chance per entry for a correct estimator),
  # up to float32 rounding.
  np.testing.assert_array_less(
      np.abs(estimates.mean(0) - exact), 5 * np.sqrt(variance / draws) + 1e-6 * np.abs(exact).max()
  )
  # Mean squared error ≤ the Gaussian variance (Rademacher entries give at most that); the
  # average of 400 draws exceeds 1.5× its expectation with probability < 1/1.5 by Markov, far
  # less in practice, and the bound Σ c·K_ii·K_jj of the docstring holds on top of it.
  mse = np.mean(np.sum((estimates - exact) ** 2, axis=(1, 2)))
  assert mse <= 1.5 * variance.sum()
  c = sketch.variance_factor(24, 16, k1, k2)
  assert variance.sum() <= c * np.trace(exact) ** 2 * (1 + 1e-9)


def test_sketched_gram_converges_to_the_exact_gram_as_k_grows():
  leaf = random_factor(seed=1)
  g = per_example_matrices(leaf)
  exact = np.einsum("ikl,jkl->ij", g, g)
  errors, predicted = [], []
  for sketch_dim in (4, 16, 64, 384):  # 384 = 24 · 16: both sides whole, S₁ = S₂ = I
    k1, k2 = sketch.side_dims(24, 16, sketch_dim)
    keys = jax.random.split(jax.random.key(sketch_dim), 100)
    phi = jax.vmap(
        lambda key: sketch.kronecker_features(leaf.inputs, leaf.cotangents, key, k1, k2)
    )(keys)
    estimates = np.einsum("rik,rjk->rij", np.asarray(phi, np.float64), np.asarray(phi, np.float64))
    errors.append(np.mean(np.sum((estimates - exact) ** 2, axis=(1, 2))))
    predicted.append(sum(kron_variance(gi, gj, k1, k2) for gi in g for gj in g))
  # The mean squared error follows the variance formula (Rademacher: at most the Gaussian
  # value, and close to it for these dense random gradients), which falls to 0 as k grows.
  for error, bound in zip(errors[:-1], predicted[:-1]):
    assert 0.3 * bound <= error <= 1.5 * bound, (errors, predicted)
  assert predicted == sorted(predicted, reverse=True) and predicted[-1] == 0.0
  assert errors == sorted(errors, reverse=True), errors
  assert np.sqrt(errors[-1]) <= 1e-5 * np.linalg.norm(exact)  # float32 rounding only


def test_side_dims_and_identity_sides():
  assert sketch.side_dims(384, 384, 4096) == (64, 64)
  assert sketch.side_dims(384, 1536, 1000) == (32, 32)
  assert sketch.side_dims(768, 2, 4096) == (768, 2)  # both capped: not worth sketching
  assert sketch.side_dims(6, 100, 64) == (6, 11)  # the capped side leaves k to the other
  # A side that is not sketched is exact: with S₂ = I the estimate only varies through S₁.
  leaf = random_factor(d_in=24, d_out=3)
  phi = sketch.kronecker_features(leaf.inputs, leaf.cotangents, jax.random.key(0), 8, 3)
  assert phi.shape == (6, 24)
  assert sketch.variance_factor(24, 3, 8, 3) == pytest.approx(2 / 8)


def test_array_leaf_sketch_matches_the_factor_sketch_of_the_same_gradients():
  leaf = random_factor(batch=5, d_in=12, d_out=10)
  dense = jnp.asarray(per_example_matrices(leaf), jnp.float32)  # [B, 12, 10], the vmap form
  key = jax.random.key(3)
  for k1, k2 in [(4, 5), (12, 3), (4, 10)]:
    np.testing.assert_allclose(
        sketch.array_features(dense, key, k1, k2),
        sketch.kronecker_features(leaf.inputs, leaf.cotangents, key, k1, k2),
        rtol=1e-4,
        atol=1e-4,
    )
  # A [B, 12, 2, 5] leaf is read as 12 × 10: the same features.
  np.testing.assert_allclose(
      sketch.array_features(dense.reshape(5, 12, 2, 5), key, 4, 5),
      sketch.array_features(dense, key, 4, 5),
      rtol=1e-6,
  )


def test_the_choice_is_by_cost():
  key = jax.random.key(0)
  # A 64 × 64 kernel over T = 8 positions: the sketch at k = 16 is far cheaper.
  wide = random_factor(batch=16, length=8, d_in=64, d_out=64)
  assert wide.sketch(key, 16, 16).shape == (16, 16)
  # The same kernel seen once per example (T = 1, a pooler): the ghost Gram B²·(d_in + d_out)
  # beats B·(d_in·k₁ + d_out·k₂ + k₁k₂) + B²·k₁k₂ at k = 1024.
  pooler = random_factor(batch=16, length=1, d_in=64, d_out=64)
  assert pooler.sketch(key, 1024, 16) is None
  # When k reaches the gradient's size there is nothing to save.
  assert random_factor(d_in=4, d_out=4).sketch(key, 16, 6) is None
  # The rule compares multiply-adds, like the ghost/materialize switch.
  b, t, k1, k2 = 16, 8, 4, 4
  sketch_cost = sketch.dense_sketch_cost(b, t, 64, 64, k1, k2) + b * t * 64 * 64
  ghost = b * b * t * t * 128 + b * t * 64 * 64
  assert sketch_cost < ghost
  # Embedding tables keep their exact Gram.
  table = layer_factors.EmbedFactor(
      jnp.zeros((16, 8), jnp.int32), jnp.ones((16, 8, 64)), 40, np.dtype("float32")
  )
  assert table.sketch(key, 16, 16) is None
  # Dense (vmap-form) leaves: exact while B ≤ the sketch's width, sketched for large batches.
  small = jnp.ones((8, 64, 64))
  assert sketch.array_features_or_none(small, key, 1024, 8) is None
  assert sketch.array_features_or_none(jnp.ones((64, 64, 64)), key, 16, 64).shape == (64, 16)
  # A sketched kernel combines through its factors even if it asked for the kept G.
  kept = dataclasses.replace(wide, combine_method="materialized")
  assert kept.for_sketched_combine().combine_method == "factored"


# ----------------------------------------------------------------------------- in the transform


def test_sketched_filter_with_masks_and_padded_tokens():
  loss_fn, params, (ids, labels) = wide_problem()
  grads = factored(params, ids, labels)
  flags = sketch.sketched_leaves(grads, 16)
  assert flags["['Dense_0']['kernel']"] and flags["['Dense_1']['kernel']"]
  assert not flags["['Embed_0']['embedding']"] and not flags["['LayerNorm_0']['scale']"]
  count = jnp.asarray(3, jnp.int32)
  # Padded tokens: positions with zero cotangent add nothing to a kernel's sketch.
  leaf = grads["Dense_0"]["kernel"]
  padded = dataclasses.replace(
      leaf,
      inputs=jnp.concatenate([leaf.inputs, jnp.ones_like(leaf.inputs[:, :3])], axis=1),
      cotangents=jnp.concatenate([leaf.cotangents, jnp.zeros_like(leaf.cotangents[:, :3])], axis=1),
  )
  key = jax.random.key(5)
  np.testing.assert_allclose(
      sketch.kronecker_features(padded.inputs, padded.cotangents, key, 4, 4),
      sketch.kronecker_features(leaf.inputs, leaf.cotangents, key, 4, 4),
      rtol=1e-5,
      atol=1e-7,
  )
  # Masked examples: NaN in their rows changes nothing, and they get no coefficient.
  mask = jnp.ones(16).at[jnp.array([2, 9])].set(0)
  poisoned = jax.tree.map(
      lambda x: x.at[2].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, grads
  )
  clean, _ = filtered(grads, count, mask, sketch_dim=16)
  dirty, _ = filtered(poisoned, count, mask, sketch_dim=16)
  np.testing.assert_allclose(flat(dirty), flat(clean), rtol=1e-6, atol=1e-9)
  assert np.isfinite(flat(dirty)).all()
  # Same as dropping the masked examples' gradients (zeroing them: their rows of Φ are 0).
  zeroed = jax.tree.map(
      lambda x: x * (mask > 0).reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
      if jnp.issubdtype(x.dtype, jnp.floating)
      else x,
      grads,
  )
  ref, _ = filtered(zeroed, count, mask, sketch_dim=16)
  np.testing.assert_allclose(flat(clean), flat(ref), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_sketched_filter_approaches_the_exact_filter(filter):
  loss_fn, params, (ids, labels) = wide_problem()
  grads = factored(params, ids, labels)
  weights = jnp.linspace(0.2, 2.0, 16)  # like iEF weights: positive, unequal
  count = jnp.asarray(0, jnp.int32)
  exact, exact_state = filtered(grads, count, weights=weights, filter=filter)
  cosines = []
  for sketch_dim in (4, 1024):
    d, state = filtered(grads, count, weights=weights, sketch_dim=sketch_dim, filter=filter)
    cosines.append(flat(d) @ flat(exact) / np.linalg.norm(flat(d)) / np.linalg.norm(flat(exact)))
  assert cosines[1] > 0.99 and cosines[1] >= cosines[0], cosines
  # The solve used K̂: its trace differs from K's, by less than the sketch's error.
  assert float(state.stats.gram_trace) != float(exact_state.stats.gram_trace)
  np.testing.assert_allclose(state.stats.gram_trace, exact_state.stats.gram_trace, rtol=0.1)


def test_dense_vmap_form_leaves_are_sketched_when_the_batch_is_large():
  rng = np.random.default_rng(0)
  base = rng.normal(size=(1, 32, 32))
  per_example = {  # correlated examples, so that K is far from diagonal
      "w": jnp.asarray(base + 0.5 * rng.normal(size=(48, 32, 32)), jnp.float32),
      "scale": jnp.asarray(rng.normal(size=(48, 3)), jnp.float32),
  }
  flags = sketch.sketched_leaves(per_example, 16)
  assert flags == {"['scale']": False, "['w']": True}  # [48, 3] is cheaper exactly
  assert sketch.sketched_leaves(per_example, 16, batch=4) == {"['scale']": False, "['w']": False}
  count = jnp.asarray(1, jnp.int32)
  exact, _ = filtered(per_example, count)
  d4, _ = filtered(per_example, count, sketch_dim=4)
  d256, _ = filtered(per_example, count, sketch_dim=256)
  cos = lambda d: flat(d) @ flat(exact) / np.linalg.norm(flat(d)) / np.linalg.norm(flat(exact))
  assert cos(d256) > 0.99 and cos(d256) > cos(d4)
  # The filtered gradient is still a combination of the exact per-example gradients.
  parts = sketch.sketch_per_example(per_example, count, 256)
  assert parts.for_combine is not None and parts.features.shape == (48, 256)
  np.testing.assert_array_equal(parts.for_combine["w"], per_example["w"])


def test_sketch_dim_zero_or_none_is_exact_and_bad_values_raise():
  loss_fn, params, (ids, labels) = wide_problem()
  grads = factored(params, ids, labels)
  count = jnp.asarray(0, jnp.int32)
  exact, _ = filtered(grads, count)
  zero, _ = filtered(grads, count, sketch_dim=0)
  np.testing.assert_array_equal(flat(zero), flat(exact))
  for bad in (-1, 2.5, True, "64"):
    with pytest.raises(ValueError, match="sketch_dim"):
      nearprox.scale_by_proximal(DAMPING, sketch_dim=bad)


def test_sketch_is_seeded_by_the_step_count_and_jit_does_not_retrace():
  loss_fn, params, (ids, labels) = wide_problem()
  traces = []
  tx = nearprox.proximal_sgd(0.1, DAMPING, damping_mode="relative", sketch_dim=16)

  @jax.jit
  def step(params, state, ids, labels):
    traces.append(None)
    _, grads = nearprox.per_example_value_and_grads(loss_fn, params, ids, labels, method="factored")
    updates, new_state = tx.update(grads, state, params)
    return updates, new_state

  state = tx.init(params)
  updates = []
  for _ in range(3):
    u, state = step(params, state, ids, labels)
    updates.append(flat(u))
  assert len(traces) == 1
  assert int(state[0].count) == 3
  # Same gradients, new step: new sketch matrices, a (slightly) different update.
  assert not np.array_equal(updates[0], updates[1])
  # Same step count: the same update (reproducible).
  again, _ = step(params, tx.init(params), ids, labels)
  np.testing.assert_array_equal(flat(again), updates[0])


def test_equal_sketches_on_every_device():
  devices = jax.local_device_count()
  assert devices == 8, "tests/conftest.py sets 8 host devices"
  leaf = random_factor(batch=4, length=3, d_in=32, d_out=32)

  def features(count):
    return sketch.sketch_per_example({"w": leaf}, count, 16).features

  counts = jnp.array([5] * devices, jnp.int32)
  per_device = jax.pmap(features)(counts)
  for i in range(1, devices):
    np.testing.assert_array_equal(per_device[i], per_device[0])
  assert not np.array_equal(
      np.asarray(features(jnp.asarray(6, jnp.int32))), np.asarray(per_device[0])
  )


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_global_sketched_gram_equals_single_device_on_the_concatenated_batch(filter):
  devices = jax.local_device_count()
  loss_fn, params, args = wide_problem(batch=16)
  mask = jnp.ones((16,)).at[jnp.array([3, 10])].set(0)
  weights = jnp.linspace(0.5, 1.5, 16)
  count = jnp.asarray(7, jnp.int32)
  tx = nearprox.scale_by_proximal(
      DAMPING,
      filter=filter,
      damping_mode="relative",
      axis_name="batch",
      gram="global",
      sketch_dim=16,
  )

  def device_update(params, ids, labels, mask, weights):
    _, grads = nearprox.per_example_value_and_grads(loss_fn, params, ids, labels, method="factored")
    state = tx.init(None)._replace(count=count)
    d, state = tx.update(grads, state, mask=mask, example_weights=weights)
    return d, state.stats.gram_trace

  shard = lambda x: x.reshape((devices, -1) + x.shape[1:])
  per_device, traces = jax.pmap(device_update, axis_name="batch", in_axes=(None, 0, 0, 0, 0))(
      params, *map(shard, args), shard(mask), shard(weights)
  )
  grads = factored(params, *args)
  single, state = filtered(grads, count, mask, weights, sketch_dim=16, filter=filter)
  assert sketch.sketched_leaves(grads, 16)["['Dense_1']['kernel']"]
  for i in (0, 5):
    assert_same_update(flat(jax.tree.map(lambda x: x[i], per_device)), flat(single))
  np.testing.assert_allclose(traces, float(state.stats.gram_trace), rtol=1e-5)


def test_local_sketched_gram_under_pmap_runs_and_matches_per_device_filters():
  devices = jax.local_device_count()
  loss_fn, params, args = wide_problem(batch=32)
  count = jnp.asarray(2, jnp.int32)
  tx = nearprox.scale_by_proximal(
      DAMPING, damping_mode="relative", axis_name="batch", sketch_dim=16
  )

  def device_update(params, ids, labels):
    _, grads = nearprox.per_example_value_and_grads(loss_fn, params, ids, labels, method="factored")
    return tx.update(grads, tx.init(None)._replace(count=count))[0]

  shard = lambda x: x.reshape((devices, -1) + x.shape[1:])
  combined = jax.pmap(device_update, axis_name="batch", in_axes=(None, 0, 0))(
      params, *map(shard, args)
  )
  blocks = [
      filtered(factored(params, *(x[4 * i : 4 * i + 4] for x in args)), count, sketch_dim=16)[0]
      for i in range(devices)
  ]
  want = sum(flat(b) for b in blocks) / devices
  assert_same_update(flat(jax.tree.map(lambda x: x[0], combined)), want)


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_sketched_update_is_invariant_to_the_scale_of_the_loss(filter):
  """A loss scaled by s scales the factors' cotangents, hence the sketched features and the
  exact leaves, by s; with relative damping d/s is unchanged, far beyond float32's range for
  K̂."""
  loss_fn, params, args = wide_problem()
  count = jnp.asarray(3, jnp.int32)
  grads = factored(params, *args)
  assert sketch.sketched_leaves(grads, 16)["['Dense_1']['kernel']"]
  want = flat(filtered(grads, count, sketch_dim=16, filter=filter)[0])
  for scale in (1e-30, 1e30):
    scaled_loss = lambda p, *a: scale * loss_fn(p, *a)
    scaled = jax.jit(lambda p, *a: factored_grads.factored_value_and_grads(scaled_loss, p, *a)[1])(
        params, *args
    )
    got = flat(filtered(scaled, count, sketch_dim=16, filter=filter)[0])
    assert_same_update(got / scale, want)


# ----------------------------------------------------------------------------- communication, exact path


def test_global_sketch_communication_formula_matches_shapes():
  config = models.tiny_config(num_labels=2, hidden_size=64, intermediate_size=128)
  model = models.BertForSequenceClassification(config)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 2, 8))
  ids = jax.ShapeDtypeStruct((4, 16), jnp.int32)

  def loss_fn(p, ids):
    return model.apply({"params": p}, ids).logits[:, 0]

  sketch_dim = 256  # 16 × 16 features per kernel; the T = 1 pooler and head stay exact
  measured = factored_grads.gathered_bytes_per_device(
      loss_fn, params, ids, sketch_dim=sketch_dim, num_devices=8
  )
  features = sketch.side_dims(64, 64, sketch_dim)
  assert sketch.side_dims(64, 128, sketch_dim) == features == (16, 16)
  numbers = encoder_gathered_numbers(
      config.num_hidden_layers, 64, 128, 16, 2, sketch_features=features[0] * features[1]
  )
  assert measured == 4 * 4 * numbers
  assert measured < factored_grads.gathered_bytes_per_device(loss_fn, params, ids)
  # docs/method.md §2.9's figure: BERT-base, B = 32, T = 128, k = 4096.
  bert_base = encoder_gathered_numbers(12, 768, 3072, 128, 2, sketch_features=4096)
  assert bert_base == 714_628 and 4 * 32 * bert_base == 91_472_384
  assert sketch.side_dims(768, 768, 4096) == sketch.side_dims(768, 3072, 4096) == (64, 64)


@pytest.mark.parametrize("d_in,d_out", [(12, 10), (10, 12)])  # a long input side swaps roles
def test_blocked_materializing_gram_equals_the_plain_one(d_in, d_out):
  leaf = random_factor(batch=5, length=7, d_in=d_in, d_out=d_out)
  other = random_factor(batch=3, length=7, d_in=d_in, d_out=d_out, seed=4)
  leaf = dataclasses.replace(leaf, gram_method="materialize")
  plain_self, plain_cross = leaf.gram(leaf), leaf.gram(other)
  tol = 1e-6 * float(jnp.abs(plain_self).max())  # float32 sums in another order
  # Blocks of 150 // (5 · 10) = 3 of the 12 columns of the long side: 4 blocks.
  blocking = layer_factors.GramBlocking(block_numbers=5 * 10 * 3, blocked_above=0)
  assert layer_factors._gram_blocks(5, d_in, d_out, blocking) == 4
  # Only on the listed backends; and never below blocked_above numbers or without blocks.
  assert layer_factors._gram_blocks(5, d_in, d_out, blocking._replace(backends=())) == 1
  assert layer_factors._gram_blocks(5, d_in, d_out, blocking._replace(blocked_above=600)) == 1
  assert layer_factors._gram_blocks(5, d_in, d_out, blocking._replace(block_numbers=0)) == 1
  blocked = dataclasses.replace(leaf, gram_blocking=blocking)
  np.testing.assert_allclose(blocked.gram(blocked), plain_self, rtol=1e-5, atol=tol)
  np.testing.assert_allclose(blocked.gram(other), plain_cross, rtol=1e-5, atol=tol)
  blocking = blocking._replace(block_numbers=5 * 10 * 5)  # 3 blocks, 3 padded columns
  assert layer_factors._gram_blocks(5, d_in, d_out, blocking) == 3
  blocked = dataclasses.replace(leaf, gram_blocking=blocking)
  np.testing.assert_allclose(blocked.gram(blocked), plain_self, rtol=1e-5, atol=tol)
  np.testing.assert_allclose(blocked.gram(other), plain_cross, rtol=1e-5, atol=tol)
  assert "scan" in str(jax.make_jaxpr(lambda f: f.gram(f))(blocked))
  assert "scan" not in str(jax.make_jaxpr(lambda f: f.gram(f))(leaf))  # default: 600 ≤ 2²³
  # The kept-G combine shares the unblocked G with the Gram, so it is not blocked.
  kept = dataclasses.replace(blocked, combine_method="materialized")
  assert "scan" not in str(jax.make_jaxpr(lambda f: f.gram(f))(kept))


def test_gram_blocking_reaches_every_dense_factor():
  loss_fn, params, args = wide_problem(batch=4)
  whole = layer_factors.GramBlocking(block_numbers=0)
  grads = nearprox.per_example_grads(loss_fn, params, *args, gram_blocking=whole)
  kernels = [
      leaf
      for leaf in jax.tree.leaves(grads, is_leaf=nearprox.base.is_factor)
      if isinstance(leaf, layer_factors.DenseFactor)
  ]
  assert len(kernels) == 3 and all(leaf.gram_blocking == whole for leaf in kernels)
  default = factored_grads.factored_value_and_grads(loss_fn, params, *args)[1]
  assert default["Dense_0"]["kernel"].gram_blocking == layer_factors.GramBlocking()


def test_training_config_reaches_the_transform():
  from experiments.configs import default
  from nearprox.training import optimizers

  config = default.get_config()
  assert config.optimizer.sketch_dim == 0
  config.optimizer.sketch_dim = -3
  with pytest.raises(ValueError, match="sketch_dim"):
    optimizers.create_optimizer(config, num_steps=10, axis_name=None)
  config.optimizer.sketch_dim = 16
  tx, per_example = optimizers.create_optimizer(config, num_steps=10, axis_name=None)
  assert per_example
  loss_fn, params, (ids, labels) = wide_problem()
  grads = factored(params, ids, labels)
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(grads, state, params)
  assert np.isfinite(flat(updates)).all()
