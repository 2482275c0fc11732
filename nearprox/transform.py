"""Gram-matrix filters of per-example gradients (tikhonov and natural) as optax transformations.

``scale_by_proximal`` turns per-example gradients g_1 … g_B into one filtered gradient

    d = α · Gᵀ f(K) w,     K = G Gᵀ,   w = m∘s / Σ m∘s,

with f(K) = K(K+λI)⁻¹ ("tikhonov": the library's source formula, the "proximal gradient
scaling" ⟨∇L,∇L⟩(⟨∇L,∇L⟩+λI)⁻¹, a Tikhonov spectral filter) or f(K) = λ(K+λI)⁻¹ ("natural":
ρ(F+ρI)⁻¹g_w with the empirical Fisher F = GᵀG/B_eff and ρ = λ/B_eff, B_eff the number of
unmasked examples, by the Woodbury identity; λ times the Levenberg–Marquardt step, the
proximal-point step, docs/method.md §1.2 and §1.5), mask m, optional example weights s ≥ 0
(s = 1 by default, so w = m / Σm) and a step-size factor α (1 by default; see
:func:`nearprox.spectral_filter.step_scale`). ``weight_normalization="damping"`` (natural
filter only) takes w = m∘s / λ instead, so d = α·Gᵀ(K+λI)⁻¹(m∘s): Wu et al.'s (2024) eq. 8
step, which the default "sum" normalization multiplies by λ / Σ m∘s (docs/method.md §1.4).
See ``docs/method.md`` and :mod:`nearprox.spectral_filter`.

Like ``optax.contrib.differentially_private_aggregate``, it must come first in a chain: its
input is per-example, its output is an ordinary aggregated gradient, which any optax
optimizer can take, e.g. ``optax.chain(scale_by_proximal(λ), optax.adamw(lr))``.

Several devices (``axis_name`` set, inside ``jax.pmap`` or ``jax.shard_map``):

* ``gram="local"``: each device filters its own examples (its weights normalized over its
  own examples, its own step-size factor α and norm clip, all from its own K); the results
  are summed with shares proportional to each device's weight mass Σ m∘s (its number of
  unmasked examples without weights: a plain mean when no example is masked). So the
  identity filter would give exactly the global weighted mean, and a norm clip M also
  bounds the combined update (a convex combination of vectors of norm ≤ M). With
  ``weight_normalization="damping"`` a device's c = (K_aa+λI)⁻¹(m∘s)_a is already its block of
  the global right-hand side, so without a step-size rule the devices' steps add up (the
  step of the block-diagonal Gram); the rule and the clip see each step divided by its share,
  as under "sum", so "graft" and "quadratic" give the same update with either normalization
  and the clip still bounds the combination. Communication: one all-reduce of P numbers, the
  same as data-parallel SGD.
* ``gram="global"``: exact. Each device all-gathers every device's per-example gradients
  (dense: (n−1)·B·P numbers received per device; factored: the factors, see
  :mod:`nearprox.factored_grads`), computes its rows of the global K and all-gathers those rows
  (n·B² numbers) with the masks and weights, then solves the same global system and
  computes the same global α; its share of d is all-reduced (P numbers). The result equals
  the single-device result on the concatenated global batch. With ``sketch_dim``, the
  sketched leaves' features (B·k' numbers per leaf) are gathered in place of their factors
  (docs/method.md §2.9); the result equals the single-device sketched result on the
  concatenated batch (the sketch matrices are the same on every device).

Scale: each leaf's part of K is formed from its per-example gradients divided by a power of
two near their largest entry, and λ, ρ and M are converted exactly, so K neither overflows nor
underflows in float32 whatever the scale of the loss, and the update is the same as without
the division (docs/method.md §1.7).

Non-finite inputs: a NaN or Inf in an unmasked example's gradient reaches K and therefore
every coefficient, so the whole update becomes non-finite; so does an unmasked example weight
that is negative or not finite. To skip such steps, wrap what follows the aggregation:
``optax.chain(scale_by_proximal(λ), optax.apply_if_finite(optax.sgd(lr),
max_consecutive_errors=k))`` (wrapping ``scale_by_proximal`` itself cannot work: a skipped
step would return zeros of the per-example shapes). Rows of masked examples are zeroed before
use, so anything in them (NaN included) has no effect; so are their weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nearprox import base, rescaled_solve, sketch, spectral_filter

GRAM_MODES = ("local", "global")

Damping = float | Callable[[jax.Array], jax.Array]


class ScaleByProximalState(NamedTuple):
  """The step count and what the last filtered step did (a
  :class:`~nearprox.spectral_filter.FilterStats`)."""

  count: jax.Array
  stats: spectral_filter.FilterStats


def _check_damping(damping: Damping, name: str = "damping") -> None:
  if callable(damping):
    return
  try:
    value = float(damping)
  except jax.errors.ConcretizationTypeError:
    return  # traced (optax.inject_hyperparams): checked when the state was made
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a positive float or a schedule, got {damping!r}") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(f"{name} must be positive and finite, got {damping!r}")


def _check_choice(value, choices, name: str) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _mask_for(mask, batch: int) -> jax.Array:
  if mask is None:
    return jnp.ones((batch,), jnp.float32)
  mask = jnp.asarray(mask)
  if mask.shape != (batch,):
    raise ValueError(
        f"mask must have shape ({batch},) to match the per-example gradients' batch axis, "
        f"got {mask.shape}"
    )
  return mask.astype(jnp.float32)


def _weights_for(example_weights, batch: int) -> jax.Array | None:
  if example_weights is None:
    return None
  weights = jnp.asarray(example_weights)
  if weights.shape != (batch,):
    raise ValueError(
        f"example_weights must have shape ({batch},) to match the per-example gradients' "
        f"batch axis, got {weights.shape}"
    )
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    weights = weights.astype(jnp.float32)
  return weights


def _check_optional_positive(value, name: str, allow_zero: bool) -> None:
  if value is None:
    return
  bound = "a float >= 0" if allow_zero else "a float > 0"
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be None or {bound}, got {value!r}") from None
  if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
    raise ValueError(f"{name} must be None or {bound}, got {value!r}")


def scale_by_proximal(
    damping: Damping,
    *,
    filter: str = "tikhonov",
    damping_mode: str = "absolute",
    axis_name: str | None = None,
    gram: str = "local",
    step_size: str = "none",
    step_size_damping: float | None = None,
    max_update_norm: float | None = None,
    sketch_dim: int | None = None,
    weight_normalization: str = "sum",
    zero_masked_rows: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Filters per-example gradients through K(K+λI)⁻¹ (or λ(K+λI)⁻¹) and aggregates them.

  The update is d = α · Gᵀ f(K) w: G holds the per-example gradients as rows, K = G Gᵀ,
  w = m∘s / Σ m∘s (mask m, example weights s, uniform by default; m∘s / λ with
  ``weight_normalization="damping"``) and α a step-size factor.
  docs/method.md has the mathematics: the filters (§1.2), example weights (§1.4), damping
  (§1.6), masks and numerics (§1.7), step sizes (§1.8), several devices (§1.9) and the
  sketched Gram (§2.9).

  Args:
    damping: λ > 0, or a schedule ``count -> λ``.
    filter: "tikhonov" (σ/(σ+λ) per eigen-direction of K: keeps the directions many examples
      agree on) or "natural" (λ/(σ+λ): ρ times the damped empirical-Fisher natural gradient,
      the proximal step). The two filtered gradients sum to the weighted mean gradient.
    damping_mode: "absolute" (λ in the units of K) or "relative" (λ = damping · trace(K) /
      B_eff over the B_eff unmasked examples: invariant to rescaling the loss).
    axis_name: the mapped axis (pmap / shard_map) the batch is split over, or None.
    gram: with ``axis_name``, "local" (each device filters its own examples; the results are
      combined in proportion to their weight mass) or "global" (the exact Gram of the global
      batch); the module docstring gives their communication.
    step_size: "none" (α = 1), "graft" (α = ‖g‖/‖d‖, g the plain mean gradient) or
      "quadratic" (α minimizes the damped quadratic model along d whose curvature is the
      empirical Fisher, not a model of the loss); :func:`nearprox.spectral_filter.step_scale`
      has the formulas.
    step_size_damping: ρ ≥ 0 of the "quadratic" rule in place of λ / B_eff.
    max_update_norm: M > 0: α is reduced so that ‖αd‖ ≤ M, ‖d‖ computed as √(cᵀKc) (under
      ``sketch_dim``, √(ĉᵀK̂ĉ): an estimate, so the bound is approximate there). None: no
      bound.
    sketch_dim: None or 0: the exact K. k ≥ 1: the share of K of every leaf whose exact
      Gram costs more than a sketch is estimated from about k seeded random features
      (:mod:`nearprox.sketch`); d is still formed from the exact per-example gradients.
      Only K̂ is unbiased: ĉ = f(K̂)w and d̂ = Gᵀĉ are not (docs/method.md §2.9), and the
      step-size rules, the clip and the statistics use K̂.
    weight_normalization: "sum" (default): w = m∘s / Σ m∘s, a weighted mean. "damping"
      (``filter="natural"`` only): w = m∘s / λ, so d = Gᵀ(K+λI)⁻¹(m∘s), the unnormalized
      step of Wu et al. (eq. 8; with ``proximal_sgd`` their Algorithm 1; without weights
      their EF step, eq. 5). The "sum" step is λ / Σ m∘s times it (``stats.
      normalization_ratio``), a per-batch scalar that "graft" and "quadratic" absorb exactly
      and a fixed learning rate does not.
    zero_masked_rows: True (default): the masked examples' rows of the per-example gradients
      are zeroed first, so nothing in them, NaN included, reaches d. False: they are used as
      they are, which saves a copy of every per-example array (XLA cannot fuse the select
      into the products that read them; docs/benchmarks.md has its cost). The solve gives them c_i = 0 either way, so d is the same whenever they are
      finite, e.g. copies of real rows, as :mod:`nearprox.text.data` pads its batches.

  Returns:
    A transformation whose ``update(per_example_grads, state, params=None, *, mask=None,
    example_weights=None)`` takes the params pytree with a leading batch axis B on every leaf
    (or the factored form of :func:`nearprox.per_example_grads`), an optional 0/1 ``mask``
    [B] for padded examples and optional example weights s ≥ 0 [B], and returns d with the
    params' shapes. All-zero weights give d = 0; a negative or non-finite unmasked weight
    gives a non-finite d, as a non-finite gradient does. The state's ``stats``
    (:class:`nearprox.spectral_filter.FilterStats`) record λ, trace(K), the effective rank,
    the kept fraction, α and λ / Σ m∘s.

  References:
    Wu, Yu, Zhang & Woodland, `An Improved Empirical Fisher Approximation for Natural
    Gradient Descent <https://arxiv.org/abs/2406.06420>`_, NeurIPS 2024 (iEF weights; eq. 8
    and Algorithm 1 for ``weight_normalization="damping"``).

    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015 (the quadratic-model
    step size).

    Agarwal, Anil, Hazan, Koren & Zhang, `Disentangling Adaptive Gradient Methods from
    Learning Rates <https://arxiv.org/abs/2002.11803>`_, 2020 (grafting).

    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
    Fine-tuning <https://arxiv.org/abs/2410.16029>`_, 2024 (a Woodbury natural-gradient
    filter in front of Adam).
  """
  _check_damping(damping)
  _check_choice(filter, spectral_filter.FILTERS, "filter")
  _check_choice(damping_mode, spectral_filter.DAMPING_MODES, "damping_mode")
  _check_choice(gram, GRAM_MODES, "gram")
  _check_choice(step_size, spectral_filter.STEP_SIZES, "step_size")
  spectral_filter.check_weight_normalization(weight_normalization, filter)
  _check_optional_positive(step_size_damping, "step_size_damping", allow_zero=True)
  _check_optional_positive(max_update_norm, "max_update_norm", allow_zero=False)
  if step_size_damping is not None and step_size != "quadratic":
    raise ValueError(
        f'step_size_damping applies to step_size="quadratic" only, got step_size={step_size!r}'
    )
  if gram == "global" and axis_name is None:
    raise ValueError('gram="global" needs axis_name: the mapped axis the batch is split over')
  sketch_dim = sketch.check_sketch_dim(sketch_dim)

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return ScaleByProximalState(
        jnp.zeros((), jnp.int32),
        spectral_filter.FilterStats(zero, zero, zero, zero, jnp.ones((), jnp.float32), zero),
    )

  def update_fn(updates, state, params=None, *, mask=None, example_weights=None, **extra_args):
    del params, extra_args
    batch = spectral_filter.batch_size(updates)
    mask = _mask_for(mask, batch)
    weights = _weights_for(example_weights, batch)
    if zero_masked_rows:
      updates = spectral_filter.zero_masked_examples(updates, mask)
    # Every leaf divided by a power of two near its largest entry (the same on every device
    # for the global Gram): K̃ = 4^-e K neither overflows nor underflows.
    rescaled = spectral_filter.rescale_leaves(updates, axis_name if gram == "global" else None)
    damping_now = damping(state.count) if callable(damping) else damping
    if sketch_dim is None:
      parts, to_combine = rescaled, rescaled
      gram_of = lambda mine, other=None: spectral_filter.rescaled_gram(
          mine.leaves, mine.exponents, None if other is None else other.leaves
      )
    else:
      # The global Gram is that of the concatenated batch: its size decides what is sketched.
      gram_batch = batch * jax.lax.axis_size(axis_name) if gram == "global" else batch
      parts = sketch.sketch_per_example(rescaled, state.count, sketch_dim, gram_batch)
      to_combine = rescaled._replace(
          leaves=jax.tree.leaves(parts.for_combine, is_leaf=base.is_factor)
      )
      gram_of = sketch.estimated_gram

    solve = functools.partial(
        rescaled_solve.solve,
        exponent=rescaled.exponent,
        damping=damping_now,
        filter=filter,
        damping_mode=damping_mode,
        step_size=step_size,
        step_size_damping=step_size_damping,
        max_update_norm=max_update_norm,
        weight_normalization=weight_normalization,
    )

    if axis_name is None:
      coeffs, shift, stats = solve(gram_of(parts), mask, weights)
      filtered = spectral_filter.rescaled_combine(to_combine, coeffs, shift)
    elif gram == "local":
      local_gram = gram_of(parts)
      _, mass = spectral_filter.normalized_weights(
          mask, weights, base.compute_dtype(local_gram.dtype)
      )
      total = jax.lax.psum(mass, axis_name)
      share = jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)
      # "damping": the device's c = (K_aa+λI)⁻¹(m∘s)_a is already its block of the global
      # right-hand side; 1/share puts it in the units the step-size rule and the clip see
      # under "sum", so the shares below give back the sum of the devices' steps.
      rhs_scale = None
      if weight_normalization == "damping":
        rhs_scale = jnp.where(share > 0, 1.0 / jnp.where(share > 0, share, 1.0), 0.0)
      coeffs, shift, stats = solve(local_gram, mask, weights, rhs_scale=rhs_scale)
      filtered = spectral_filter.rescaled_combine(to_combine, coeffs * share, shift)
      filtered = jax.lax.psum(filtered, axis_name)
      # Devices' statistics differ; their mean keeps the state the same on every device.
      stats = jax.lax.pmean(stats, axis_name)
    else:
      if sketch_dim is None:
        gathered = jax.lax.all_gather(rescaled.leaves, axis_name, tiled=True)
        everyone = rescaled._replace(leaves=gathered)
      else:  # the sketched features and the exact leaves, not the factors of sketched ones
        gathered = jax.lax.all_gather((parts.features, parts.exact), axis_name, tiled=True)
        everyone = parts._replace(features=gathered[0], exact=gathered[1], for_combine=None)
      my_rows = gram_of(parts, everyone)
      global_gram = jax.lax.all_gather(my_rows, axis_name, tiled=True)
      global_mask = jax.lax.all_gather(mask, axis_name, tiled=True)
      global_weights = (
          None if weights is None else jax.lax.all_gather(weights, axis_name, tiled=True)
      )
      global_coeffs, shift, stats = solve(global_gram, global_mask, global_weights)
      start = jax.lax.axis_index(axis_name) * batch
      coeffs = jax.lax.dynamic_slice_in_dim(global_coeffs, start, batch)
      filtered = spectral_filter.rescaled_combine(to_combine, coeffs, shift)
      filtered = jax.lax.psum(filtered, axis_name)

    stats = spectral_filter.FilterStats(*(jnp.asarray(s, jnp.float32) for s in stats))
    return filtered, ScaleByProximalState(optax.safe_increment(state.count), stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def proximal_sgd(
    learning_rate: optax.ScalarOrSchedule,
    damping: Damping,
    *,
    filter: str = "tikhonov",
    momentum: float | None = None,
    nesterov: bool = False,
    **proximal_kwargs,
) -> optax.GradientTransformationExtraArgs:
  """SGD on the filtered gradient d: ``chain(scale_by_proximal(...), optax.sgd(...))``.

  The update is −learning_rate · d (with optional heavy-ball or Nesterov momentum on d).
  ``proximal_kwargs`` go to :func:`scale_by_proximal` (damping_mode, axis_name, gram,
  step_size, step_size_damping, max_update_norm, sketch_dim, weight_normalization). With
  ``filter="natural"``, ``weight_normalization="damping"`` and iEF ``example_weights`` it is
  Wu et al.'s Algorithm 1 (with momentum=None).
  Feed it per-example gradients: ``opt.update(per_example_grads, state, params, mask=mask)``
  (and ``example_weights=s`` for weighted examples).
  """
  return optax.chain(
      scale_by_proximal(damping, filter=filter, **proximal_kwargs),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


def scale_by_proximal_norm(damping: float) -> optax.GradientTransformation:
  """The rank-one proximal scaling of an aggregated gradient: g · ‖g‖² / (‖g‖² + λ).

  This is the B = 1 case of the tikhonov filter, applied to the batch gradient itself when
  per-example gradients are not available; it composes anywhere in an optax chain. ‖g‖ is
  the global norm over the whole pytree, computed in float32 or wider relative to a power of
  two near the largest entry (so ‖g‖² cannot overflow).
  """
  if callable(damping):
    raise ValueError(f"scale_by_proximal_norm takes a constant damping, got {damping!r}")
  _check_damping(damping)

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    if not leaves:
      return updates, state
    dtype = base.compute_dtype(jnp.result_type(*leaves))
    # ‖g‖² and λ in units of 4^e (exact powers of two), so that ‖g‖² cannot overflow.
    rescaled = spectral_filter.rescale_leaves(leaves)
    exponent = rescaled.exponent
    sq_norm = sum(
        base.times_power_of_two(jnp.sum(jnp.square(x.astype(dtype))), 2 * (e - exponent))
        for x, e in zip(rescaled.leaves, rescaled.exponents)
    )
    scale = sq_norm / (sq_norm + base.times_power_of_two(damping, -2 * exponent).astype(dtype))
    return jax.tree.map(lambda x: (x.astype(dtype) * scale).astype(x.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
