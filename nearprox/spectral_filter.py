"""Gram matrices of per-example gradients, and the spectral filters applied to them.

A batch's per-example gradients g_1 … g_B (rows of G, B × P) enter here in one of two forms,
leaf by leaf of the parameter pytree:

* **dense**: an array with a leading batch axis, ``[B, *param_shape]`` (what
  ``jax.vmap(jax.grad(...))`` returns);
* **factored**: a :class:`nearprox.base.PerExampleFactor`, which knows how to take inner
  products between its per-example gradients and how to sum them with coefficients, without
  materializing them (e.g. a dense layer's inputs a_i and output cotangents δ_i,
  g_i = a_iᵀ δ_i).

Every array inside either form has the batch axis first, so masking, slicing and
``all_gather`` act on examples uniformly. A factor may also offer random features whose Gram
estimates its own (:meth:`~nearprox.base.PerExampleFactor.sketch`, used by
``scale_by_proximal(sketch_dim=k)`` through :mod:`nearprox.sketch`). :func:`rescale_leaves`
divides every leaf by a power of two so that K can be formed at any scale of the loss.

With the Gram matrix K = G Gᵀ (the empirical NTK of the per-example loss), mask m, optional
example weights s ≥ 0, right-hand side w = m∘s / Σ m∘s (w = m / Σm without weights) and
damping λ, the filters of ``docs/method.md`` are

    tikhonov:  c = K (K + λI)⁻¹ w        (σ/(σ+λ) per eigen-direction)
    natural:   c = λ (K + λI)⁻¹ w        (λ/(σ+λ) per eigen-direction)

and the filtered gradient is d = Gᵀ c. ``c_tikhonov + c_natural = w``, so the two filtered
gradients add up to the weighted mean gradient Gᵀ w (the plain mean g = Gᵀ u, u = m / Σm,
without weights).

That normalization of the right-hand side is ``weight_normalization="sum"``. The natural
filter also takes ``"damping"``, w = m∘s / λ, for which c = (K + λI)⁻¹ (m∘s): the unnormalized
step of Wu et al. (2024, eq. 8 and Algorithm 1; eq. 5, the EF step, without weights). The
two differ by the scalar λ / Σ m∘s (:attr:`FilterStats.normalization_ratio`):
c_sum = (λ / Σ m∘s) · c_damping (docs/method.md §1.4).

Everything a step-size rule needs is a quadratic form in K (:func:`step_scale`), so no
extra pass over the model is needed: ‖g‖² = uᵀKu, ‖d‖² = cᵀKc, gᵀd = uᵀKc and, with the
empirical Fisher F = GᵀG / B_eff (B_eff unmasked examples), dᵀFd = cᵀK²c / B_eff.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from nearprox import base
from nearprox.base import compute_dtype, is_factor

FILTERS = ("tikhonov", "natural")
DAMPING_MODES = ("absolute", "relative")
STEP_SIZES = ("none", "graft", "quadratic")
# How the right-hand side m∘s is normalized: by its sum (a weighted mean) or by the damping λ
# (Wu et al.'s eq. 8 step; natural filter only).
WEIGHT_NORMALIZATIONS = ("sum", "damping")

_HIGHEST = jax.lax.Precision.HIGHEST


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


class Rescaled(NamedTuple):
  """Per-example gradients with every leaf l divided by 2^{e_l}, a power of two near its own
  largest entry, so that no product of two of them overflows or underflows float32 whatever
  the scale of the loss (docs/method.md §1.7). Exact: only exponents change.

  Attributes:
    leaves: 2^-e_l · g_i for every leaf (the flattening order; arrays or factors).
    exponents: e_l, int32 scalars, one per leaf.
    treedef: the per-example pytree's structure.
  """

  leaves: list
  exponents: list
  treedef: Any

  @property
  def exponent(self) -> jax.Array:
    """e = max_l e_l: the units of :func:`rescaled_gram`, K = 4^e K̃."""
    return largest_exponent(self.exponents)


def largest_exponent(exponents: list) -> jax.Array:
  """max_l e_l of the leaves' exponents, as the last entry of their sorted vector.

  A sort, not ``jnp.max``, for the compile time: XLA rewrites the max of stacked scalars into
  a chain of scalar maxima, an elementwise computation that its fusion pass then copies, with
  every leaf's exponent computation behind it (log2_max_abs: frexp and clip), into each of its
  consumers (every leaf's Gram term, sketch features and combine). That made the optimized
  program quadratic in the number of leaves: 167,526 HLO lines for the 65 leaves of a 1 + 1
  layer encoder-decoder, 40,227 with the sort, and most of the compile time of the factored
  step of larger models. A sort is not fused into its consumers (and XLA's
  optimization_barrier is removed before fusion on CPU), so the exponents are computed once.
  Same value, exactly.
  """
  return jnp.sort(jnp.stack(exponents))[-1]


def rescale_leaves(per_example_grads, axis_name: str | None = None) -> Rescaled:
  """:class:`Rescaled` per-example gradients. e_l is the leaf's
  :func:`~nearprox.base.log2_max_abs` (a factor's
  :meth:`~nearprox.base.PerExampleFactor.log2_scale`), clipped so that 2^±e_l is a normal
  number, and the largest over ``axis_name``'s devices when it is given (so that every
  device's leaves are in the same units). Each leaf depends on its own exponent only, which
  lets XLA scale it where it is formed."""
  leaves, treedef = jax.tree.flatten(per_example_grads, is_leaf=is_factor)
  lo, hi = base.exponent_range(jnp.result_type(*jax.tree.leaves(per_example_grads)))
  scaled, exponents = [], []
  for leaf in leaves:
    exponent = leaf.log2_scale() if is_factor(leaf) else base.log2_max_abs(leaf)
    exponent = jnp.clip(exponent, lo, hi)
    if axis_name is not None:
      exponent = jax.lax.pmax(exponent, axis_name)
    if is_factor(leaf):
      scaled.append(leaf.rescale(-exponent))
    else:
      scaled.append(base.times_power_of_two(leaf, -exponent).astype(leaf.dtype))
    exponents.append(exponent)
  return Rescaled(scaled, exponents, treedef)


def rescaled_gram(
    leaves: list, exponents: list, other: list | None = None, exponent: jax.Array | None = None
) -> jax.Array:
  """K̃ = 4^-e K between rescaled ``leaves`` (with ``exponents``) and ``other`` (default: the
  same; in the same units), e = ``exponent`` (default: the largest e_l). Each leaf's part is
  formed from its rescaled gradients and brought to 4^-e by a power of two; a leaf 2^64 times
  smaller than the largest underflows there, below float32's precision of K anyway."""
  other = leaves if other is None else other
  exponent = largest_exponent(exponents) if exponent is None else exponent
  total = None
  for x, y, leaf_exponent in zip(leaves, other, exponents):
    k = base.times_power_of_two(gram_matrix([x], [y]), 2 * (leaf_exponent - exponent))
    total = k if total is None else total + k.astype(jnp.promote_types(total.dtype, k.dtype))
  return total


def rescaled_combine(rescaled: Rescaled, coeffs: jax.Array, exponent: jax.Array):
  """Σ_i coeffs_i · 2^exponent · g_i for every leaf (the parameters' shapes), from the
  rescaled leaves: leaf l takes the coefficients 2^(exponent + e_l) · coeffs."""
  out = []
  for leaf, leaf_exponent in zip(rescaled.leaves, rescaled.exponents):
    leaf_coeffs = base.times_power_of_two(coeffs, exponent + leaf_exponent)
    out.append(leaf.combine(leaf_coeffs) if is_factor(leaf) else _dense_combine(leaf, leaf_coeffs))
  return jax.tree.unflatten(rescaled.treedef, out)


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

  Attributes:
    damping: the λ used (after the relative scaling).
    gram_trace: trace(K) over unmasked examples = Σ_i ‖g_i‖².
    effective_rank: participation ratio (Σσ)²/Σσ² of K's spectrum, in [1, B_eff].
    kept_fraction: ‖d‖² / ‖g‖² = cᵀKc / uᵀKu before any step-size scaling, with g = Gᵀu the
      plain masked mean gradient: how much of the mean gradient's squared norm the filter
      kept. In [0, 1] without example weights and with the "sum" normalization;
      weights, or the "damping" normalization, can make it larger.
    step_scale: the factor α that the step-size rule and the norm clip applied to d (see
      :func:`step_scale`); 1 when neither is set.
    normalization_ratio: λ / Σ m∘s (λ after the relative scaling; Σ m∘s = B_eff without
      weights): the scalar between the two weight normalizations, c_sum = ratio · c_damping.
      For the natural filter, the ``"sum"`` step is this ratio times Wu et al.'s eq. 8 step
      Gᵀ(K+λI)⁻¹(m∘s). With relative damping it is damping · trace(K) / (B_eff · Σ m∘s), a
      per-batch ratio of the mean squared gradient norm to the mean weight. NaN for an
      unmasked weight that is negative or not finite; 0 for all-zero weights (both steps
      are 0).
  """

  damping: jax.Array
  gram_trace: jax.Array
  effective_rank: jax.Array
  kept_fraction: jax.Array
  step_scale: jax.Array
  normalization_ratio: jax.Array


def _masked_gram(gram: jax.Array, keep: jax.Array) -> jax.Array:
  """K symmetrized, with every row and column of a masked example set to 0."""
  pair_kept = (keep[:, None] * keep[None, :]) > 0
  return jnp.where(pair_kept, 0.5 * (gram + gram.T), 0.0)


def masked_weights(mask: jax.Array, weights: jax.Array | None = None, dtype=jnp.float32):
  """m∘s with m = [mask > 0] and s = ``weights`` (s = 1 without weights).

  Masked entries of s are ignored (NaN included). An unmasked weight that is negative or not
  finite makes every entry NaN, so that the update is non-finite (as with a non-finite
  gradient) rather than silently wrong.
  """
  keep = (mask > 0).astype(dtype)
  if weights is None:
    return keep
  weights = jnp.asarray(weights)
  if weights.shape != mask.shape:
    raise ValueError(
        f"example weights must have shape {mask.shape} (one per example), got {weights.shape}"
    )
  weights = weights.astype(dtype)
  valid = jnp.all((keep == 0) | (jnp.isfinite(weights) & (weights >= 0)))
  return jnp.where(keep > 0, jnp.where(valid, weights, jnp.nan), 0.0)


def normalized_weights(mask: jax.Array, weights: jax.Array | None = None, dtype=jnp.float32):
  """(w, mass): w = m∘s / Σ m∘s and mass = Σ m∘s, with m∘s from :func:`masked_weights`.

  Without weights s = 1, so w = m / Σm and the mass is the number of unmasked examples.
  A zero mass gives w = 0, not NaN; an invalid weight makes w and the mass NaN.
  """
  scaled = masked_weights(mask, weights, dtype)
  mass = jnp.sum(scaled)
  normalized = jnp.where(mass > 0, scaled / jnp.where(mass > 0, mass, 1.0), 0.0)
  return jnp.where(jnp.isnan(mass), jnp.nan, normalized), mass


def normalization_ratio(damping: jax.Array, mass: jax.Array) -> jax.Array:
  """λ / Σ m∘s (:attr:`FilterStats.normalization_ratio`): 0 for a zero mass, NaN for a NaN one."""
  ratio = jnp.where(mass > 0, damping / jnp.where(mass > 0, mass, 1.0), 0.0)
  return jnp.where(jnp.isnan(mass), jnp.nan, ratio)


def check_weight_normalization(weight_normalization: str, filter: str) -> None:
  """ValueError unless ``weight_normalization`` is one of :data:`WEIGHT_NORMALIZATIONS` and,
  for ``"damping"``, the filter is ``"natural"``."""
  if weight_normalization not in WEIGHT_NORMALIZATIONS:
    raise ValueError(
        f"weight_normalization must be one of {WEIGHT_NORMALIZATIONS}, got "
        f"{weight_normalization!r}"
    )
  if weight_normalization == "damping" and filter != "natural":
    raise ValueError(
        'weight_normalization="damping" (the unnormalized step Gᵀ(K+λI)⁻¹(m∘s) of Wu et al., '
        f'eq. 8) needs filter="natural", got filter={filter!r}: K(K+λI)⁻¹/λ has no limit as '
        "λ → 0"
    )


def filter_coefficients(
    gram: jax.Array,
    mask: jax.Array,
    damping,
    filter: str = "tikhonov",
    damping_mode: str = "absolute",
    weights: jax.Array | None = None,
    weight_normalization: str = "sum",
) -> tuple[jax.Array, FilterStats]:
  """The coefficients c = f(K) w of ``docs/method.md``, and statistics of the solve.

  Args:
    gram: K, [B, B], any float dtype (solved in float32 or wider).
    mask: [B]; examples with mask ≤ 0 are removed from the solve and get c_i = 0.
    damping: λ > 0 (absolute), or the factor of trace(K)/B_eff (relative).
    filter: "tikhonov" (K(K+λI)⁻¹) or "natural" (λ(K+λI)⁻¹).
    damping_mode: "absolute" or "relative".
    weights: optional example weights s ≥ 0, [B]: the right-hand side becomes
      w = m∘s / Σ m∘s instead of m / Σm (all-zero weights give c = 0; a negative or
      non-finite unmasked weight gives c = NaN). They change w only, not K or λ.
    weight_normalization: "sum" (w = m∘s / Σ m∘s, above) or "damping" (w = m∘s / λ, natural
      filter only: c = (K+λI)⁻¹(m∘s), Wu et al.'s eq. 8).

  K is symmetrized and eigendecomposed (never inverted): c = U h(σ) Uᵀ w with
  h = σ/(σ+λ) or λ/(σ+λ) (for "damping", c = U (1/(σ+λ)) Uᵀ (m∘s)); tiny negative
  eigenvalues from rounding are clipped to 0.
  """
  check_weight_normalization(weight_normalization, filter)
  dtype = compute_dtype(gram.dtype)
  keep = (mask > 0).astype(dtype)
  num_kept = jnp.sum(keep)
  rhs, mass = normalized_weights(mask, weights, dtype)
  if weight_normalization == "damping":
    rhs = masked_weights(mask, weights, dtype)
  gram = _masked_gram(gram.astype(dtype), keep)
  trace = jnp.trace(gram)
  if damping_mode == "relative":
    damping = damping * trace / jnp.maximum(num_kept, 1.0)
  # λ = 0 only when every gradient is 0 (relative mode); then d = 0 whatever c is. An
  # infinite λ (an absolute λ far above K's scale) acts as the largest finite one: no inf/inf.
  damping = jnp.clip(jnp.asarray(damping, dtype), jnp.finfo(dtype).tiny, jnp.finfo(dtype).max)
  # Masked rows (zeroed above) become decoupled directions of scale trace(K)/B_eff, the
  # kept examples' mean, so eigh sees no degenerate zero block (w_i = 0 there, so c_i = 0).
  pad_scale = jnp.where(trace > 0, trace / jnp.maximum(num_kept, 1.0), 1.0)
  solve_matrix = gram + jnp.diag((1.0 - keep) * pad_scale)
  sigma, vectors = jnp.linalg.eigh(solve_matrix)
  sigma = jnp.maximum(sigma, 0.0)
  if filter == "tikhonov":
    response = sigma / (sigma + damping)
  elif filter == "natural" and weight_normalization == "damping":
    response = 1.0 / (sigma + damping)  # λ(K+λI)⁻¹ applied to m∘s/λ
  elif filter == "natural":
    response = damping / (sigma + damping)
  else:
    raise ValueError(f"filter must be one of {FILTERS}, got {filter!r}")
  projected = jnp.matmul(vectors.T, rhs, precision=_HIGHEST)
  coeffs = jnp.matmul(vectors, response * projected, precision=_HIGHEST) * keep

  mean = keep / jnp.maximum(num_kept, 1.0)
  mean_sq_norm = mean @ jnp.matmul(gram, mean, precision=_HIGHEST)
  kept_sq_norm = coeffs @ jnp.matmul(gram, coeffs, precision=_HIGHEST)
  frob_sq = jnp.sum(gram * gram)
  stats = FilterStats(
      damping=damping,
      gram_trace=trace,
      effective_rank=jnp.where(frob_sq > 0, trace**2 / frob_sq, 0.0),
      kept_fraction=jnp.where(mean_sq_norm > 0, kept_sq_norm / mean_sq_norm, 0.0),
      step_scale=jnp.ones((), dtype),
      normalization_ratio=normalization_ratio(damping, mass),
  )
  return coeffs, stats


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 where denominator ≤ 0 (a zero step, never NaN)."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def step_scale(
    gram: jax.Array,
    mask: jax.Array,
    coeffs: jax.Array,
    damping,
    rule: str = "none",
    step_size_damping: float | None = None,
    max_update_norm: float | None = None,
) -> jax.Array:
  """The factor α of the step α·d, d = Gᵀc, from K and c alone (no pass over the model).

  With u = m / Σm (g = Gᵀu, the plain mean gradient SGD would step) and B_eff = Σm:
  ‖g‖² = uᵀKu, ‖d‖² = cᵀKc, gᵀd = uᵀKc and dᵀFd = cᵀK²c / B_eff for the empirical Fisher
  F = GᵀG / B_eff. The rules:

  * ``"none"``: α = 1.
  * ``"graft"``: α = ‖g‖ / ‖d‖: d keeps its direction and takes the mean gradient's norm,
    as grafting takes another optimizer's step norm (Agarwal et al. 2020).
  * ``"quadratic"``: α = max(gᵀd, 0) / (dᵀFd + ρ‖d‖²), the minimizer of the damped
    quadratic model L − α gᵀd + ½α² dᵀ(F + ρI)d along d (K-FAC's rule, Martens & Grosse
    2015). ρ = λ / B_eff by default: the filter's damping in Fisher units, for which the
    natural filter's d = ρ(F+ρI)⁻¹g gets α = 1/ρ, i.e. the damped Newton step (F+ρI)⁻¹g.
    The curvature is the empirical Fisher, the only one K provides; it is not a model of
    the loss (Kunstner et al. 2019, "Limitations of the Empirical Fisher Approximation"),
    whereas K-FAC's rule uses the true Fisher (sampled labels) or Gauss–Newton matrix. So α
    minimizes this quadratic, not the loss, along d (docs/method.md §1.8).

  Then, with ``max_update_norm`` M, α is reduced so that ‖α d‖ ≤ M. A zero denominator
  (d = 0, or all examples masked) gives α = 0, never NaN.

  Args:
    gram: K, [B, B] (rows and columns of masked examples are ignored).
    mask: [B], as for :func:`filter_coefficients`.
    coeffs: c from :func:`filter_coefficients`.
    damping: the λ the filter used (``FilterStats.damping``, after any relative scaling).
    rule: "none", "graft" or "quadratic".
    step_size_damping: ρ ≥ 0 for "quadratic", replacing λ / B_eff.
    max_update_norm: M > 0, or None for no clip.
  """
  if rule not in STEP_SIZES:
    raise ValueError(f"step-size rule must be one of {STEP_SIZES}, got {rule!r}")
  dtype = compute_dtype(gram.dtype)
  if rule == "none" and max_update_norm is None:
    return jnp.ones((), dtype)
  keep = (mask > 0).astype(dtype)
  num_kept = jnp.maximum(jnp.sum(keep), 1.0)
  gram = _masked_gram(gram.astype(dtype), keep)
  coeffs = coeffs.astype(dtype) * keep
  mean = keep / num_kept
  dot = functools.partial(jnp.dot, precision=_HIGHEST)  # full float32 on TPU/GPU too
  gram_coeffs = dot(gram, coeffs)
  d_sq = jnp.maximum(dot(coeffs, gram_coeffs), 0.0)  # K is PSD; rounding may dip below 0
  if rule == "none":
    alpha = jnp.ones((), dtype)
  elif rule == "graft":
    g_sq = jnp.maximum(dot(mean, dot(gram, mean)), 0.0)
    alpha = jnp.sqrt(_safe_divide(g_sq, d_sq))
  else:
    rho = damping / num_kept if step_size_damping is None else step_size_damping
    curvature = dot(gram_coeffs, gram_coeffs) / num_kept + rho * d_sq
    alpha = _safe_divide(jnp.maximum(dot(mean, gram_coeffs), 0.0), curvature)
  if max_update_norm is not None:
    # ‖α d‖ > M > 0 implies ‖d‖ > 0, so the division is safe where it is taken.
    d_norm = jnp.sqrt(d_sq)
    alpha = jnp.where(
        alpha * d_norm > max_update_norm, _safe_divide(max_update_norm, d_norm), alpha
    )
  return alpha.astype(dtype)
