"""scale_by_proximal, proximal_sgd, scale_by_proximal_norm against a NumPy float64 reference."""

import functools

import flax
import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import nearprox
from tests.per_example_trees import SHAPES, flat, flat_rows, random_per_example


def reference(per_example, damping, filter="tikhonov", damping_mode="absolute", mask=None):
  """d = Gᵀ f(K) w in float64, solving only on the unmasked rows."""
  G = flat_rows(per_example)
  batch = G.shape[0]
  keep = np.ones(batch, bool) if mask is None else np.asarray(mask) > 0
  G = G[keep]
  K = G @ G.T
  n = G.shape[0]
  w = np.full(n, 1.0 / n)
  lam = damping * np.trace(K) / n if damping_mode == "relative" else damping
  v = np.linalg.solve(K + lam * np.eye(n), w)
  c = w - lam * v if filter == "tikhonov" else lam * v
  return G.T @ c


def filtered(per_example, damping, mask=None, **kw):
  tx = nearprox.scale_by_proximal(damping, **kw)
  d, state = tx.update(per_example, tx.init(None), mask=mask)
  return d, state


@pytest.mark.parametrize("batch", [1, 2, 7, 32])
@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
@pytest.mark.parametrize("damping_mode,damping", [("absolute", 3.0), ("relative", 0.1)])
def test_matches_float64_reference(batch, filter, damping_mode, damping):
  g = random_per_example(batch, seed=batch)
  d, _ = jax.jit(
      functools.partial(filtered, damping=damping, filter=filter, damping_mode=damping_mode)
  )(g)
  want = reference(g, damping, filter, damping_mode)
  np.testing.assert_allclose(flat(d), want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  # Output has the parameters' structure, shapes and dtypes.
  assert jax.tree.map(lambda x: (x.shape, x.dtype), d) == {
      k: (SHAPES[k], jnp.float32) for k in SHAPES
  }


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_bfloat16_leaves_solved_in_float32(filter):
  g = random_per_example(7, seed=3, dtypes={"dense/kernel": jnp.bfloat16, "embed": jnp.bfloat16})
  d, _ = filtered(g, 2.0, filter=filter)
  assert d["dense/kernel"].dtype == jnp.bfloat16 and d["dense/bias"].dtype == jnp.float32
  want = reference(g, 2.0, filter)  # the bf16 values themselves, in float64
  # Only the final cast to bf16 rounds: relative error ≤ 2^-8 per entry.
  np.testing.assert_allclose(flat(d), want, rtol=1e-2, atol=1e-2 * np.abs(want).max())


def test_float64_under_x64_stays_float64():
  with jax.enable_x64(True):
    g = jax.tree.map(lambda x: x.astype(jnp.float64), random_per_example(5, seed=1))
    d, _ = filtered(g, 0.7)
    assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(d))
    np.testing.assert_allclose(flat(d), reference(g, 0.7), rtol=1e-10)


def test_large_damping_limits():
  g = random_per_example(7, seed=4)
  mean = flat_rows(g).mean(0)
  natural, _ = filtered(g, 1e9, filter="natural")
  tikhonov, _ = filtered(g, 1e9, filter="tikhonov")
  np.testing.assert_allclose(flat(natural), mean, rtol=1e-4, atol=1e-6)
  assert np.abs(flat(tikhonov)).max() < 1e-6 * np.abs(mean).max()


def test_small_damping_gives_mean_gradient_even_for_singular_gram():
  # 10 examples in a 3-dimensional space: K has rank 3, and one example is repeated.
  rng = np.random.default_rng(5)
  rows = rng.normal(size=(10, 3))
  rows[9] = rows[0]
  g = {"w": jnp.asarray(rows, jnp.float32)}
  d, state = filtered(g, 1e-7, filter="tikhonov")
  np.testing.assert_allclose(np.asarray(d["w"]), rows.mean(0), rtol=1e-4, atol=1e-5)
  assert float(state.stats.effective_rank) <= 3.0 + 1e-4


def test_single_example_is_the_scalar_form():
  g = random_per_example(1, seed=6)
  d, _ = filtered(g, 2.5)
  g1 = flat_rows(g)[0]
  sq = g1 @ g1
  np.testing.assert_allclose(flat(d), g1 * sq / (sq + 2.5), rtol=1e-5)


@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
def test_filters_are_complementary(damping_mode):
  g = random_per_example(7, seed=7)
  tik, _ = filtered(g, 0.3, filter="tikhonov", damping_mode=damping_mode)
  nat, _ = filtered(g, 0.3, filter="natural", damping_mode=damping_mode)
  np.testing.assert_allclose(flat(tik) + flat(nat), flat_rows(g).mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_relative_damping_is_invariant_to_loss_scale(filter):
  g = random_per_example(7, seed=8)
  scaled = jax.tree.map(lambda x: 1000.0 * x, g)
  d, _ = filtered(g, 0.05, filter=filter, damping_mode="relative")
  d_scaled, _ = filtered(scaled, 0.05, filter=filter, damping_mode="relative")
  np.testing.assert_allclose(flat(d_scaled), 1000.0 * flat(d), rtol=1e-4)
  # ... while absolute damping is not.
  a, _ = filtered(g, 1.0, filter=filter)
  a_scaled, _ = filtered(scaled, 1.0, filter=filter)
  assert not np.allclose(flat(a_scaled), 1000.0 * flat(a), rtol=1e-2)


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
def test_masked_examples_change_nothing(filter, damping_mode):
  g = random_per_example(8, seed=9)
  mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1])
  # Garbage (NaN, Inf, huge) in the masked rows must not leak into d.
  poisoned = jax.tree.map(lambda x: x.at[2].set(jnp.nan).at[6].set(1e30), g)
  d, state = filtered(poisoned, 0.5, mask=mask, filter=filter, damping_mode=damping_mode)
  kept = jax.tree.map(lambda x: x[np.asarray(mask) > 0], g)
  d_kept, state_kept = filtered(kept, 0.5, filter=filter, damping_mode=damping_mode)
  # Two float32 eigendecompositions of different sizes (8×8 with decoupled padding, 6×6):
  # they agree to rounding; a leak of the NaN or 1e30 rows would not be small.
  scale = np.abs(flat(d_kept)).max()
  np.testing.assert_allclose(flat(d), flat(d_kept), rtol=1e-4, atol=1e-6 * scale)
  np.testing.assert_allclose(flat(d), reference(g, 0.5, filter, damping_mode, mask), rtol=1e-4)
  for got, want in zip(state.stats, state_kept.stats):
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("sketch_dim", [None, 8])
def test_unzeroed_masked_rows_give_the_same_update_when_finite(sketch_dim):
  """zero_masked_rows=False (the training step's setting) on a batch padded as
  nearprox.text.data pads one, with copies of real rows, factored per-example gradients and
  the sketched Gram too: the update and statistics of the default, which zeroes them first.
  Non-finite masked rows leak then, which is why zeroing is the default."""
  rng = np.random.default_rng(23)
  model = flax.linen.Dense(5)
  x = jnp.asarray(rng.normal(size=(8, 12)), jnp.float32)
  x = x.at[6:].set(x[:2])  # rows 6 and 7 pad the batch: copies of rows 0 and 1
  y = jnp.arange(8) % 5
  mask = jnp.ones(8).at[6:].set(0.0)
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y)

  grads = nearprox.per_example_grads(loss_fn, params, x, y)
  assert isinstance(grads["kernel"], nearprox.layer_factors.DenseFactor)

  def update(grads, zero_masked_rows):
    tx = nearprox.scale_by_proximal(
        0.1,
        filter="natural",
        damping_mode="relative",
        sketch_dim=sketch_dim,
        zero_masked_rows=zero_masked_rows,
    )
    return jax.jit(lambda g, m: tx.update(g, tx.init(params), mask=m))(grads, mask)

  d, state = update(grads, zero_masked_rows=True)
  d_unzeroed, state_unzeroed = update(grads, zero_masked_rows=False)
  np.testing.assert_allclose(flat(d_unzeroed), flat(d), rtol=1e-5, atol=1e-7)
  for got, want in zip(state_unzeroed.stats, state.stats):
    np.testing.assert_allclose(got, want, rtol=1e-5)
  poisoned = nearprox.per_example_grads(loss_fn, params, x.at[7].set(jnp.nan), y)
  assert np.all(np.isfinite(flat(update(poisoned, zero_masked_rows=True)[0])))
  assert not np.all(np.isfinite(flat(update(poisoned, zero_masked_rows=False)[0])))


def test_all_examples_masked_gives_zero():
  g = random_per_example(4, seed=10)
  d, _ = filtered(g, 0.5, mask=jnp.zeros(4), damping_mode="relative")
  assert np.all(flat(d) == 0)


def test_filter_stats_match_numpy():
  g = random_per_example(7, seed=11)
  d, state = filtered(g, 0.4)
  G = flat_rows(g)
  K = G @ G.T
  sigma = np.linalg.eigvalsh(K)
  stats = state.stats
  np.testing.assert_allclose(stats.damping, 0.4)
  np.testing.assert_allclose(stats.gram_trace, np.trace(K), rtol=1e-5)
  np.testing.assert_allclose(stats.effective_rank, sigma.sum() ** 2 / (sigma**2).sum(), rtol=1e-5)
  mean = G.mean(0)
  np.testing.assert_allclose(stats.kept_fraction, flat(d) @ flat(d) / (mean @ mean), rtol=1e-4)
  assert int(state.count) == 1


def test_damping_schedule_uses_step_count():
  g = random_per_example(5, seed=12)
  tx = nearprox.scale_by_proximal(lambda count: 1.0 + count.astype(jnp.float32))
  state = tx.init(None)
  for step in range(3):
    d, state = tx.update(g, state)
    want = reference(g, 1.0 + step)
    np.testing.assert_allclose(flat(d), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_jit_does_not_retrace():
  traces = []
  tx = nearprox.scale_by_proximal(0.5, damping_mode="relative")

  @jax.jit
  def step(g, state, mask):
    traces.append(1)
    return tx.update(g, state, mask=mask)

  state = tx.init(None)
  for seed in range(4):
    _, state = step(random_per_example(6, seed=seed), state, jnp.ones(6))
  assert len(traces) == 1


def test_proximal_sgd_moves_params_by_minus_lr_times_d():
  g = random_per_example(7, seed=13)
  params = jax.tree.map(lambda x: jnp.ones(x.shape[1:], x.dtype), g)
  schedule = optax.linear_schedule(0.5, 0.1, transition_steps=4)
  opt = nearprox.proximal_sgd(schedule, 0.3, filter="natural", damping_mode="relative")
  state = opt.init(params)
  for step in range(2):
    updates, state = opt.update(g, state, params)
    d = reference(g, 0.3, "natural", "relative")
    np.testing.assert_allclose(flat(updates), -float(schedule(step)) * d, rtol=1e-4, atol=1e-7)
    params = optax.apply_updates(params, updates)


def test_proximal_sgd_momentum_matches_optax_sgd_on_d():
  g = random_per_example(5, seed=14)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
  opt = nearprox.proximal_sgd(0.1, 0.2, momentum=0.9, nesterov=True)
  ref = optax.sgd(0.1, momentum=0.9, nesterov=True)
  state, ref_state = opt.init(params), ref.init(params)
  d, _ = filtered(g, 0.2)
  for _ in range(3):
    updates, state = opt.update(g, state, params, mask=jnp.ones(5))
    want, ref_state = ref.update(d, ref_state, params)
    np.testing.assert_allclose(flat(updates), flat(want), rtol=1e-5, atol=1e-8)


def test_nonfinite_gradient_is_skipped_by_apply_if_finite():
  g = random_per_example(4, seed=15)
  bad = jax.tree.map(lambda x: x.at[1].set(jnp.inf), g)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), g)
  # Without protection a non-finite example poisons every leaf of the update.
  d, _ = filtered(bad, 0.5)
  assert all(not np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(d))
  # apply_if_finite goes after the aggregation: its skipped update has the params' shape.
  opt = optax.chain(
      nearprox.scale_by_proximal(0.5),
      optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=3),
  )
  state = opt.init(params)
  updates, state = opt.update(bad, state, params)
  assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(updates))
  assert int(state[1].notfinite_count) == 1
  updates, state = opt.update(g, state, params)
  assert np.isfinite(flat(updates)).all() and np.abs(flat(updates)).max() > 0


# ---------------------------------------------------------------- scale of the gradients

SCALES = [1e-30, 1e-20, 1e-10, 1e10, 1e20, 1e30]  # K = G Gᵀ spans 1e-60 … 1e60


def eigen_reference(per_example, damping, filter, damping_mode, step_size="none"):
  """α·Gᵀf(K)w in float64 through K's eigendecomposition (no cancellation at any scale)."""
  G = flat_rows(per_example)
  n = G.shape[0]
  K = G @ G.T
  w = np.full(n, 1.0 / n)
  lam = damping * np.trace(K) / n if damping_mode == "relative" else damping
  sigma, U = np.linalg.eigh(K)
  sigma = np.maximum(sigma, 0.0)
  response = sigma / (sigma + lam) if filter == "tikhonov" else lam / (sigma + lam)
  d = G.T @ (U @ (response * (U.T @ w)))
  g = G.T @ w
  if step_size == "graft":
    return d * np.linalg.norm(g) / np.linalg.norm(d)
  if step_size == "quadratic":
    return d * max(g @ d, 0.0) / ((G @ d) @ (G @ d) / n + lam / n * (d @ d))
  return d


@pytest.mark.parametrize("step_size", ["none", "graft", "quadratic"])
@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_relative_damping_update_is_invariant_to_the_scale_of_the_gradients(filter, step_size):
  """d(s·G) = s^p·d(G), p = −1 for the quadratic step (α ∝ 1/K) and 1 otherwise, far beyond
  the float32 range of K: it is formed from G divided by a power of two."""
  g = random_per_example(8, seed=21)
  tx = nearprox.scale_by_proximal(0.1, filter=filter, damping_mode="relative", step_size=step_size)
  update = jax.jit(lambda g: tx.update(g, tx.init(None)))
  want, state = update(g)
  power = -1 if step_size == "quadratic" else 1
  for scale in SCALES:
    d, scaled_state = update(jax.tree.map(lambda x: x * scale, g))
    np.testing.assert_allclose(
        flat(d) / scale**power, flat(want), rtol=1e-5, atol=1e-5 * np.abs(flat(want)).max()
    )
    np.testing.assert_allclose(scaled_state.stats.kept_fraction, state.stats.kept_fraction, 1e-5)
  # A power of two changes only exponents: the same bits.
  d, _ = update(jax.tree.map(lambda x: x * 2.0**90, g))
  np.testing.assert_array_equal(flat(d), flat(want) * 2.0 ** (90 * power))


@pytest.mark.parametrize("step_size", ["none", "graft", "quadratic"])
@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_absolute_damping_follows_the_float64_reference_at_every_scale(filter, step_size):
  """An absolute λ is in the units of K, so scaling G by s is scaling λ by 1/s² (not
  invariant): at large s the filter approaches its λ → 0 limit, at small s its λ → ∞ limit.
  The update stays what float32 can hold of the exact one: never NaN, and 0 only where the
  exact update is below float32's range (tikhonov, d ∝ s³/λ at s ≤ 1e-20)."""
  g = random_per_example(8, seed=22)
  tx = nearprox.scale_by_proximal(1.0, filter=filter, step_size=step_size)
  update = jax.jit(lambda g: tx.update(g, tx.init(None))[0])
  for scale in SCALES:
    scaled = jax.tree.map(lambda x: x * scale, g)
    d = flat(update(scaled))
    want = eigen_reference(scaled, 1.0, filter, "absolute", step_size)
    assert np.isfinite(d).all(), scale
    tiny = float(jnp.finfo(jnp.float32).tiny)
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4 * np.abs(want).max() + tiny)
    assert np.abs(d).max() > 0 or np.abs(want).max() < tiny, scale


def test_scale_by_proximal_norm_does_not_overflow():
  g = {"a": jnp.asarray(np.random.default_rng(23).normal(size=(3, 4)), jnp.float32)}
  tx = nearprox.scale_by_proximal_norm(1.0)
  for scale in SCALES:
    gs = jax.tree.map(lambda x: x * scale, g)
    updates, _ = tx.update(gs, tx.init(gs))
    x = flat(gs)
    want = x * (x @ x) / (x @ x + 1.0)
    tiny = float(jnp.finfo(jnp.float32).tiny)
    np.testing.assert_allclose(flat(updates), want, rtol=1e-5, atol=tiny)


# ---------------------------------------------------------------- several devices


def _device_split(tree, n):
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


@pytest.mark.parametrize("gram", ["local", "global"])
@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_pmap_and_shard_map(gram, filter):
  n = jax.device_count()
  assert n == 8, "tests/conftest.py sets 8 host devices"
  per_device = 3
  g = random_per_example(n * per_device, seed=16)
  mask = np.ones(n * per_device)
  mask[[4, 5, 22]] = 0  # device 1 has one real example, device 7 two.
  tx = nearprox.scale_by_proximal(
      0.2, filter=filter, damping_mode="relative", axis_name="batch", gram=gram
  )

  def step(g, mask):
    d, state = tx.update(g, tx.init(None), mask=mask)
    return d, state.stats.effective_rank

  if gram == "global":
    want = reference(g, 0.2, filter, "relative", mask)
  else:
    blocks = [slice(i * per_device, (i + 1) * per_device) for i in range(n)]
    counts = np.array([mask[b].sum() for b in blocks])
    want = (
        sum(
            c * reference(jax.tree.map(lambda x: x[b], g), 0.2, filter, "relative", mask[b])
            for c, b in zip(counts, blocks)
        )
        / counts.sum()
    )

  d_pmap, rank = jax.pmap(step, axis_name="batch")(_device_split(g, n), mask.reshape(n, -1))
  for i in range(n):  # every device holds the same result
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda x: x[i], d_pmap)), want, rtol=1e-4, atol=1e-6
    )

  mesh = jax.make_mesh((n,), ("batch",))
  spec = jax.sharding.PartitionSpec("batch")
  sharded = jax.jit(
      jax.shard_map(
          lambda g, m: step(g, m)[0],
          mesh=mesh,
          in_specs=(spec, spec),
          out_specs=jax.sharding.PartitionSpec(),
      )
  )
  on_mesh = jax.sharding.NamedSharding(mesh, spec)
  d_shard = sharded(jax.device_put(g, on_mesh), jax.device_put(jnp.asarray(mask), on_mesh))
  np.testing.assert_allclose(flat(d_shard), want, rtol=1e-4, atol=1e-6)


def test_global_gram_rescales_every_device_by_the_same_power_of_two():
  n = jax.device_count()
  g = random_per_example(2 * n, seed=24)
  g = jax.tree.map(lambda x: x.at[6:8].multiply(2.0**60), g)  # device 3's examples
  tx = nearprox.scale_by_proximal(0.2, damping_mode="relative", axis_name="batch", gram="global")
  d = jax.pmap(lambda g: tx.update(g, tx.init(None))[0], axis_name="batch")(_device_split(g, n))
  want = flat(filtered(g, 0.2, damping_mode="relative")[0])
  for i in range(n):
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda x: x[i], d)), want, rtol=1e-4, atol=1e-6 * np.abs(want).max()
    )


def test_the_rescaled_gram_compiles_to_a_program_linear_in_the_number_of_leaves():
  """The largest exponent is computed once (spectral_filter.largest_exponent), not copied with
  every leaf's exponent into each leaf's Gram term: with jnp.max the optimized program grew
  quadratically (3.1× the HLO lines for 2× the leaves here), the compile of the factored step
  of a 3 + 3 layer encoder-decoder took 1,052 s instead of 52 s."""
  from nearprox import spectral_filter

  def hlo_lines(num_leaves):
    def gram(leaves):
      rescaled = spectral_filter.rescale_leaves(leaves)
      return spectral_filter.rescaled_gram(rescaled.leaves, rescaled.exponents)

    leaves = [jnp.ones((4, 3))] * num_leaves
    return len(jax.jit(gram).lower(leaves).compile().as_text().splitlines())

  assert hlo_lines(20) < 2.5 * hlo_lines(10)


def test_times_power_of_two_splits_every_exponent_as_floor_division_would():
  """times_power_of_two's division-free ⌊e/3⌋ (fewer kernels to compile) over the whole
  clipped range of float32 and float64 exponents, and exact products at the extremes."""
  from nearprox import base

  for dtype in (np.float32, np.float64):
    info = np.finfo(dtype)
    lo, hi = 3 * int(info.minexp), 3 * (int(info.maxexp) - 1)
    n = np.arange(lo, hi + 1, dtype=np.int32)
    np.testing.assert_array_equal(base._floor_third(jnp.asarray(n), lo, hi), n // 3)
  x = jnp.asarray([1.5, -3.0, 2.0**-100, 2.0**100], jnp.float32)
  for e in (-378, -250, -127, -1, 0, 1, 127, 250, 381):
    want = np.asarray(x, np.float64) * 2.0**e
    normal = (np.abs(want) >= np.finfo(np.float32).tiny) & (
        np.abs(want) <= np.finfo(np.float32).max
    )
    np.testing.assert_array_equal(np.asarray(base.times_power_of_two(x, e))[normal], want[normal])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(damping=float("nan")), "damping"),
        (dict(damping=float("inf")), "damping"),
        (dict(damping="big"), "damping"),
        (dict(damping=1.0, filter="lowpass"), "filter"),
        (dict(damping=1.0, damping_mode="adaptive"), "damping_mode"),
        (dict(damping=1.0, gram="sketchy", axis_name="b"), "gram"),
        (dict(damping=1.0, gram="global"), "axis_name"),
    ],
)
def test_bad_construction_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nearprox.scale_by_proximal(**kwargs)


def test_options_are_keyword_only():
  with pytest.raises(TypeError):
    nearprox.scale_by_proximal(1.0, "natural")
  with pytest.raises(TypeError):
    nearprox.proximal_sgd(0.1, 1.0, "natural")
  nearprox.proximal_sgd(0.1, 1.0, filter="natural", momentum=0.9)


def test_bad_construction_arguments_of_the_other_transforms():
  with pytest.raises(ValueError, match="damping"):
    nearprox.scale_by_proximal_norm(0.0)
  with pytest.raises(ValueError, match="constant damping"):
    nearprox.scale_by_proximal_norm(lambda count: 1.0)
  with pytest.raises(ValueError, match="filter"):
    nearprox.proximal_sgd(0.1, 1.0, filter="nope")


def test_bad_update_inputs_name_the_leaf_or_argument():
  tx = nearprox.scale_by_proximal(1.0)
  state = tx.init(None)
  with pytest.raises(ValueError, match=r"different leading.*\['b'\]: 4"):
    tx.update({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}, state)
  with pytest.raises(ValueError, match=r"\['s'\] is a scalar"):
    tx.update({"a": jnp.ones((3, 2)), "s": jnp.ones(())}, state)
  with pytest.raises(ValueError, match=r"mask must have shape \(3,\)"):
    tx.update({"a": jnp.ones((3, 2))}, state, mask=jnp.ones(4))
  with pytest.raises(ValueError, match="empty"):
    tx.update({}, state)


# ---------------------------------------------------------------- rank-one form


def test_scale_by_proximal_norm_in_a_chain():
  rng = np.random.default_rng(17)
  g = {
      "a": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
      "b": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
  }
  tx = optax.chain(
      optax.clip_by_global_norm(100.0), nearprox.scale_by_proximal_norm(2.0), optax.scale(-0.5)
  )
  updates, _ = tx.update(g, tx.init(g))
  gf = flat(g)
  want = -0.5 * gf * (gf @ gf) / (gf @ gf + 2.0)
  np.testing.assert_allclose(flat(updates), want, rtol=1e-2)
  assert updates["b"].dtype == jnp.bfloat16
  # It is the tikhonov filter of a batch of one.
  d, _ = filtered(jax.tree.map(lambda x: x[None].astype(jnp.float32), g), 2.0)
  np.testing.assert_allclose(flat(d), -2 * flat(updates), rtol=1e-2)


# ---------------------------------------------------------------- per-example gradients


def test_vmap_per_example_grads_are_each_examples_gradient():
  rng = np.random.default_rng(18)
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), "b": jnp.zeros(2)}
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(5, 2)), jnp.float32)

  def loss_fn(params, x, y):
    return jnp.sum((x @ params["w"] + params["b"] - y) ** 2, axis=-1)

  losses, grads = nearprox.per_example_value_and_grads(loss_fn, params, x, y, method="vmap")
  np.testing.assert_allclose(losses, loss_fn(params, x, y), rtol=1e-6)
  for i in range(5):
    one = jax.grad(lambda p: loss_fn(p, x[i : i + 1], y[i : i + 1])[0])(params)
    np.testing.assert_allclose(flat(jax.tree.map(lambda t: t[i], grads)), flat(one), rtol=1e-6)
  # Their mean is the gradient of the mean loss.
  mean_grad = jax.grad(lambda p: loss_fn(p, x, y).mean())(params)
  np.testing.assert_allclose(
      flat(jax.tree.map(lambda t: t.mean(0), grads)), flat(mean_grad), rtol=1e-5, atol=1e-6
  )


def test_default_per_example_grads_are_factored_and_filter_like_the_oracle():
  """DESIGN §3: per_example_grads returns the factored form by default (the Dense kernel as
  its layer's factors), and scale_by_proximal gives the vmap oracle's numbers from it."""
  rng = np.random.default_rng(19)
  model = flax.linen.Dense(3)
  x = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
  y = jnp.arange(8) % 3
  params = model.init(jax.random.key(0), x)["params"]

  def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y)

  default = nearprox.per_example_grads(loss_fn, params, x, y)
  oracle = nearprox.per_example_grads(loss_fn, params, x, y, method="vmap")
  assert isinstance(default["kernel"], nearprox.layer_factors.DenseFactor)
  tx = nearprox.scale_by_proximal(0.1, damping_mode="relative")
  filtered = [flat(tx.update(g, tx.init(params))[0]) for g in (default, oracle)]
  np.testing.assert_allclose(filtered[0], filtered[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", nearprox.per_example.METHODS)
def test_per_example_grads_bad_input(method):
  params = {"w": jnp.ones(3)}
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="per-example losses"):
    nearprox.per_example_grads(lambda p, x: jnp.sum(x @ p["w"]), params, x, method=method)
  with pytest.raises(ValueError, match="method"):
    nearprox.per_example_grads(lambda p, x: x @ p["w"], params, x, method="magic")
  with pytest.raises(ValueError, match="different batch sizes"):
    nearprox.per_example_grads(
        lambda p, x, y: x @ p["w"] + y, params, x, jnp.ones(5), method=method
    )
  with pytest.raises(ValueError, match="no batch axis"):
    nearprox.per_example_grads(
        lambda p, x, s: x @ p["w"] * s, params, x, jnp.float32(2.0), method=method
    )


# ---------------------------------------------------------------- properties


@hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
@hypothesis.given(
    rows=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 9), st.integers(1, 6)),
        elements=st.floats(-10, 10, width=32, allow_subnormal=False),
    ),
    log_damping=st.floats(-3, 3),
    filter=st.sampled_from(["tikhonov", "natural"]),
)
def test_property_matches_reference_and_shrinks_the_gradient(rows, log_damping, filter):
  damping = 10.0**log_damping
  g = {"w": jnp.asarray(rows)}
  d, state = filtered(g, damping, filter=filter, damping_mode="relative")
  # Float32 squares of entries below ~1e-19 underflow in K: gradients that small are 0 here.
  hypothesis.assume(np.abs(rows).max() > 1e-3)
  want = reference(g, damping, filter, "relative")
  scale = np.abs(rows).max()
  np.testing.assert_allclose(np.asarray(d["w"], np.float64), want, atol=1e-4 * scale)
  # Both filters are contractions of the mean gradient: 0 ≤ ‖d‖² ≤ ‖g‖².
  assert -1e-5 <= float(state.stats.kept_fraction) <= 1.0 + 1e-4
