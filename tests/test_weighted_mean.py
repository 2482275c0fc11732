"""The filter's ablation, AdamW on the example-weighted mean gradient (issue 40, part 2):
``optimizers.weighted_mean_aggregate`` against NumPy, dense and factored, one device and a
batch split over devices, and the "weighted_mean_adamw" chain against AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default
from nearprox.layer_factors import DenseFactor
from nearprox.training import optimizers

B = 8


def weighted_mean_numpy(grads: np.ndarray, mask: np.ndarray, weights: np.ndarray) -> np.ndarray:
  scaled = mask * weights
  return np.tensordot(scaled / scaled.sum(), grads, axes=1)


def example_inputs():
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(B, 5, 3)).astype(np.float32)
  mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
  weights = rng.uniform(0.1, 2.0, size=B).astype(np.float32)
  grads[3] = np.nan  # a masked example: nothing in it may leak
  weights[6] = np.nan
  return grads, mask, weights


def test_weighted_mean_matches_numpy_dense_and_factored():
  grads, mask, weights = example_inputs()
  tx = optimizers.weighted_mean_aggregate()
  state = tx.init(None)
  got, _ = tx.update({"w": jnp.asarray(grads)}, state, mask=mask, example_weights=weights)
  want = weighted_mean_numpy(np.nan_to_num(grads), mask, np.nan_to_num(weights))
  np.testing.assert_allclose(got["w"], want, rtol=1e-5, atol=1e-6)
  # Without weights: the plain mean over the unmasked examples.
  got, _ = tx.update({"w": jnp.asarray(grads)}, state, mask=mask)
  want = np.nan_to_num(grads)[mask > 0].mean(axis=0)
  np.testing.assert_allclose(got["w"], want, rtol=1e-5, atol=1e-6)
  # Factored per-example gradients a_iᵀ δ_i of a dense layer (the training path's form).
  rng = np.random.default_rng(1)
  a = rng.normal(size=(B, 4, 5)).astype(np.float32)
  d = rng.normal(size=(B, 4, 3)).astype(np.float32)
  factor = DenseFactor(jnp.asarray(a), jnp.asarray(d), (5, 3), jnp.float32)
  got, _ = tx.update({"w": factor}, state, mask=mask, example_weights=np.nan_to_num(weights))
  want = weighted_mean_numpy(np.einsum("btk,btl->bkl", a, d), mask, np.nan_to_num(weights))
  np.testing.assert_allclose(got["w"], want, rtol=1e-5, atol=1e-6)


def test_a_batch_split_over_devices_gives_the_global_weighted_mean():
  devices = 4
  if jax.device_count() < devices:
    pytest.skip("needs 4 host devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  grads, mask, weights = example_inputs()
  tx = optimizers.weighted_mean_aggregate(axis_name="batch")
  split = lambda x: jnp.asarray(x).reshape(devices, B // devices, *x.shape[1:])

  def update(g, m, s):
    return tx.update({"w": g}, tx.init(None), mask=m, example_weights=s)[0]

  got = jax.pmap(update, axis_name="batch")(split(grads), split(mask), split(weights))
  want = weighted_mean_numpy(np.nan_to_num(grads), mask, np.nan_to_num(weights))
  for device in range(devices):
    np.testing.assert_allclose(got["w"][device], want, rtol=1e-5, atol=1e-6)


def test_uniform_weights_make_weighted_mean_adamw_the_adamw_step():
  config = default.get_config()
  config.optimizer.learning_rate = 1e-3
  params = {"dense": {"kernel": jnp.ones((5, 3)), "bias": jnp.zeros(3)}}
  per_example = jax.tree.map(
      lambda x: jax.random.normal(jax.random.key(x.size), (B,) + x.shape), params
  )
  config.optimizer.name = "weighted_mean_adamw"
  tx, takes_per_example = optimizers.create_optimizer(config, num_steps=10, axis_name=None)
  config.optimizer.name = "adamw"
  reference, _ = optimizers.create_optimizer(config, num_steps=10, axis_name=None)
  assert takes_per_example
  mean = jax.tree.map(lambda g: g.mean(axis=0), per_example)
  states = tx.init(params), reference.init(params)
  for _ in range(3):
    got, state = tx.update(per_example, states[0], params)
    want, reference_state = reference.update(mean, states[1], params)
    states = state, reference_state
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-9)


def test_filter_settings_are_refused_without_a_filter():
  config = default.get_config()
  config.optimizer.name = "weighted_mean_adamw"
  config.optimizer.sketch_dim = 64
  with pytest.raises(ValueError, match="weighted_mean_adamw"):
    optimizers.create_optimizer(config, num_steps=10, axis_name=None)


def test_weighted_mean_adamw_trains_with_ief_weights(tmp_path):
  """The ablation end to end on the tiny model: factored per-example gradients, the iEF
  weights from the loss, the weighted mean over the batch split across the test's host
  devices (shard_map), AdamW."""
  from nearprox.training import train
  from tests.tiny_sst2 import tiny_config, write_sst2

  config = tiny_config(
      write_sst2(tmp_path / "glue"),
      **{
          "optimizer.name": "weighted_mean_adamw",
          "optimizer.weighting": "ief",
          "optimizer.learning_rate": 1e-3,
          "num_train_steps": 2,
          "checkpoint_every": 10,
      },
  )
  report = train.train_and_evaluate(config, tmp_path / "work")
  assert report["steps"] == 2 and 0.0 <= report["dev"]["accuracy"] <= 1.0
