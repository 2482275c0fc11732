"""Sketched Gram matrices: K estimated from random features of the per-example gradients.

``scale_by_proximal(..., sketch_dim=k)`` replaces the exact contribution of every costly
leaf to K = G Gᵀ by Φ Φᵀ, where Φ ∈ ℝ^{B×k'} (k' ≈ k) are random features of that leaf's
per-example gradients (docs/method.md §2.9 has the derivations):

* a leaf's per-example gradient is viewed as a matrix G_i ∈ ℝ^{m×n} (a dense kernel's
  d_in × d_out gradient a_iᵀδ_i; a dense array leaf [B, m, *rest] as m × prod(rest));
* its features are the **Kronecker sketch** Φ_i = S₁ᵀ G_i S₂ ∈ ℝ^{k₁×k₂}, flattened, with
  independent Rademacher matrices S₁ ∈ ℝ^{m×k₁}, S₂ ∈ ℝ^{n×k₂} (entries ±1/√k₁, ±1/√k₂;
  a side with k₁ = m or k₂ = n is not sketched: S = I). For a dense kernel
  Φ_i = Σ_t (S₁ᵀa_it)(S₂ᵀδ_it)ᵀ = (A_iS₁)ᵀ(Δ_iS₂): B·T·(d_in·k₁ + d_out·k₂ + k₁·k₂)
  multiply-adds, and the per-example kernel gradients are never formed;
* ⟨Φ_i, Φ_j⟩ = tr(G_iᵀ S₁S₁ᵀ G_j S₂S₂ᵀ) is an unbiased estimate of ⟨G_i, G_j⟩ (E[SSᵀ] = I),
  with variance at most
  K_ii·K_jj·(2/k₁ + 2/k₂ + 4/(k₁k₂)) (the exact Gaussian formula is in docs/method.md §2.9;
  Rademacher entries give at most the Gaussian variance); sides with S = I drop their
  terms. Leaves are sketched independently, so E‖K̂ − K‖²_F ≤ Σ_leaves c_leaf·tr(K_leaf)²
  with c_leaf = 2/k₁ + 2/k₂ + 4/(k₁k₂) (:func:`variance_factor`). K̂ stays positive
  semi-definite (a sum of Gram matrices).

Which leaves: a leaf is sketched only when its sketch costs fewer multiply-adds than its exact
Gram (for a dense kernel, counting the combine of either path too; :func:`dense_sketch_cost`,
:func:`array_sketch_cost`), a static choice like the ghost/materialize switch. Biases, norms
and embedding tables always keep their exact Gram, and so do small layers (a pooler or
classifier applied once per example) unless k is small. Only the coefficients c are
estimated: the filtered gradient is still formed from the exact factors (Aᵀ(c∘Δ)). K̂ is
unbiased, but ĉ = f(K̂)w and d̂ = Gᵀĉ are not (f is nonlinear); ‖d̂‖ is estimated as
√(ĉᵀK̂ĉ), so ``max_update_norm`` bounds an estimate, and the step-size rules and the logged
statistics are computed from K̂ too (docs/method.md §2.9).

Seeds: the matrices of leaf number ``index`` (in the pytree's flattening order) at step
``count`` come from ``fold_in(fold_in(key(SKETCH_SEED), count), index)``: fresh every step,
reproducible, and the same on every device, so with ``gram="global"`` the gathered rows of Φ
are sketches of the concatenated batch with one set of matrices.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nearprox import base, spectral_filter

SKETCH_SEED = 0x5EED

_HIGHEST = jax.lax.Precision.HIGHEST


def check_sketch_dim(sketch_dim) -> int | None:
  """``sketch_dim`` as an int ≥ 1, or None for the exact Gram (None or 0); ValueError otherwise."""
  if isinstance(sketch_dim, bool) or not isinstance(sketch_dim, (int, np.integer, type(None))):
    raise ValueError(f"sketch_dim must be None, 0 or a positive int, got {sketch_dim!r}")
  if sketch_dim is None or sketch_dim == 0:
    return None
  if sketch_dim < 0:
    raise ValueError(f"sketch_dim must be None, 0 or a positive int, got {sketch_dim!r}")
  return int(sketch_dim)


def step_key(count: jax.Array) -> jax.Array:
  """The sketch key of step ``count`` (the transformation's step count)."""
  return jax.random.fold_in(jax.random.key(SKETCH_SEED), count)


def side_dims(rows: int, cols: int, sketch_dim: int) -> tuple[int, int]:
  """(k₁, k₂) for an m × n gradient: k₁ ≈ k₂ ≈ √k, k₁k₂ ≥ k, capped at (m, n).

  A balanced split minimizes the variance factor 2/k₁ + 2/k₂ for k₁k₂ = k; a capped side is
  not sketched (S = I), and the other side takes what is left of k.
  """
  k1 = min(rows, math.isqrt(sketch_dim - 1) + 1)  # ⌈√k⌉
  k2 = min(cols, -(-sketch_dim // k1))
  k1 = min(rows, -(-sketch_dim // k2))
  return k1, k2


def variance_factor(rows: int, cols: int, k1: int, k2: int) -> float:
  """c with Var K̂_ij ≤ c·K_ii·K_jj for an m × n leaf sketched to k₁ × k₂ (docs/method.md §2.9)."""
  inv1 = 0.0 if k1 >= rows else 1.0 / k1
  inv2 = 0.0 if k2 >= cols else 1.0 / k2
  return 2.0 * inv1 + 2.0 * inv2 + 4.0 * inv1 * inv2


def projection(key: jax.Array, dim: int, k: int, dtype) -> jax.Array | None:
  """S ∈ ℝ^{dim×k} with i.i.d. ±1/√k entries, or None (S = I) when k ≥ dim."""
  if k >= dim:
    return None
  return jax.random.rademacher(key, (dim, k), dtype) * jnp.asarray(1.0 / math.sqrt(k), dtype)


def _project(x: jax.Array, matrix: jax.Array | None) -> jax.Array:
  if matrix is None:
    return x
  return jnp.matmul(x, matrix, precision=_HIGHEST)


def kronecker_features(
    inputs: jax.Array, cotangents: jax.Array, key: jax.Array, k1: int, k2: int
) -> jax.Array:
  """Φ [B, k₁·k₂]: the Kronecker sketch Σ_t (S₁ᵀa_it)(S₂ᵀδ_it)ᵀ of g_i = a_iᵀδ_i.

  ``inputs`` [B, T, d_in], ``cotangents`` [B, T, d_out]; computed in float32 or wider.
  """
  dtype = base.compute_dtype(cotangents.dtype)
  left = projection(jax.random.fold_in(key, 0), inputs.shape[-1], k1, dtype)
  right = projection(jax.random.fold_in(key, 1), cotangents.shape[-1], k2, dtype)
  x = _project(inputs.astype(dtype), left)
  y = _project(cotangents.astype(dtype), right)
  features = jnp.einsum("btr,bts->brs", x, y, precision=_HIGHEST)
  return features.reshape(features.shape[0], -1)


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
  """(m, n): a dense leaf's per-example gradient [*shape] read as an m × n matrix (first axis
  against the rest; a vector is m × 1)."""
  if not shape:
    return 1, 1
  return int(shape[0]), int(np.prod(shape[1:], dtype=np.int64))


def array_features(x: jax.Array, key: jax.Array, k1: int, k2: int) -> jax.Array:
  """Φ [B, k₁·k₂]: S₁ᵀ X_i S₂ of a dense per-example leaf x [B, *shape] (matrix view)."""
  rows, cols = matrix_view(x.shape[1:])
  dtype = base.compute_dtype(x.dtype)
  left = projection(jax.random.fold_in(key, 0), rows, k1, dtype)
  right = projection(jax.random.fold_in(key, 1), cols, k2, dtype)
  mat = x.astype(dtype).reshape(x.shape[0], rows, cols)
  right_first, _ = _array_projection_order(rows, cols, k1, k2)
  if right_first:
    mat = _project(mat, right)
    mat = mat if left is None else jnp.einsum("bmn,mr->brn", mat, left, precision=_HIGHEST)
  else:
    mat = mat if left is None else jnp.einsum("bmn,mr->brn", mat, left, precision=_HIGHEST)
    mat = _project(mat, right)
  return mat.reshape(x.shape[0], -1)


def dense_sketch_cost(batch: int, length: int, d_in: int, d_out: int, k1: int, k2: int) -> int:
  """Multiply-adds of a dense kernel's sketched Gram: B·T·(d_in·k₁ + d_out·k₂ + k₁k₂) + B²k₁k₂
  (a side that is not sketched costs nothing to project)."""
  project = (d_in * k1 if k1 < d_in else 0) + (d_out * k2 if k2 < d_out else 0)
  return batch * length * (project + k1 * k2) + batch * batch * k1 * k2


def _array_projection_order(rows: int, cols: int, k1: int, k2: int) -> tuple[bool, int]:
  """(whether X S₂ goes first, multiply-adds per example of S₁ᵀ X S₂ in that order)."""
  right = rows * cols * k2 if k2 < cols else 0
  then_left = rows * min(k2, cols) * k1 if k1 < rows else 0
  left = rows * cols * k1 if k1 < rows else 0
  then_right = min(k1, rows) * cols * k2 if k2 < cols else 0
  if right + then_left <= left + then_right:
    return True, right + then_left
  return False, left + then_right


def array_sketch_cost(batch: int, rows: int, cols: int, k1: int, k2: int) -> int:
  """Multiply-adds of a dense leaf's sketched Gram, against B²·m·n for its exact Gram."""
  return batch * _array_projection_order(rows, cols, k1, k2)[1] + batch * batch * k1 * k2


def array_features_or_none(x: jax.Array, key: jax.Array, sketch_dim: int, batch: int):
  """Φ of a dense per-example leaf when sketching it is cheaper than its exact Gram, else None."""
  rows, cols = matrix_view(x.shape[1:])
  k1, k2 = side_dims(rows, cols, sketch_dim)
  if k1 >= rows and k2 >= cols:
    return None  # the "sketch" would be the gradient itself
  if array_sketch_cost(batch, rows, cols, k1, k2) >= batch * batch * rows * cols:
    return None
  return array_features(x, key, k1, k2)


class Sketched(NamedTuple):
  """A per-example pytree split for the estimated Gram.

  Attributes:
    features: Φ [B, F], the sketches of the sketched leaves side by side, in the units 2^-e
      (None if no leaf is sketched), so that their part of 4^-e K is Φ Φᵀ.
    exact: the leaves whose Gram stays exact (a list; factors or dense arrays).
    exact_exponents: their exponents e_l (:class:`nearprox.spectral_filter.Rescaled`; 0 for
      a plain pytree).
    exponent: e, the largest exponent of all leaves (0 for a plain pytree).
    for_combine: the per-example pytree to combine with c: the input, except that sketched
      dense kernels use the factored combine Aᵀ(c∘Δ) (their per-example gradients, which a
      "materialized" combine would reuse, are not formed).
    sketched: one bool per leaf (flattening order), for inspection and tests.
  """

  features: jax.Array | None
  exact: list
  exact_exponents: list
  exponent: jax.Array
  for_combine: object
  sketched: tuple[bool, ...]


def sketch_per_example(
    per_example_grads, count: jax.Array, sketch_dim: int, batch: int | None = None
):
  """Splits ``per_example_grads`` into sketched features and exactly handled leaves.

  Args:
    per_example_grads: a per-example pytree (dense leaves and/or factors), or a
      :class:`nearprox.spectral_filter.Rescaled` one: then each sketched leaf's features are
      brought to the common units 2^-e and the exact leaves keep their own exponents.
    count: the step count; the sketch matrices are drawn from :func:`step_key` (count) and
      each leaf's index, the same on every device.
    sketch_dim: k, the number of features per sketched leaf (k₁k₂ ≥ k, :func:`side_dims`).
    batch: the batch size the exact-or-sketch costs are computed for (default: the leaves'
      batch axis). ``gram="global"`` passes the global batch so that every device, and a
      single device holding the concatenated batch, make the same choices.

  Returns:
    :class:`Sketched`.
  """
  rescaled = per_example_grads
  if not isinstance(rescaled, spectral_filter.Rescaled):
    leaves, treedef = jax.tree.flatten(per_example_grads, is_leaf=base.is_factor)
    rescaled = spectral_filter.Rescaled(leaves, [jnp.zeros((), jnp.int32)] * len(leaves), treedef)
  batch = spectral_filter.batch_size(rescaled.leaves) if batch is None else batch
  key = step_key(count)
  features, exact, exact_exponents, combined, flags = [], [], [], [], []
  for index, (leaf, exponent) in enumerate(zip(rescaled.leaves, rescaled.exponents)):
    leaf_key = jax.random.fold_in(key, index)
    if base.is_factor(leaf):
      phi = leaf.sketch(leaf_key, sketch_dim, batch)
    else:
      phi = array_features_or_none(leaf, leaf_key, sketch_dim, batch)
    flags.append(phi is not None)
    if phi is None:
      exact.append(leaf)
      exact_exponents.append(exponent)
      combined.append(leaf)
    else:
      features.append(base.times_power_of_two(phi, exponent - rescaled.exponent))
      combined.append(leaf.for_sketched_combine() if base.is_factor(leaf) else leaf)
  phi = None
  if features:
    dtype = jnp.result_type(*features)
    phi = jnp.concatenate([f.astype(dtype) for f in features], axis=1)
  return Sketched(
      phi,
      exact,
      exact_exponents,
      rescaled.exponent,
      jax.tree.unflatten(rescaled.treedef, combined),
      tuple(flags),
  )


def estimated_gram(sketched: Sketched, other: Sketched | None = None) -> jax.Array:
  """4^-e K̂ = (exact Gram of the exact leaves) + Φ Φ'ᵀ, between ``sketched`` and ``other``'s
  examples (default: the same; in the same units)."""
  other = sketched if other is None else other
  total = None
  if sketched.exact:
    total = spectral_filter.rescaled_gram(
        sketched.exact, sketched.exact_exponents, other.exact, sketched.exponent
    )
  if sketched.features is not None:
    part = jnp.matmul(sketched.features, other.features.T, precision=_HIGHEST)
    total = part if total is None else total + part.astype(total.dtype)
  if total is None:
    raise ValueError("per-example gradients are an empty pytree")
  return total


def sketched_leaves(
    per_example_grads, sketch_dim: int, batch: int | None = None
) -> dict[str, bool]:
  """Which leaves (by path) ``sketch_dim`` sketches, from shapes only."""
  flags = []

  def run(g):
    flags.append(sketch_per_example(g, jnp.zeros((), jnp.int32), sketch_dim, batch).sketched)
    return 0

  jax.eval_shape(run, per_example_grads)
  paths = [path for path, _ in spectral_filter.per_example_leaves(per_example_grads)]
  return dict(zip(paths, flags[0]))


def variance_factors(per_example_grads, sketch_dim: int, batch: int | None = None) -> list:
  """Per leaf (flattening order): c of :func:`variance_factor` if ``sketch_dim`` sketches it,
  else None; E‖K̂ − K‖²_F ≤ Σ c·tr(K_leaf)² over the sketched leaves (docs/method.md §2.9)."""
  flags = list(sketched_leaves(per_example_grads, sketch_dim, batch).values())
  factors = []
  for (_, leaf), sketched in zip(spectral_filter.per_example_leaves(per_example_grads), flags):
    if not sketched:
      factors.append(None)
      continue
    rows, cols = leaf.matrix_shape if base.is_factor(leaf) else matrix_view(leaf.shape[1:])
    factors.append(variance_factor(rows, cols, *side_dims(rows, cols, sketch_dim)))
  return factors
