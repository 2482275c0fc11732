"""Example weights (iEF), step-size rules and the filter in front of Adam, against NumPy."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nearprox
from experiments.configs import default
from nearprox.text import losses, models, objectives
from nearprox.training import optimizers, task_io, train
from tests.per_example_trees import flat, flat_rows, random_per_example
from tests.tiny_sst2 import tiny_config, write_sst2


def reference(
    G,
    damping,
    filter="tikhonov",
    damping_mode="absolute",
    mask=None,
    weights=None,
    step_size="none",
    rho=None,
    max_norm=None,
):
  """(α·d, α, d) in float64 from explicit G [B, P]; the step size from the explicit Fisher."""
  keep = np.ones(G.shape[0], bool) if mask is None else np.asarray(mask) > 0
  s = np.ones(G.shape[0]) if weights is None else np.asarray(weights, np.float64)
  G, s = G[keep], s[keep]
  n = G.shape[0]
  K = G @ G.T
  lam = damping * np.trace(K) / n if damping_mode == "relative" else damping
  w = s / s.sum() if s.sum() > 0 else np.zeros(n)
  v = np.linalg.solve(K + lam * np.eye(n), w)
  c = w - lam * v if filter == "tikhonov" else lam * v
  d = G.T @ c
  g = G.mean(0)
  fisher = G.T @ G / n
  alpha = 1.0
  if step_size == "graft":
    alpha = np.linalg.norm(g) / np.linalg.norm(d) if d @ d > 0 else 0.0
  elif step_size == "quadratic":
    rho = lam / n if rho is None else rho
    curvature = d @ fisher @ d + rho * (d @ d)
    alpha = max(g @ d, 0.0) / curvature if curvature > 0 else 0.0
  if max_norm is not None and alpha * np.linalg.norm(d) > max_norm:
    alpha = max_norm / np.linalg.norm(d)
  return alpha * d, alpha, d


def filtered(per_example, damping, mask=None, example_weights=None, **kw):
  tx = nearprox.scale_by_proximal(damping, **kw)
  return tx.update(per_example, tx.init(None), mask=mask, example_weights=example_weights)


MASK = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
WEIGHTS = np.array([0.3, 2.0, 5.0, 0.0, 1.1, 0.05, 7.0, 0.6], np.float32)


# ---------------------------------------------------------------- weighted right-hand side


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
@pytest.mark.parametrize("damping_mode,damping", [("absolute", 2.0), ("relative", 0.1)])
def test_weighted_coefficients_match_reference(filter, damping_mode, damping):
  g = random_per_example(8, seed=1)
  # Garbage in masked rows (gradients and weights) must not leak.
  poisoned = jax.tree.map(lambda x: x.at[2].set(jnp.nan), g)
  weights = jnp.asarray(WEIGHTS).at[6].set(jnp.nan)
  step = jax.jit(
      functools.partial(filtered, damping=damping, filter=filter, damping_mode=damping_mode)
  )
  d, state = step(poisoned, mask=jnp.asarray(MASK), example_weights=weights)
  want, _, _ = reference(flat_rows(g), damping, filter, damping_mode, MASK, WEIGHTS)
  np.testing.assert_allclose(flat(d), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  # kept_fraction keeps its meaning: ‖d‖² / ‖g‖² with g the plain masked mean gradient.
  mean = flat_rows(g)[MASK > 0].mean(0)
  np.testing.assert_allclose(state.stats.kept_fraction, want @ want / (mean @ mean), rtol=1e-4)
  assert float(state.stats.step_scale) == 1.0


def test_filter_coefficients_with_weights():
  G = flat_rows(random_per_example(8, seed=2))
  K = jnp.asarray(G @ G.T, jnp.float32)
  coeffs, _ = nearprox.filter_coefficients(K, jnp.asarray(MASK), 0.5, "natural", weights=WEIGHTS)
  keep = MASK > 0
  w = WEIGHTS[keep] / WEIGHTS[keep].sum()
  Kk = (G @ G.T)[np.ix_(keep, keep)]
  want = np.zeros(8)
  want[keep] = 0.5 * np.linalg.solve(Kk + 0.5 * np.eye(keep.sum()), w)
  np.testing.assert_allclose(coeffs, want, rtol=1e-4, atol=1e-7)
  with pytest.raises(ValueError, match=r"example weights must have shape \(8,\)"):
    nearprox.filter_coefficients(K, jnp.asarray(MASK), 0.5, weights=jnp.ones(7))
  negative, _ = nearprox.filter_coefficients(K, jnp.asarray(MASK), 0.5, weights=-WEIGHTS)
  assert np.isnan(negative).all()


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
def test_uniform_weights_reproduce_the_unweighted_result_exactly(filter):
  g = random_per_example(8, seed=3)
  mask = jnp.asarray(MASK)
  plain, plain_state = filtered(g, 0.1, mask, filter=filter, damping_mode="relative")
  ones, ones_state = filtered(g, 0.1, mask, jnp.ones(8), filter=filter, damping_mode="relative")
  np.testing.assert_array_equal(flat(ones), flat(plain))
  for got, want in zip(ones_state.stats, plain_state.stats):
    np.testing.assert_array_equal(got, want)
  # Only the weights' ratios matter.
  scaled, _ = filtered(g, 0.1, mask, jnp.full(8, 37.0), filter=filter, damping_mode="relative")
  np.testing.assert_allclose(flat(scaled), flat(plain), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("step_size", ["none", "graft", "quadratic"])
@pytest.mark.parametrize("weights", [np.zeros(8), np.array([0, 0, 3.0, 0, 0, 0, 1.0, 0])])
def test_all_zero_weights_give_a_zero_update(step_size, weights):
  # The second case has weight only on masked examples: the mass is still 0.
  g = random_per_example(8, seed=4)
  d, state = filtered(g, 0.1, jnp.asarray(MASK), jnp.asarray(weights), step_size=step_size)
  assert np.all(flat(d) == 0)
  assert all(np.isfinite(np.asarray(s)) for s in state.stats)


@pytest.mark.parametrize("step_size", ["none", "graft", "quadratic"])
@pytest.mark.parametrize("bad", [-1.0, -1e-30, np.nan, np.inf, -np.inf])
def test_negative_or_nonfinite_weights_give_a_nonfinite_update(step_size, bad):
  """A lost step must not pass for a zero update: an unmasked weight that is negative or not
  finite makes every entry NaN, as a non-finite gradient does (optax.apply_if_finite after
  the filter skips it); on a masked example it is ignored."""
  g = random_per_example(8, seed=13)
  mask = jnp.asarray(MASK)
  d, state = filtered(g, 0.1, mask, jnp.asarray(WEIGHTS).at[1].set(bad), step_size=step_size)
  assert np.isnan(flat(d)).all()
  assert np.isnan(state.stats.kept_fraction)
  d, _ = filtered(g, 0.1, mask, jnp.asarray(WEIGHTS).at[2].set(bad), step_size=step_size)
  assert np.isfinite(flat(d)).all() and np.abs(flat(d)).max() > 0
  # Weights whose sum is 0 only through a negative one are not "all zero".
  d, _ = filtered(g, 0.1, example_weights=jnp.zeros(8).at[0].set(1.0).at[5].set(-1.0))
  assert np.isnan(flat(d)).all()


@pytest.mark.parametrize("gram", ["local", "global"])
def test_a_bad_weight_on_one_device_makes_every_device_update_nonfinite(gram):
  n = jax.device_count()
  g = random_per_example(2 * n, seed=14)
  weights = jnp.ones(2 * n).at[5].set(-1.0)  # device 2
  tx = nearprox.scale_by_proximal(0.1, axis_name="batch", gram=gram)
  split = lambda x: x.reshape((n, 2) + x.shape[1:])
  d = jax.pmap(lambda g, s: tx.update(g, tx.init(None), example_weights=s)[0], axis_name="batch")(
      jax.tree.map(split, g), split(weights)
  )
  assert np.isnan(flat(d)).all()


def test_bad_example_weights_name_the_argument():
  g = random_per_example(4)
  tx = nearprox.scale_by_proximal(1.0)
  with pytest.raises(ValueError, match=r"example_weights must have shape \(4,\)"):
    tx.update(g, tx.init(None), example_weights=jnp.ones(5))
  with pytest.raises(ValueError, match=r"example_weights must have shape \(4,\)"):
    tx.update(g, tx.init(None), example_weights=jnp.ones((4, 1)))
  # Integer weights are accepted (cast to float).
  d, _ = tx.update(g, tx.init(None), example_weights=jnp.array([1, 2, 0, 1]))
  want, _, _ = reference(flat_rows(g), 1.0, weights=[1, 2, 0, 1])
  np.testing.assert_allclose(flat(d), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- step-size rules


@pytest.mark.parametrize("filter", ["tikhonov", "natural"])
@pytest.mark.parametrize("step_size", ["graft", "quadratic"])
@pytest.mark.parametrize("weighted", [False, True])
def test_step_size_rules_match_the_explicit_fisher(filter, step_size, weighted):
  g = random_per_example(8, seed=5)
  weights = jnp.asarray(WEIGHTS) if weighted else None
  step = functools.partial(
      filtered, damping=0.3, filter=filter, damping_mode="relative", step_size=step_size
  )
  d, state = jax.jit(step)(g, mask=jnp.asarray(MASK), example_weights=weights)
  want, alpha, unscaled = reference(
      flat_rows(g), 0.3, filter, "relative", MASK, None if weights is None else WEIGHTS, step_size
  )
  np.testing.assert_allclose(flat(d), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(state.stats.step_scale, alpha, rtol=1e-4)
  mean = flat_rows(g)[MASK > 0].mean(0)
  # kept_fraction is measured before the step-size scaling.
  np.testing.assert_allclose(
      state.stats.kept_fraction, unscaled @ unscaled / (mean @ mean), rtol=1e-4
  )
  if step_size == "graft":
    np.testing.assert_allclose(np.linalg.norm(flat(d)), np.linalg.norm(mean), rtol=1e-5)


def test_quadratic_step_of_the_natural_filter_is_the_damped_newton_step():
  """d = ρ(F+ρI)⁻¹g with ρ = λ/B has α = 1/ρ: the step is (F+ρI)⁻¹g."""
  g = random_per_example(6, seed=6)
  G = flat_rows(g)
  d, state = filtered(g, 0.7, filter="natural", step_size="quadratic")
  rho = 0.7 / 6
  newton = np.linalg.solve(G.T @ G / 6 + rho * np.eye(G.shape[1]), G.mean(0))
  np.testing.assert_allclose(flat(d), newton, rtol=1e-3, atol=1e-4 * np.abs(newton).max())
  np.testing.assert_allclose(state.stats.step_scale, 1 / rho, rtol=1e-3)


def test_step_size_damping_overrides_rho():
  g = random_per_example(8, seed=7)
  d, state = filtered(g, 0.5, jnp.asarray(MASK), step_size="quadratic", step_size_damping=0.02)
  want, alpha, _ = reference(flat_rows(g), 0.5, mask=MASK, step_size="quadratic", rho=0.02)
  np.testing.assert_allclose(flat(d), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
  np.testing.assert_allclose(state.stats.step_scale, alpha, rtol=1e-4)
  # ρ = 0: the undamped quadratic model.
  _, state0 = filtered(g, 0.5, jnp.asarray(MASK), step_size="quadratic", step_size_damping=0.0)
  np.testing.assert_allclose(
      state0.stats.step_scale,
      reference(flat_rows(g), 0.5, mask=MASK, step_size="quadratic", rho=0.0)[1],
      rtol=1e-4,
  )


@pytest.mark.parametrize("step_size", ["none", "graft"])
def test_max_update_norm_clips(step_size):
  g = random_per_example(8, seed=8)
  free, _ = filtered(g, 0.05, step_size=step_size)
  norm = np.linalg.norm(flat(free))
  clipped, state = filtered(g, 0.05, step_size=step_size, max_update_norm=0.5 * norm)
  np.testing.assert_allclose(np.linalg.norm(flat(clipped)), 0.5 * norm, rtol=1e-5)
  np.testing.assert_allclose(flat(clipped), 0.5 * flat(free), rtol=1e-5, atol=1e-8)
  want, alpha, _ = reference(flat_rows(g), 0.05, step_size=step_size, max_norm=0.5 * norm)
  np.testing.assert_allclose(state.stats.step_scale, alpha, rtol=1e-4)
  # A bound above the norm changes nothing.
  loose, _ = filtered(g, 0.05, step_size=step_size, max_update_norm=2.0 * norm)
  np.testing.assert_array_equal(flat(loose), flat(free))


def test_zero_gradients_give_a_zero_step_not_nan():
  g = jax.tree.map(jnp.zeros_like, random_per_example(4))
  for step_size in ("graft", "quadratic"):
    d, state = filtered(g, 0.1, damping_mode="relative", step_size=step_size, max_update_norm=1.0)
    assert np.all(flat(d) == 0) and float(state.stats.step_scale) == 0.0
  d, state = filtered(random_per_example(4), 0.1, jnp.zeros(4), step_size="quadratic")
  assert np.all(flat(d) == 0) and np.isfinite(float(state.stats.step_scale))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(step_size="newton"), "step_size"),
        (dict(step_size="quadratic", step_size_damping=-1.0), "step_size_damping"),
        (dict(step_size="quadratic", step_size_damping=float("nan")), "step_size_damping"),
        (dict(step_size="graft", step_size_damping=0.1), "quadratic"),
        (dict(max_update_norm=0.0), "max_update_norm"),
        (dict(max_update_norm=-1.0), "max_update_norm"),
        (dict(max_update_norm="big"), "max_update_norm"),
    ],
)
def test_bad_step_size_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    nearprox.scale_by_proximal(1.0, **kwargs)


# ---------------------------------------------------------------- several devices


CASES = [
    ("local", "tikhonov", "none", None),
    ("local", "natural", "graft", None),
    ("local", "tikhonov", "quadratic", 0.05),
    ("global", "tikhonov", "none", None),
    ("global", "natural", "quadratic", None),
    ("global", "tikhonov", "graft", 0.05),
]


@pytest.mark.parametrize("gram,filter,step_size,max_norm", CASES)
def test_weights_on_several_devices(gram, filter, step_size, max_norm):
  n, per_device = jax.device_count(), 3
  assert n == 8, "tests/conftest.py sets 8 host devices"
  g = random_per_example(n * per_device, seed=9)
  G = flat_rows(g)
  mask = np.ones(n * per_device, np.float32)
  mask[[4, 5, 22]] = 0  # device 1 has one real example, device 7 two
  weights = np.random.default_rng(10).uniform(0.0, 3.0, n * per_device).astype(np.float32)
  weights[9:12] = 0.0  # device 3 has no weight mass: share 0, no NaN
  options = dict(damping_mode="relative", filter=filter, step_size=step_size)
  tx = nearprox.scale_by_proximal(
      0.2, axis_name="batch", gram=gram, max_update_norm=max_norm, **options
  )

  def step(g, mask, weights):
    return tx.update(g, tx.init(None), mask=mask, example_weights=weights)[0]

  def ref(rows, m, s):
    return reference(rows, 0.2, filter, "relative", m, s, step_size, max_norm=max_norm)[0]

  if gram == "global":
    want = ref(G, mask, weights)
  else:  # each device's own step, combined by weight mass Σ m s
    blocks = [slice(i * per_device, (i + 1) * per_device) for i in range(n)]
    masses = np.array([(weights[b] * mask[b]).sum() for b in blocks])
    want = (
        sum(mass * ref(G[b], mask[b], weights[b]) for mass, b in zip(masses, blocks) if mass > 0)
        / masses.sum()
    )

  split = lambda x: x.reshape((n, per_device) + x.shape[1:])
  d_pmap = jax.pmap(step, axis_name="batch")(jax.tree.map(split, g), split(mask), split(weights))
  for i in range(n):  # every device holds the same result
    got = flat(jax.tree.map(lambda x: x[i], d_pmap))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())

  mesh = jax.make_mesh((n,), ("batch",))
  spec = jax.sharding.PartitionSpec("batch")
  sharded = jax.jit(
      jax.shard_map(step, mesh=mesh, in_specs=(spec,) * 3, out_specs=jax.sharding.PartitionSpec())
  )
  put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  d_shard = sharded(put(g), put(jnp.asarray(mask)), put(jnp.asarray(weights)))
  np.testing.assert_allclose(flat(d_shard), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_local_mode_with_the_identity_filter_gives_the_global_weighted_mean():
  """Huge damping makes the natural filter the identity: Σ_dev shares·d_dev = Gᵀ(m∘s)/Σ m∘s."""
  n, per_device = jax.device_count(), 2
  g = random_per_example(n * per_device, seed=11)
  G = flat_rows(g)
  weights = np.random.default_rng(12).uniform(0.0, 2.0, n * per_device).astype(np.float32)
  tx = nearprox.scale_by_proximal(1e9, filter="natural", axis_name="batch", gram="local")
  split = lambda x: x.reshape((n, per_device) + x.shape[1:])
  d = jax.pmap(lambda g, s: tx.update(g, tx.init(None), example_weights=s)[0], axis_name="batch")(
      jax.tree.map(split, g), split(weights)
  )
  want = G.T @ weights / weights.sum()
  np.testing.assert_allclose(flat(jax.tree.map(lambda x: x[0], d)), want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- factored per-example form


class SmallModel(nn.Module):

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(30, 6)(ids)
    x = nn.tanh(nn.Dense(8)(x))
    return nn.Dense(3)(x.mean(axis=1))


def test_factored_form_equals_dense_with_weights():
  model = SmallModel()
  ids = jax.random.randint(jax.random.key(0), (6, 5), 0, 30)
  labels = jax.random.randint(jax.random.key(1), (6,), 0, 3)
  params = model.init(jax.random.key(2), ids)["params"]

  def loss_fn(p, ids, labels):
    return losses.cross_entropy_loss(model.apply({"params": p}, ids), labels)

  logits = model.apply({"params": params}, ids)
  weights = losses.ief_weights("classification", logits, {"labels": labels})
  mask = jnp.array([1, 1, 0, 1, 1, 1])
  tx = nearprox.scale_by_proximal(0.05, damping_mode="relative", step_size="quadratic")

  @functools.partial(jax.jit, static_argnames="method")
  def step(params, method):
    grads = nearprox.per_example_grads(loss_fn, params, ids, labels, method=method)
    return tx.update(grads, tx.init(params), mask=mask, example_weights=weights)

  d_factored, state_factored = step(params, "factored")
  d_dense, state_dense = step(params, "vmap")
  factored = jax.eval_shape(  # the structure only: the kernels really are factors
      lambda p: nearprox.per_example_grads(loss_fn, p, ids, labels, method="factored"), params
  )
  assert isinstance(factored["Dense_0"]["kernel"], nearprox.PerExampleFactor)
  scale = np.abs(flat(d_dense)).max()
  np.testing.assert_allclose(flat(d_factored), flat(d_dense), rtol=1e-4, atol=1e-6 * scale)
  np.testing.assert_allclose(
      state_factored.stats.step_scale, state_dense.stats.step_scale, rtol=1e-4
  )


# ---------------------------------------------------------------- iEF weights from logits


def _grad_sq_norm(loss, *args):
  """‖∂loss_n/∂(first args)‖² per example by jax.grad, each example as a batch of one."""

  def one(*example):
    num_logits = 2 if loss is losses.span_cross_entropy_loss else 1
    grads = jax.grad(
        lambda *z: loss(*(x[None] for x in z), *(y[None] for y in example[num_logits:]))[0],
        argnums=tuple(range(num_logits)),
    )(*example[:num_logits])
    return sum(jnp.sum(jnp.square(x)) for x in grads)

  return jax.vmap(one)(*args)


def test_cross_entropy_weights_are_the_logit_gradient_norm():
  rng = np.random.default_rng(13)
  logits = jnp.asarray(3 * rng.normal(size=(7, 4)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 4, 7))
  got = losses.ief_weights("classification", logits, {"labels": labels})
  want = _grad_sq_norm(losses.cross_entropy_loss, logits, labels)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  probs = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(got, np.sum((probs - np.eye(4)[labels]) ** 2, -1), rtol=1e-5)


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_regression_weights_are_the_output_gradient_norm(shape):
  rng = np.random.default_rng(14)
  predictions = jnp.asarray(rng.normal(size=shape), jnp.float32)
  targets = jnp.asarray(rng.normal(size=6), jnp.float32)
  got = losses.ief_weights("regression", predictions, {"labels": targets})
  want = _grad_sq_norm(losses.mse_loss, predictions, targets)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got, 4 * (predictions.reshape(6) - targets) ** 2, rtol=1e-5)


def test_span_weights_are_the_gradient_norm_over_start_and_end():
  rng = np.random.default_rng(15)
  start = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
  end = jnp.asarray(rng.normal(size=(5, 9)), jnp.float32)
  positions = {
      "start_positions": jnp.asarray(rng.integers(0, 9, 5)),
      "end_positions": jnp.asarray(rng.integers(0, 9, 5)),
  }
  got = losses.ief_weights("qa", (start, end), positions)
  want = _grad_sq_norm(
      losses.span_cross_entropy_loss,
      start,
      end,
      positions["start_positions"],
      positions["end_positions"],
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="task must be one of"):
    losses.ief_weights("ranking", start, positions)


# ---------------------------------------------------------------- optimizers and the train step


def default_config(**overrides):
  config = default.get_config()
  config.update_from_flattened_dict({f"optimizer.{k}": v for k, v in overrides.items()})
  return config


def test_proximal_adamw_is_adamw_on_the_filtered_gradient():
  g = random_per_example(6, seed=16)
  params = {"dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
  per_example = {"dense": {"kernel": g["dense/kernel"], "bias": g["dense/bias"]}}
  config = default_config(name="proximal_adamw", step_size="graft", max_update_norm=0.3)
  config.objective.l2_weight = 0.01
  tx, per_example_input = optimizers.create_optimizer(config, 10, None)
  assert per_example_input
  opt = config.optimizer
  proximal = nearprox.scale_by_proximal(
      opt.damping,
      filter=opt.filter,
      damping_mode=opt.damping_mode,
      step_size="graft",
      max_update_norm=0.3,
  )
  d, proximal_state = proximal.update(per_example, proximal.init(params))
  kernel = d["dense"]["kernel"] + 0.01 * params["dense"]["kernel"]  # L2 on kernels only
  with_l2 = {"dense": {"kernel": kernel, "bias": d["dense"]["bias"]}}
  adamw = optax.adamw(
      optimizers.warmup_linear_decay(opt.learning_rate, round(opt.warmup_fraction * 10), 10),
      weight_decay=opt.weight_decay,
      mask=optimizers.kernel_mask,
  )
  want, _ = adamw.update(with_l2, adamw.init(params), params)
  got, state = tx.update(per_example, tx.init(params), params)
  np.testing.assert_allclose(flat(got), flat(want), rtol=1e-6, atol=1e-9)
  proximal_stats = optax.tree_utils.tree_get(state, "ScaleByProximalState").stats
  assert float(proximal_stats.step_scale) == float(proximal_state.stats.step_scale) != 1.0


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(name="proximal_adam"), r"name must be one of .*'proximal_adamw'"),
        (dict(weighting="iEF"), r"weighting must be one of \('uniform', 'ief'\)"),
        (dict(step_size="newton"), r"step_size must be one of \('none', 'graft', 'quadratic'\)"),
        (dict(name="sgd", weighting="ief"), "weighting='ief' .* needs one of"),
        (dict(name="adamw", weighting="ief"), "weighting='ief' .* needs one of"),
        (dict(name="adamw", step_size="graft"), "step_size, max_update_norm"),
        (dict(name="adamw", weight_normalization="damping"), "weight_normalization configure"),
        (dict(max_update_norm=-1.0), "max_update_norm must be >= 0"),
    ],
)
def test_create_optimizer_rejects_bad_settings(overrides, match):
  with pytest.raises(ValueError, match=match):
    optimizers.create_optimizer(default_config(**overrides), 10, None)


def tiny_step_inputs(batch=4, length=8):
  config = models.tiny_config(num_hidden_layers=1, num_labels=3)
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0), batch, length)
  # A larger head spreads the logits, so that the examples' iEF weights differ.
  params["classifier"]["kernel"] = 100.0 * params["classifier"]["kernel"]
  ids = jax.random.randint(jax.random.key(1), (batch, length), 1, config.vocab_size)
  attention_mask = jnp.ones((batch, length), jnp.int32).at[1, 5:].set(0)
  batch_arrays = {
      "input_ids": ids * attention_mask,
      "attention_mask": attention_mask,
      "token_type_ids": jnp.zeros((batch, length), jnp.int32),
      "labels": jnp.arange(batch) % 3,
      "mask": jnp.array([1, 1, 1, 0], jnp.float32),
      "index": jnp.arange(batch),
  }
  return model, params, batch_arrays


def test_train_step_with_ief_weights_passes_them_to_the_filter():
  model, params, batch = tiny_step_inputs()
  logits_fn = models.bert_logits_fn(model, deterministic=True)
  objective = objectives.ObjectiveConfig(kind="clean")
  loss_fn = objectives.make_loss_at_perturbation(logits_fn, objective, with_ief_weights=True)
  perturbation_fn = functools.partial(
      objectives.adversarial_perturbation, logits_fn, objective, hidden_size=32
  )
  config = default_config(weighting="ief", momentum=0.0, filter="natural", warmup_fraction=0.0)
  tx, per_example = optimizers.create_optimizer(config, 10, None)
  state = train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  step = functools.partial(
      train.train_step,
      perturbation_fn=perturbation_fn,
      loss_fn=loss_fn,
      tx=tx,
      per_example=per_example,
      per_example_method="factored",
      axis_name=None,
      loss_returns_weights=True,
  )
  new_state, metrics = jax.jit(step)(state, batch, jax.random.key(3))

  @jax.jit
  def by_hand(params):
    """The step with iEF weights at the clean logits, and with uniform weights (vmap oracle)."""
    inputs = {k: batch[k] for k in task_io.INPUT_KEYS}
    weights = losses.ief_weights("classification", logits_fn(params, inputs), inputs)
    grads = nearprox.per_example_grads(
        lambda p, b: losses.task_loss("classification", logits_fn(p, b), b),
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
  scale = np.abs(flat(want) - flat(params)).max()
  np.testing.assert_allclose(flat(new_state.params), flat(want), rtol=1e-4, atol=1e-4 * scale)
  # The weights differ between examples and change the step well beyond the tolerance.
  kept = np.asarray(weights)[np.asarray(batch["mask"]) > 0]
  assert kept.max() > 2 * kept.min()
  assert np.abs(flat(uniform) - flat(want)).max() > 1e-2 * scale
  assert np.isfinite(float(metrics["loss"])) and "gram/step_scale" in metrics


def test_training_with_ief_weighting_runs(tmp_path, monkeypatch):
  """train_and_evaluate on the tiny config with weighting="ief", two steps, logs step_scale."""
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  glue_dir = write_sst2(tmp_path / "glue", n_train=16, n_dev=8)
  config = tiny_config(
      glue_dir,
      **{
          "optimizer.weighting": "ief",
          "optimizer.step_size": "graft",
          "optimizer.max_update_norm": 1.0,
          "num_train_steps": 2,
          "log_every": 1,
          "checkpoint_every": 100,
          "parallel": "jit",
      },
  )
  report = train.train_and_evaluate(config, tmp_path / "run")
  assert report["steps"] == 2
  records = [
      json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  ]
  scales = [r["train/gram/step_scale"] for r in records if "train/gram/step_scale" in r]
  assert len(scales) == 2 and all(np.isfinite(scales)) and all(s > 0 for s in scales)
  # λ / Σ m∘s, the scalar between the "sum" step and Wu et al.'s eq. 8 step, is logged too.
  ratios = [r["train/gram/normalization_ratio"] for r in records if "train/gram/step_scale" in r]
  assert len(ratios) == 2 and all(np.isfinite(ratios)) and all(r > 0 for r in ratios)
