"""PCGrad (nearprox.pcgrad) against a NumPy transcription of Yu et al.'s Algorithm 1 and on the
paper's two-task toy problem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nearprox import pcgrad


def algorithm1(task_grads: np.ndarray, orders: np.ndarray) -> np.ndarray:
  """Yu et al. (NeurIPS 2020), Algorithm 1, line by line: task gradients [T, P] → Σ_i g_i^PC."""
  projected = []
  for i, g_i in enumerate(task_grads):
    g_pc = g_i.copy()
    for j in orders[i]:
      g_j = task_grads[j]
      if g_pc @ g_j < 0:
        g_pc = g_pc - (g_pc @ g_j) / (g_j @ g_j) * g_j
    projected.append(g_pc)
  return np.sum(projected, axis=0)


def per_example_inputs(batch=12, num_tasks=4, seed=0):
  """Per-example gradients as a two-leaf pytree, task ids covering every task, a mask."""
  rng = np.random.default_rng(seed)
  grads = {
      "w": rng.normal(size=(batch, 3, 2)).astype(np.float32),
      "b": rng.normal(size=(batch, 2)).astype(np.float32),
  }
  task_ids = np.arange(batch) % num_tasks
  rng.shuffle(task_ids)
  return grads, task_ids.astype(np.int32)


def flat(tree) -> np.ndarray:
  return np.concatenate(
      [np.asarray(tree[k], np.float64).reshape(tree[k].shape[0], -1) for k in ("b", "w")], axis=1
  )


def flat_update(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(tree[k], np.float64)) for k in ("b", "w")])


def reference_task_grads(rows, task_ids, mask, num_tasks, weighting):
  """g_t = Σ_n W_nt g_n with the weights of the module docstring, in float64."""
  keep = mask > 0
  out = []
  for t in range(num_tasks):
    member = keep & (task_ids == t)
    total = member.sum() if weighting == "mean" else keep.sum()
    out.append(rows[member].sum(0) / total if member.any() else np.zeros(rows.shape[1]))
  return np.stack(out)


@pytest.mark.parametrize("weighting", ["batch", "mean"])
def test_matches_algorithm1_on_per_example_gradients(weighting):
  """Three steps (a new random order each), a masked example holding NaN, both weightings."""
  num_tasks, seed = 4, 7
  grads, task_ids = per_example_inputs(num_tasks=num_tasks)
  mask = np.ones(len(task_ids), np.float32)
  mask[5] = 0.0
  grads["w"][5] = np.nan  # a masked row must not reach anything
  tx = pcgrad.pcgrad_aggregate(num_tasks, seed=seed, task_weighting=weighting)
  update = jax.jit(lambda g, s: tx.update(g, s, task_ids=task_ids, mask=mask))
  state = tx.init(None)
  rows = np.nan_to_num(flat(grads))
  task_grads = reference_task_grads(rows, task_ids, mask, num_tasks, weighting)
  cosines = task_grads @ task_grads.T / np.outer(*[np.linalg.norm(task_grads, axis=1)] * 2)
  assert (cosines < 0).any(), "the example must have conflicting tasks"
  seen_orders = set()
  for step in range(3):
    orders = np.asarray(
        pcgrad.random_orders(jax.random.fold_in(jax.random.PRNGKey(seed), step), num_tasks)
    )
    seen_orders.add(orders.tobytes())
    direction, state = update(grads, state)
    np.testing.assert_allclose(
        flat_update(direction), algorithm1(task_grads, orders), rtol=2e-5, atol=1e-6
    )
  assert len(seen_orders) > 1, "the order is drawn anew every step"
  assert int(state.count) == 3
  pairs = [(s, t) for s in range(num_tasks) for t in range(s + 1, num_tasks)]
  conflicts = np.mean([task_grads[s] @ task_grads[t] < 0 for s, t in pairs])
  np.testing.assert_allclose(float(state.stats.conflict_fraction), conflicts)
  np.testing.assert_allclose(
      float(state.stats.min_cosine), min(cosines[s, t] for s, t in pairs), rtol=1e-5
  )


def test_random_orders_are_permutations_of_the_other_tasks():
  orders = np.asarray(pcgrad.random_orders(jax.random.PRNGKey(3), 5))
  assert orders.shape == (5, 4)
  for i, row in enumerate(orders):
    assert sorted(row) == [j for j in range(5) if j != i]
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(20))
  firsts = jax.jit(jax.vmap(lambda k: pcgrad.random_orders(k, 3)[0, 0]))(keys)
  assert set(np.asarray(firsts).tolist()) == {1, 2}


def test_without_conflicts_it_is_the_mean_gradient_and_an_absent_task_adds_nothing():
  """Aligned tasks: d = Σ_t g_t = the batch's mean gradient ("batch" weighting); task 2 of 3
  has no example in the batch."""
  rng = np.random.default_rng(1)
  base = rng.normal(size=(1, 4)).astype(np.float32)
  grads = {"w": (base * rng.uniform(0.5, 2.0, size=(6, 1))).astype(np.float32)}
  task_ids = np.array([0, 1, 0, 1, 1, 0], np.int32)
  tx = pcgrad.pcgrad_aggregate(3)
  direction, state = jax.jit(lambda g: tx.update(g, tx.init(None), task_ids=task_ids))(grads)
  np.testing.assert_allclose(direction["w"], grads["w"].mean(0), rtol=1e-6)
  assert float(state.stats.projections) == 0 and float(state.stats.conflict_fraction) == 0


def test_several_devices_equal_one_device_on_the_concatenated_batch():
  """``axis_name``: task gradients summed over devices (vmap stands in for shard_map)."""
  grads, task_ids = per_example_inputs(batch=12, num_tasks=3, seed=2)
  mask = np.ones(12, np.float32)
  mask[[3, 10]] = 0.0
  for weighting in ("batch", "mean"):
    one = pcgrad.pcgrad_aggregate(3, task_weighting=weighting)
    expected, _ = jax.jit(
        lambda g, tx=one: tx.update(g, tx.init(None), task_ids=task_ids, mask=mask)
    )(grads)
    split = pcgrad.pcgrad_aggregate(3, task_weighting=weighting, axis_name="batch")
    blocks = jax.tree.map(lambda x: x.reshape((3, 4) + x.shape[1:]), (grads, task_ids, mask))

    def per_device(g, ids, m, tx=split):
      return tx.update(g, tx.init(None), task_ids=ids, mask=m)[0]

    found = jax.jit(jax.vmap(per_device, axis_name="batch"))(*blocks)
    for key in grads:
      for device in range(3):
        np.testing.assert_allclose(found[key][device], expected[key], rtol=1e-5, atol=1e-7)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="num_tasks >= 2"):
    pcgrad.pcgrad_aggregate(1)
  with pytest.raises(ValueError, match="task_weighting"):
    pcgrad.pcgrad_aggregate(2, task_weighting="sum")
  tx = pcgrad.pcgrad_aggregate(2)
  grads = {"w": np.ones((4, 3), np.float32)}
  with pytest.raises(ValueError, match="needs task_ids"):
    tx.update(grads, tx.init(None))
  with pytest.raises(ValueError, match="task_ids must be integers"):
    tx.update(grads, tx.init(None), task_ids=np.zeros(3, np.int32))


# ------------------------------------------------------------------ the paper's toy problem


def toy_losses(theta):
  """The two-task problem of Yu et al.'s Figure 1 (appendix): θ = (x, y) ∈ ℝ²."""
  x, y = theta
  first = 20 * jnp.log10(jnp.maximum(jnp.abs(0.5 * x + jnp.tanh(y)), 5e-6))
  second = 25 * jnp.log10(jnp.maximum(jnp.abs(0.5 * x - jnp.tanh(y) + 2), 5e-6))
  return jnp.stack([first, second])


TOY_START = (0.5, -3.0)  # the start of the paper's figure (and of common re-implementations)


def test_two_task_toy_projection_at_the_start():
  """At the start the task gradients conflict (cos ≈ −1) and the summed step would raise L₂;
  for two tasks PCGrad is g₁ + g₂ minus both projections (no order dependence), and its step
  raises neither loss to first order."""
  jac = np.asarray(jax.jacrev(toy_losses)(jnp.array(TOY_START)), np.float64)
  g1, g2 = jac
  assert g1 @ g2 / np.linalg.norm(g1) / np.linalg.norm(g2) < -0.99
  assert (g1 + g2) @ g2 < 0  # descent on the sum ascends L₂
  expected = g1 - (g1 @ g2) / (g2 @ g2) * g2 + g2 - (g1 @ g2) / (g1 @ g1) * g1
  tx = pcgrad.pcgrad_aggregate(2, task_weighting="mean")  # one example per task: ∇L₁, ∇L₂
  update = jax.jit(lambda g: tx.update(g, tx.init(None), task_ids=jnp.array([0, 1])))
  direction, state = update(jnp.asarray(jac, jnp.float32))
  scale = 1e-5 * np.linalg.norm(expected)  # its x-component is a difference of large terms
  np.testing.assert_allclose(direction, expected, rtol=1e-5, atol=scale)
  np.testing.assert_allclose(direction, algorithm1(jac, np.array([[1], [0]])), atol=scale)
  assert direction @ g1 >= -1e-6 and direction @ g2 >= -1e-6
  assert float(state.stats.projections) == 2


def test_two_task_toy_descent_lowers_both_losses_where_the_sum_does_not():
  """100 gradient steps of size 0.002 from the start: with PCGrad both losses fall at every
  step; on the summed gradient L₂ ends higher than it started."""
  jac = jax.jacrev(toy_losses)
  tx = pcgrad.pcgrad_aggregate(2, task_weighting="mean")

  def descend(use_pcgrad):
    def step(theta, _):
      grads = jac(theta)
      if use_pcgrad:
        direction = tx.update(grads, tx.init(None), task_ids=jnp.array([0, 1]))[0]
      else:
        direction = grads.sum(0)
      theta = theta - 0.002 * direction
      return theta, toy_losses(theta)

    scan = jax.jit(lambda start: jax.lax.scan(step, start, None, length=100)[1])
    return np.asarray(scan(jnp.array(TOY_START)))

  start = np.asarray(toy_losses(jnp.array(TOY_START)))
  with_pcgrad = np.concatenate([start[None], descend(True)])
  assert (np.diff(with_pcgrad, axis=0) <= 1e-4).all()
  assert (with_pcgrad[-1] < start).all()
  assert descend(False)[-1, 1] > start[1] + 1.0


def test_chains_with_adamw_and_jits():
  """PCGrad first in an optax chain (extra args reach it) under jit."""
  grads, task_ids = per_example_inputs(num_tasks=3)
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), grads)
  tx = optax.chain(pcgrad.pcgrad_aggregate(3), optax.adamw(1e-3))
  state = tx.init(params)
  updates, state = jax.jit(lambda g, s: tx.update(g, s, params, task_ids=task_ids))(grads, state)
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
  assert optax.tree_utils.tree_get(state, "PCGradState").count == 1
