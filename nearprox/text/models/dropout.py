"""Per-example dropout: example i's masks come from example i's own key, in one batched pass.

Why. Per-example keys make example i's randomness a function of (seed, step, example id)
only, so any split of a batch over devices or hosts gives the same numbers, and a batch of
one reproduces its row. Flax's ``nn.Dropout`` draws one mask for the whole batch from one
``"dropout"`` rng, so the models used to get per-example masks by vmapping the whole model
over examples (each a batch of one with its own rng). The factored per-example gradients
(:mod:`nearprox.factored_grads`) cannot see layers inside a vmap, so every parameter then
took the exact fallback (B backward passes). :class:`ExampleDropout` instead vmaps only the
mask generation over the keys: the model runs once on the whole batch and its layers keep
the batch axis first.

The mask. For a site with id s (a stable hash of the module's path), rate p and example i
with key k_i, on an input x of shape [B, *shape]:

    m_i = bernoulli(fold_in(k_i, s), 1 − p, shape),   y_i = m_i ⊙ x_i / (1 − p)

(inverted dropout, like ``nn.Dropout``: E[y_i] = x_i). m_i depends only on (k_i, s, shape),
so example i's masks do not depend on the other examples nor on the batch size, and the
sites of one model draw independent masks from one key. ``fold_in`` keeps the key space of
each site disjoint from the caller's other uses of k_i (jax.random's derivation is a
pseudo-random function of (key, data)).

Site ids are CRC-32 of the module path ("encoder/layer_0/ExampleDropout_1"): deterministic
across traces and processes (unlike Python's ``hash``), the same whether the model runs on a
batch or on one example, and distinct within the models here (the tests check it; two paths
of one model collide with probability about n²/2³³ for n sites).
"""

from __future__ import annotations

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def check_dropout_keys(dropout_keys, batch: int, deterministic: bool, where: str) -> None:
  """Raises ValueError unless the keys fit: needed (with leading size ``batch``) iff dropout.

  ``dropout_keys``: typed keys [B] or raw uint32 keys [B, 2]; ignored when deterministic.
  """
  if deterministic:
    return
  if dropout_keys is None:
    raise ValueError(
        f"{where}(deterministic=False) needs per-example dropout keys dropout_keys [B] "
        "(one jax.random key per example)"
    )
  if dropout_keys.ndim < 1 or dropout_keys.shape[0] != batch:
    raise ValueError(
        f"{where}: dropout_keys has shape {dropout_keys.shape}; it needs one key per example "
        f"(leading size {batch})"
    )


def site_id(path: tuple[str, ...]) -> int:
  """The 32-bit id of the dropout site at module ``path``: CRC-32 of "a/b/c"."""
  return zlib.crc32("/".join(path).encode("utf-8"))


def example_masks(keys, site: int, keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """[B, *shape] bool: row i = bernoulli(fold_in(keys[i], site), keep_prob, shape)."""
  data = np.uint32(site)
  draw = lambda key: jax.random.bernoulli(jax.random.fold_in(key, data), keep_prob, shape)
  return jax.vmap(draw)(keys)


class ExampleDropout(nn.Module):
  """Inverted dropout with a mask per example from its own key (module docstring).

  ``__call__(x [B, ...], keys [B], deterministic)``: identity when ``deterministic`` or
  ``rate == 0``; otherwise keys must be one key per example (typed [B] or raw [B, 2]).
  """

  rate: float

  @property
  def site_id(self) -> int:
    return site_id(self.path)

  @nn.compact
  def __call__(self, x: jax.Array, keys, deterministic: bool) -> jax.Array:
    if not 0.0 <= self.rate < 1.0:
      raise ValueError(f"ExampleDropout rate must be in [0, 1), got {self.rate}")
    if deterministic or self.rate == 0.0:
      return x
    check_dropout_keys(keys, x.shape[0], deterministic, "ExampleDropout")
    keep_prob = 1.0 - self.rate
    mask = example_masks(keys, self.site_id, keep_prob, x.shape[1:])
    return jnp.where(mask, x / jnp.asarray(keep_prob, x.dtype), jnp.zeros((), x.dtype))
