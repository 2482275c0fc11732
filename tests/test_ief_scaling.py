"""The scale of the (i)EF step: ``weight_normalization`` "sum" (w = m∘s/Σ m∘s, the default) and
"damping" (w = m∘s/λ: Wu et al. 2024, eq. 8), against a NumPy transcription of their
Algorithm 1, and the logged ratio λ/Σ m∘s between the two (docs/method.md §1.4)."""

import glob
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import nearprox
from experiments import run_process, runs
from experiments.configs import default
from nearprox.text import losses
from nearprox.training import optimizers
from tests.per_example_trees import flat, flat_rows, random_per_example

REPO = pathlib.Path(__file__).resolve().parents[1]


def algorithm_1_step(G, s, damping):
  """Wu et al. 2024, Algorithm 1 (eq. 8): Δθ = Gᵀ(GGᵀ + λI)⁻¹ s, in float64 (θ ← θ − ηΔθ)."""
  G, s = np.asarray(G, np.float64), np.asarray(s, np.float64)
  return G.T @ np.linalg.solve(G @ G.T + damping * np.eye(len(s)), s)


def relative(G, factor):
  """λ = factor · trace(GGᵀ) / B."""
  G = np.asarray(G, np.float64)
  return factor * np.sum(G * G) / G.shape[0]


def filtered(per_example, damping, mask=None, weights=None, **kw):
  tx = nearprox.scale_by_proximal(damping, filter="natural", **kw)
  return tx.update(per_example, tx.init(None), mask=mask, example_weights=weights)


# ---------------------------------------------------------------- one step


@pytest.mark.parametrize(
    "damping_mode,damping", [("absolute", 1e-3), ("absolute", 3.0), ("relative", 0.1)]
)
def test_both_normalizations_against_algorithm_1(damping_mode, damping):
  g = random_per_example(8, seed=1)
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], np.float32)
  s = np.array([0.3, 2.0, 5.0, 0.01, 1.1, 0.05, 7.0, 0.6], np.float32)
  # Garbage in masked rows (gradients and weights) must not leak.
  poisoned = jax.tree.map(lambda x: x.at[2].set(jnp.nan), g)
  weights = jnp.asarray(s).at[6].set(jnp.nan)
  keep = mask > 0
  G = flat_rows(g)[keep]
  lam = relative(G, damping) if damping_mode == "relative" else damping
  paper = algorithm_1_step(G, s[keep], lam)
  step = jax.jit(filtered, static_argnames=("damping_mode", "weight_normalization"))
  kw = dict(mask=jnp.asarray(mask), weights=weights, damping_mode=damping_mode)
  d_paper, state_paper = step(poisoned, damping, weight_normalization="damping", **kw)
  d_sum, state_sum = step(poisoned, damping, **kw)
  np.testing.assert_allclose(flat(d_paper), paper, rtol=2e-4, atol=1e-5 * np.abs(paper).max())
  # Today's normalized step is the paper's times λ / Σ m∘s, and the state logs that scalar.
  ratio = lam / s[keep].sum()
  np.testing.assert_allclose(
      flat(d_sum), ratio * paper, rtol=2e-4, atol=1e-5 * ratio * np.abs(paper).max()
  )
  for state in (state_paper, state_sum):
    np.testing.assert_allclose(state.stats.normalization_ratio, ratio, rtol=1e-5)
    np.testing.assert_allclose(state.stats.damping, lam, rtol=1e-5)
    assert float(state.stats.step_scale) == 1.0
  # kept_fraction is ‖d‖² / ‖g‖² of the step taken, g the plain masked mean gradient.
  mean = G.mean(0)
  np.testing.assert_allclose(
      state_paper.stats.kept_fraction, paper @ paper / (mean @ mean), rtol=1e-3
  )


def test_without_weights_the_damping_normalization_is_the_ef_step():
  """Uniform weights: Wu et al.'s eq. 5, (GᵀG + λI)⁻¹ Gᵀ1 = Gᵀ(GGᵀ + λI)⁻¹1."""
  g = random_per_example(6, seed=2)
  G = flat_rows(g)
  d, state = filtered(g, 0.5, weight_normalization="damping")
  want = np.linalg.solve(G.T @ G + 0.5 * np.eye(G.shape[1]), G.T @ np.ones(6))
  np.testing.assert_allclose(flat(d), want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.stats.normalization_ratio, 0.5 / 6, rtol=1e-6)  # ρ = λ/B


def test_first_order_loss_decrease_follows_s_only_without_normalization():
  """Lemma C.1 of Wu et al.: for small λ and full-rank K the step −Δθ lowers example n's loss by
  (K c)_n ≈ s_n to first order. Normalized by Σ s, the decrease no longer scales with s."""
  rng = np.random.default_rng(3)
  G = rng.normal(size=(6, 40))  # P > B: K has full rank
  g = {"w": jnp.asarray(G, jnp.float32)}
  s = rng.uniform(0.5, 2.0, 6)
  decrease = {}
  for scale in (1.0, 0.1, 0.01):
    for normalization in ("damping", "sum"):
      d, _ = filtered(g, 1e-3, weights=jnp.asarray(scale * s), weight_normalization=normalization)
      decrease[normalization, scale] = G @ flat(d)  # (K c)_n = g_nᵀ d
    np.testing.assert_allclose(decrease["damping", scale], scale * s, rtol=1e-3)
  total = {key: value.sum() for key, value in decrease.items()}
  np.testing.assert_allclose(total["sum", 0.01], total["sum", 1.0], rtol=1e-4)  # hidden 1/Σs
  np.testing.assert_allclose(total["damping", 0.01], 0.01 * total["damping", 1.0], rtol=1e-3)


@pytest.mark.parametrize(
    "step_size,max_norm", [("graft", None), ("quadratic", None), ("graft", 0.05)]
)
def test_step_size_rules_absorb_the_normalization(step_size, max_norm):
  g = random_per_example(8, seed=4)
  s = jnp.asarray(np.random.default_rng(5).uniform(0.1, 3.0, 8), jnp.float32)
  kw = dict(weights=s, damping_mode="relative", step_size=step_size, max_update_norm=max_norm)
  d_sum, state_sum = filtered(g, 0.2, **kw)
  d_paper, state_paper = filtered(g, 0.2, weight_normalization="damping", **kw)
  np.testing.assert_allclose(flat(d_paper), flat(d_sum), rtol=1e-4, atol=1e-7)
  # α differs by exactly the ratio it absorbs.
  np.testing.assert_allclose(
      state_paper.stats.step_scale,
      state_sum.stats.step_scale * state_sum.stats.normalization_ratio,
      rtol=1e-4,
  )


def test_max_update_norm_bounds_the_unnormalized_step():
  g = random_per_example(8, seed=6)
  G = flat_rows(g)
  paper = algorithm_1_step(G, np.ones(8), 1e-2)
  bound = 0.5 * np.linalg.norm(paper)
  d, state = filtered(g, 1e-2, weight_normalization="damping", max_update_norm=bound)
  np.testing.assert_allclose(flat(d), 0.5 * paper, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.stats.step_scale, 0.5, rtol=1e-4)


@pytest.mark.parametrize("scale", [2.0**-60, 2.0**60])  # λ = 0.1·scale² stays a normal float32
@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
def test_unnormalized_step_at_extreme_loss_scales(scale, damping_mode):
  """The exact power-of-two rescaling of K (docs/method.md §1.7) holds for c in units of 1/K."""
  g = random_per_example(6, seed=7, scale=scale)
  G = flat_rows(g)
  s = np.linspace(0.5, 2.0, 6)
  damping = 0.1 if damping_mode == "relative" else 0.1 * scale**2  # the same filter
  d, _ = filtered(
      g, damping, weights=jnp.asarray(s), damping_mode=damping_mode, weight_normalization="damping"
  )
  lam = relative(G, 0.1) if damping_mode == "relative" else damping
  want = algorithm_1_step(G, s, lam)
  np.testing.assert_allclose(flat(d), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_weight_normalization_is_checked():
  with pytest.raises(ValueError, match=r"weight_normalization must be one of \('sum', 'damping'\)"):
    nearprox.scale_by_proximal(1.0, filter="natural", weight_normalization="none")
  with pytest.raises(ValueError, match='needs filter="natural"'):
    nearprox.scale_by_proximal(1.0, weight_normalization="damping")
  with pytest.raises(ValueError, match='needs filter="natural"'):
    nearprox.filter_coefficients(jnp.eye(2), jnp.ones(2), 1.0, weight_normalization="damping")


def test_eq_8_damping_is_not_the_damped_ief_matrix():
  """The damping is eq. 8's λI on the unnormalized Gram, not the damped iEF matrix
  (F⋆ + λI)⁻¹Gᵀ1 = Gᵀ(K + λ·diag s)⁻¹s, F⋆ = Gᵀdiag(s)⁻¹G (Wu et al., eq. 14)."""
  g = random_per_example(8, seed=8)
  G = flat_rows(g)
  s = np.random.default_rng(9).uniform(0.05, 2.0, 8)
  lam = relative(G, 1.0)
  f_star = G.T @ np.diag(1 / s) @ G
  matrix_step = np.linalg.solve(f_star + lam * np.eye(G.shape[1]), G.T @ np.ones(8))
  np.testing.assert_allclose(
      matrix_step, G.T @ np.linalg.solve(G @ G.T + lam * np.diag(s), s), rtol=1e-8
  )
  d, _ = filtered(
      g, 1.0, weights=jnp.asarray(s), damping_mode="relative", weight_normalization="damping"
  )
  np.testing.assert_allclose(flat(d), algorithm_1_step(G, s, lam), rtol=1e-4, atol=1e-7)
  cosine = flat(d) @ matrix_step / (np.linalg.norm(flat(d)) * np.linalg.norm(matrix_step))
  assert cosine < 0.999  # different directions unless s is constant or λ → 0


# ---------------------------------------------------------------- training: Algorithm 1 itself


def _softmax_regression(seed=10, n=8, dim=5, classes=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim))
  y = rng.integers(0, classes, n)
  params = {"w": 0.3 * rng.normal(size=(dim, classes)), "b": np.zeros(classes)}
  return x, y, params


def _numpy_per_example(x, y, params):
  """(G [B, P] in the pytree order b, w; s = ‖softmax(z) − onehot(y)‖²) of softmax CE."""
  z = x @ params["w"] + params["b"]
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  r = p - np.eye(p.shape[1])[y]
  grad_w = x[:, :, None] * r[:, None, :]
  return np.concatenate([r, grad_w.reshape(len(y), -1)], axis=1), np.sum(r * r, axis=1)


@pytest.mark.parametrize("damping_mode,damping", [("absolute", 1e-3), ("relative", 0.1)])
def test_proximal_sgd_runs_algorithm_1(damping_mode, damping):
  """Five steps of proximal SGD with iEF weights: weight_normalization="damping" follows
  Algorithm 1 exactly; "sum" follows it with the learning rate η·λ_t/Σ s_t of each step."""
  x, y, start = _softmax_regression()
  lr = 0.5

  def loss_fn(params, x, y):
    return losses.cross_entropy_loss(x @ params["w"] + params["b"], y)

  def jax_run(normalization):
    opt = nearprox.proximal_sgd(
        lr,
        damping,
        filter="natural",
        damping_mode=damping_mode,
        weight_normalization=normalization,
    )
    params = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), start)
    state = opt.init(params)
    xs, ys = jnp.asarray(x, jnp.float32), jnp.asarray(y)
    for _ in range(5):
      grads = nearprox.per_example_grads(loss_fn, params, xs, ys, method="vmap")
      s = losses.ief_weights("classification", xs @ params["w"] + params["b"], {"labels": ys})
      updates, state = opt.update(grads, state, params, example_weights=s)
      params = optax.apply_updates(params, updates)
    return params

  def numpy_run(normalized):
    params = {k: v.copy() for k, v in start.items()}
    for _ in range(5):
      G, s = _numpy_per_example(x, y, params)
      lam = relative(G, damping) if damping_mode == "relative" else damping
      step = algorithm_1_step(G, s, lam) * (lam / s.sum() if normalized else 1.0)
      params["b"] = params["b"] - lr * step[:3]
      params["w"] = params["w"] - lr * step[3:].reshape(params["w"].shape)
    return params

  paper, normalized = numpy_run(False), numpy_run(True)
  # float32 against float64 through five near-Newton steps (K's condition number amplifies).
  np.testing.assert_allclose(flat(jax_run("damping")), flat(paper), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(flat(jax_run("sum")), flat(normalized), rtol=1e-3, atol=1e-4)
  assert np.abs(flat(paper) - flat(normalized)).max() > 1e-2  # the two are different methods


# ---------------------------------------------------------------- several devices


@pytest.mark.parametrize(
    "gram,step_size,max_norm",
    [
        ("global", "none", None),
        ("local", "none", None),
        ("local", "none", 0.5),
        ("local", "graft", None),
    ],
)
def test_unnormalized_step_on_several_devices(gram, step_size, max_norm):
  n, per_device = jax.device_count(), 3
  assert n == 8, "tests/conftest.py sets 8 host devices"
  g = random_per_example(n * per_device, seed=11)
  G = flat_rows(g)
  mask = np.ones(n * per_device, np.float32)
  mask[[4, 5, 22]] = 0
  s = np.random.default_rng(12).uniform(0.0, 3.0, n * per_device).astype(np.float32)
  s[9:12] = 0.0  # device 3 has no weight mass
  options = dict(
      filter="natural",
      damping_mode="relative",
      axis_name="batch",
      gram=gram,
      step_size=step_size,
      max_update_norm=max_norm,
  )
  paper_tx = nearprox.scale_by_proximal(0.2, weight_normalization="damping", **options)
  sum_tx = nearprox.scale_by_proximal(0.2, **options)

  def step(g, mask, s):
    return tuple(
        tx.update(g, tx.init(None), mask=mask, example_weights=s)[0] for tx in (paper_tx, sum_tx)
    )

  split = lambda v: v.reshape((n, per_device) + v.shape[1:])
  d_paper, d_sum = jax.pmap(step, axis_name="batch")(jax.tree.map(split, g), split(mask), split(s))
  got = flat(jax.tree.map(lambda v: v[0], d_paper))

  def block_step(b):
    keep = mask[b] > 0
    rows = G[b][keep]
    return algorithm_1_step(rows, s[b][keep], relative(rows, 0.2)) if keep.any() else 0.0

  blocks = [slice(i * per_device, (i + 1) * per_device) for i in range(n)]
  if gram == "global":
    keep = mask > 0
    want = algorithm_1_step(G[keep], s[keep], relative(G[keep], 0.2))
  elif step_size == "graft":  # the rule absorbs the normalization, across devices too
    want = flat(jax.tree.map(lambda v: v[0], d_sum))
  elif max_norm is None:  # the step of the block-diagonal Gram: the sum of the devices' steps
    want = sum(block_step(b) for b in blocks)
  else:  # each device's step, in the units of its share, clipped; then combined by the shares
    masses = np.array([(s[b] * mask[b]).sum() for b in blocks])
    want = 0.0
    for mass, b in zip(masses, blocks):
      if mass > 0:
        local = block_step(b) * masses.sum() / mass
        local *= min(1.0, max_norm / np.linalg.norm(local))
        want = want + mass / masses.sum() * local
    assert np.linalg.norm(want) <= max_norm * (1 + 1e-6)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------- the training config


def test_training_config_passes_weight_normalization_through():
  g = random_per_example(6, seed=13)
  params = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
  per_example = {"dense": {"kernel": g["dense/kernel"], "bias": g["dense/bias"]}}
  s = jnp.linspace(0.2, 1.5, 6)
  config = default.get_config()
  assert config.optimizer.weight_normalization == "sum"  # today's step, the stored runs' meaning
  overrides = dict(filter="natural", momentum=0.0, warmup_fraction=0.0)
  config.update_from_flattened_dict({f"optimizer.{k}": v for k, v in overrides.items()})
  config.objective.l2_weight = 0.0
  steps = {}
  for normalization in ("sum", "damping"):
    config.optimizer.weight_normalization = normalization
    tx, _ = optimizers.create_optimizer(config, 10, None)
    steps[normalization], state = tx.update(per_example, tx.init(params), params, example_weights=s)
  ratio = optax.tree_utils.tree_get(state, "ScaleByProximalState").stats.normalization_ratio
  want = float(ratio) * flat(steps["damping"])
  np.testing.assert_allclose(flat(steps["sum"]), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  del config.optimizer.weight_normalization  # a config written before the field existed
  tx, _ = optimizers.create_optimizer(config, 10, None)
  old, _ = tx.update(per_example, tx.init(params), params, example_weights=s)
  np.testing.assert_array_equal(flat(old), flat(steps["sum"]))
  config.optimizer.weight_normalization = "damping"
  config.optimizer.filter = "tikhonov"
  with pytest.raises(ValueError, match='needs filter="natural"'):
    optimizers.create_optimizer(config, 10, None)


def test_stored_runs_keep_their_keys():
  """Every stored run record's key is still the key of its config: the new fields' defaults
  (optimizer.weight_normalization="sum", objective.ief_weights="clean_term") are today's
  behaviour and are left out of the keys."""
  assert default.get_config().objective.ief_weights == "clean_term"
  paths = sorted(glob.glob(str(REPO / "experiments" / "results" / "*" / "runs" / "*.json")))
  assert paths
  for path in paths:
    record = json.loads(pathlib.Path(path).read_text())
    attack = None
    if record["attack"]:
      rows = record["attack"]
      epsilons = tuple(row["epsilon"] for row in rows)
      attack = run_process.Attack(epsilons, rows[0]["num_steps"], rows[0]["num_examples"])
    config = ml_collections.ConfigDict(record["config"])
    assert runs.run_key(config, record["devices"], attack) == record["key"], path
