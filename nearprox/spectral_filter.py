"""Gram matrices of per-example gradients, and the spectral filters applied to them.

A batch's per-example gradients g_1 … g_B (rows of G, B × P) enter here in one of two forms,
leaf by leaf of the parameter pytree:

* **dense**: an array with a leading batch axis, ``[B, *param_shape]`` (what
  ``jax.vmap(jax.grad(...))`` returns);
* **factored**: a :class:`PerExampleFactor`, which knows how to take inner products between
  its per-example gradients and how to sum them with coefficients, without materializing
  them (e.g. a dense layer's inputs a_i and output cotangents δ_i, g_i = a_iᵀ δ_i).

Every array inside either form has the batch axis first, so masking, slicing and
``all_gather`` act on examples uniformly.

With the Gram matrix K = G Gᵀ (the empirical NTK of the per-example loss), weights
w = m / Σm and damping λ, the filters of DESIGN.md §1 are

    tikhonov:  c = K (K + λI)⁻¹ w        (σ/(σ+λ) per eigen-direction)
    natural:   c = λ (K + λI)⁻¹ w        (λ/(σ+λ) per eigen-direction)

and the filtered gradient is d = Gᵀ c. ``c_tikhonov + c_natural = w``, so the two filtered
gradients add up to the plain mean gradient g = Gᵀ w.
"""

from __future__ import annotations

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

FILTERS = ("tikhonov", "natural")
DAMPING_MODES = ("absolute", "relative")

_HIGHEST = jax.lax.Precision.HIGHEST


class PerExampleFactor(abc.ABC):
  """A per-example gradient leaf in factored form: stands where one params leaf stands.

  Subclasses are registered pytrees whose array children all have the batch axis first.
  They implement the two operations the filter needs, both in float32 or wider.
  """

  @abc.abstractmethod
  def gram(self, other: PerExampleFactor) -> jax.Array:
    """Inner products ⟨g_i, g'_j⟩ between self's and other's examples: [B_self, B_other]."""

  @abc.abstractmethod
  def combine(self, coeffs: jax.Array) -> jax.Array:
    """Σ_i coeffs_i g_i, with the shape and dtype of the parameter leaf."""


def is_factor(x: Any) -> bool:
  return isinstance(x, PerExampleFactor)


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or wider when the gradients already are (float64 under jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def per_example_leaves(per_example_grads) -> list[tuple[str, Any]]:
  """(path, leaf) pairs, where a leaf is a dense array or a PerExampleFactor."""
  with_path, _ = jax.tree_util.tree_flatten_with_path(per_example_grads, is_leaf=is_factor)
  return [(jax.tree_util.keystr(path), leaf) for path, leaf in with_path]


def batch_size(per_example_grads) -> int:
  """The common leading (batch) axis of every array; ValueError naming the leaf otherwise."""
  sizes = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(per_example_grads)[0]:
    name = jax.tree_util.keystr(path) or "<root>"
    if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
      raise ValueError(
          f"per-example gradient leaf {name} is a scalar; every leaf needs a leading batch "
          "axis (pass per-example gradients, e.g. from nearprox.per_example_grads)"
      )
    sizes.setdefault(leaf.shape[0], name)
  if not sizes:
    raise ValueError("per-example gradients are an empty pytree")
  if len(sizes) > 1:
    detail = ", ".join(f"{name}: {size}" for size, name in sizes.items())
    raise ValueError(f"per-example gradient leaves have different leading (batch) axes: {detail}")
  return next(iter(sizes))


def zero_masked_examples(per_example_grads, mask: jax.Array):
  """Zeroes every array's rows of masked examples, so nothing in them (NaN included) leaks."""

  def zero(x):
    keep = (mask > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))

  return jax.tree.map(zero, per_example_grads)


def _dense_gram(x: jax.Array, y: jax.Array) -> jax.Array:
  dtype = compute_dtype(x.dtype)
  x2 = x.reshape(x.shape[0], -1).astype(dtype)
  y2 = y.reshape(y.shape[0], -1).astype(dtype)
  return jnp.matmul(x2, y2.T, precision=_HIGHEST)


def _dense_combine(x: jax.Array, coeffs: jax.Array) -> jax.Array:
  dtype = compute_dtype(x.dtype)
  out = jnp.tensordot(coeffs.astype(dtype), x.astype(dtype), axes=1, precision=_HIGHEST)
  return out.astype(x.dtype)


def gram_matrix(per_example_grads, other=None) -> jax.Array:
  """K_ij = Σ_leaves ⟨g_i, g'_j⟩ over the pytree; ``other`` defaults to the same examples."""
  other = per_example_grads if other is None else other
  pairs = zip(per_example_leaves(per_example_grads), per_example_leaves(other))
  total = None
  for (_, x), (_, y) in pairs:
    k = x.gram(y) if is_factor(x) else _dense_gram(x, y)
    total = k if total is None else total + k.astype(jnp.promote_types(total.dtype, k.dtype))
  return total


def combine(per_example_grads, coeffs: jax.Array):
  """Σ_i coeffs_i g_i for every leaf: a pytree with the parameters' shapes."""
  return jax.tree.map(
      lambda x: x.combine(coeffs) if is_factor(x) else _dense_combine(x, coeffs),
      per_example_grads,
      is_leaf=is_factor,
  )


class FilterStats(NamedTuple):
  """What one filtered step did, for logging (all scalars).

  damping: the λ used (after the relative scaling).
  gram_trace: trace(K) over unmasked examples = Σ_i ‖g_i‖².
  effective_rank: participation ratio (Σσ)²/Σσ² of K's spectrum, in [1, B_eff].
  kept_fraction: ‖d‖² / ‖g‖², how much of the mean gradient's squared norm the filter kept.
  """

  damping: jax.Array
  gram_trace: jax.Array
  effective_rank: jax.Array
  kept_fraction: jax.Array


def filter_coefficients(
    gram: jax.Array,
    mask: jax.Array,
    damping,
    filter: str = "tikhonov",
    damping_mode: str = "absolute",
) -> tuple[jax.Array, FilterStats]:
  """The example weights c = f(K) w of DESIGN.md §1, and statistics of the solve.

  Args:
    gram: K, [B, B], any float dtype (solved in float32 or wider).
    mask: [B]; examples with mask ≤ 0 are removed from the solve and get c_i = 0.
    damping: λ > 0 (absolute), or the factor of trace(K)/B_eff (relative).
    filter: "tikhonov" (K(K+λI)⁻¹) or "natural" (λ(K+λI)⁻¹).
    damping_mode: "absolute" or "relative".

  K is symmetrized and eigendecomposed (never inverted): c = U h(σ) Uᵀ w with
  h = σ/(σ+λ) or λ/(σ+λ); tiny negative eigenvalues from rounding are clipped to 0.
  """
  dtype = compute_dtype(gram.dtype)
  keep = (mask > 0).astype(dtype)
  num_kept = jnp.sum(keep)
  weights = keep / jnp.maximum(num_kept, 1.0)
  gram = gram.astype(dtype)
  pair_kept = (keep[:, None] * keep[None, :]) > 0
  gram = jnp.where(pair_kept, 0.5 * (gram + gram.T), 0.0)
  trace = jnp.trace(gram)
  if damping_mode == "relative":
    damping = damping * trace / jnp.maximum(num_kept, 1.0)
  # λ = 0 only when every gradient is 0 (relative mode); then d = 0 whatever c is.
  damping = jnp.maximum(jnp.asarray(damping, dtype), jnp.finfo(dtype).tiny)
  # Masked examples become decoupled unit-scale directions (w_i = 0 there, so c_i = 0).
  pad_scale = jnp.where(trace > 0, trace / jnp.maximum(num_kept, 1.0), 1.0)
  solve_matrix = gram + jnp.diag((1.0 - keep) * pad_scale)
  sigma, vectors = jnp.linalg.eigh(solve_matrix)
  sigma = jnp.maximum(sigma, 0.0)
  if filter == "tikhonov":
    response = sigma / (sigma + damping)
  elif filter == "natural":
    response = damping / (sigma + damping)
  else:
    raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
  projected = jnp.matmul(vectors.T, weights, precision=_HIGHEST)
  coeffs = jnp.matmul(vectors, response * projected, precision=_HIGHEST) * keep

  mean_sq_norm = weights @ jnp.matmul(gram, weights, precision=_HIGHEST)
  kept_sq_norm = coeffs @ jnp.matmul(gram, coeffs, precision=_HIGHEST)
  frob_sq = jnp.sum(gram * gram)
  stats = FilterStats(
      damping=damping,
      gram_trace=trace,
      effective_rank=jnp.where(frob_sq > 0, trace**2 / frob_sq, 0.0),
      kept_fraction=jnp.where(mean_sq_norm > 0, kept_sq_norm / mean_sq_norm, 0.0),
  )
  return coeffs, stats
