"""Random per-example gradient pytrees and their flattening, for the NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"dense/kernel": (3, 4), "dense/bias": (4,), "embed": (5, 2, 3), "scale": (1,)}


def random_per_example(batch, seed=0, dtypes=None, scale=1.0):
  """{name: [batch, *shape]} standard normal (times ``scale``), float32 unless ``dtypes``
  names another dtype for a leaf."""
  rng = np.random.default_rng(seed)
  dtypes = dtypes or {}
  return {
      name: jnp.asarray(scale * rng.normal(size=(batch,) + shape), dtypes.get(name, jnp.float32))
      for name, shape in SHAPES.items()
  }


def flat_rows(per_example):
  """[B, P] float64: row i is example i's gradient, leaves concatenated."""
  leaves = jax.tree.leaves(per_example)
  return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def flat(tree):
  """[P] float64: the leaves of ``tree`` concatenated."""
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])
