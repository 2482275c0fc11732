"""The filter solve on a Gram matrix formed from rescaled per-example gradients.

:func:`solve` is what :func:`nearprox.transform.scale_by_proximal` solves: K̃ = 4^-e K is formed
from G̃ = 2^-e G, so that K neither overflows nor underflows in float32, and every quantity in
K's units (λ, ρ, M) is converted by an exact power of two (docs/method.md §1.7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nearprox import base, spectral_filter

# An absolute λ̃ is solved within [2^-48·τ, 2^24·trace(K̃)] (τ = trace(K̃)/B_eff) and ρ̃ within
# [0, 2^24·τ]: beyond, the response (and α) is flat or proportional to λ^±1 (ρ⁻¹) to float32
# precision on every direction float32 resolves (σ ≥ 2^-24·σ_max), and c stays representable.
_DAMPING_BELOW_MEAN = -48
_DAMPING_ABOVE_TRACE = 24


def _clipped(value, exponent: jax.Array, lo: jax.Array, hi: jax.Array):
  """(true, used, mantissa, power): true = value·2^exponent (0 or inf beyond float range),
  used = true clipped to [lo, hi] (unless hi = 0: K̃ = 0, nothing to compare with) and
  true / used = mantissa · 2^power exactly."""
  value = jnp.asarray(value, lo.dtype)
  true = base.times_power_of_two(value, exponent)
  used = jnp.where(hi > 0, jnp.clip(true, lo, hi), true)
  value_mantissa, value_exponent = jnp.frexp(value)
  clipped = true != used
  return (
      true,
      used,
      jnp.where(clipped, value_mantissa / used, 1.0),
      jnp.where(clipped, value_exponent + exponent, 0),
  )


def solve(
    gram: jax.Array,
    mask: jax.Array,
    weights: jax.Array | None,
    *,
    exponent: jax.Array,
    damping,
    filter: str,
    damping_mode: str,
    step_size: str,
    step_size_damping: float | None,
    max_update_norm: float | None,
    weight_normalization: str = "sum",
    rhs_scale: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, spectral_filter.FilterStats]:
  """(c', s, stats) with 2^s·Gᵀc' = α·Gᵀf(K)w, from the Gram K̃ = 4^-e K of G̃ = 2^-e G.

  f(K) = f(K̃) with λ̃ = 4^-e λ; ρ (units of K) and M (units of d) convert likewise. With c
  from K̃ the update is α·Gᵀc = Φ·G̃ᵀc, Φ = 2^e·α = 2^e·α̃ for "none" and "graft" and 2^-e·α̃
  for "quadratic" (α ∝ 1/K), α̃ being the step-size factor computed on K̃. With
  ``weight_normalization="damping"`` c = (K+λI)⁻¹(m∘s) has the units of 1/K: c = 4^-e·c̃, one
  more factor 2^-2e in Φ for "none". An absolute λ̃ or a ρ̃ beyond the intervals above (even 0
  or inf in float32) is solved at the nearest end: where c ∝ λ̃ (natural with "sum", small
  λ̃), c ∝ 1/λ̃ (tikhonov, or natural with "damping", large λ̃) or α ∝ 1/ρ̃ (large ρ̃), Φ takes
  the ratio, as a mantissa and a power of two since the ratio itself may not be
  representable (the graft and quadratic α̃ are invariant to the scale of c). Every
  conversion is an exact multiplication by a power of two. ``rhs_scale`` (local Gram with
  "damping": the device's global share undone, see ``scale_by_proximal``) multiplies c before
  the step-size rule and the clip; the rules are invariant to it, and α (``step_scale``) and
  the kept fraction leave it out.
  """
  dtype = gram.dtype
  keep = (mask > 0).astype(dtype)
  num_kept = jnp.maximum(jnp.sum(keep), 1.0)
  trace = jnp.sum(jnp.diagonal(gram) * keep)
  mean = trace / num_kept
  to_gram_units = -2 * exponent
  zero = jnp.zeros((), jnp.int32)
  # c_true = c · ratio · 2^(ratio_power + units): the filter's linear regimes beyond the clip,
  # and the units of c (1 for "sum", 1/K for "damping").
  units = to_gram_units if weight_normalization == "damping" else zero
  solve_damping, ratio, ratio_power = damping, jnp.ones((), dtype), zero
  if damping_mode == "absolute":
    true, solve_damping, mantissa, power = _clipped(
        damping,
        to_gram_units,
        base.times_power_of_two(mean, _DAMPING_BELOW_MEAN),
        base.times_power_of_two(trace, _DAMPING_ABOVE_TRACE),
    )
    # λ(K+λI)⁻¹w is ∝ λ at small λ; K(K+λI)⁻¹w and (K+λI)⁻¹(m∘s) are ∝ 1/λ at large λ.
    grows = filter == "natural" and weight_normalization == "sum"
    linear = true < solve_damping if grows else true > solve_damping
    sign = 1 if grows else -1
    ratio = jnp.where(linear, mantissa**sign, 1.0)
    ratio_power = jnp.where(linear, sign * power, 0)
  coeffs, stats = spectral_filter.filter_coefficients(
      gram,
      mask,
      solve_damping,
      filter,
      damping_mode,
      weights=weights,
      weight_normalization=weight_normalization,
  )
  if rhs_scale is not None:
    coeffs = coeffs * rhs_scale.astype(coeffs.dtype)
  # Φ = α̃ · scale · 2^shift.
  if step_size == "none":
    scale, shift, rho = ratio, exponent + ratio_power + units, None
  elif step_size == "graft":
    scale, shift, rho = jnp.ones((), dtype), exponent, None
  else:
    if step_size_damping is not None:
      rho, rho_exponent = step_size_damping, to_gram_units
    elif damping_mode == "absolute":
      rho, rho_exponent = jnp.asarray(damping, dtype) / num_kept, to_gram_units
    else:
      rho, rho_exponent = stats.damping / num_kept, zero
    _, rho, mantissa, power = _clipped(
        rho, rho_exponent, jnp.zeros((), dtype), base.times_power_of_two(mean, _DAMPING_ABOVE_TRACE)
    )
    scale, shift = 1.0 / mantissa, -exponent - power  # α ∝ 1/ρ̃ where ρ̃ was clipped
  alpha = spectral_filter.step_scale(
      gram,
      mask,
      coeffs,
      stats.damping,
      step_size,
      rho,
      None if max_update_norm is None else base.times_power_of_two(max_update_norm / scale, -shift),
  )
  coeffs = coeffs * (alpha * scale).astype(coeffs.dtype)
  # α = Φ / (2^e · ratio · 2^(ratio_power + units)) in the gradients' units.
  step_scale = base.times_power_of_two(
      alpha * scale / ratio, shift - exponent - ratio_power - units
  )
  true_damping = (
      jnp.asarray(damping, dtype)
      if damping_mode == "absolute"
      else base.times_power_of_two(stats.damping, 2 * exponent)
  )
  _, mass = spectral_filter.normalized_weights(mask, weights, dtype)
  stats = stats._replace(
      damping=true_damping,
      gram_trace=base.times_power_of_two(stats.gram_trace, 2 * exponent),
      kept_fraction=base.times_power_of_two(
          stats.kept_fraction * ratio**2, 2 * (ratio_power + units)
      ),
      step_scale=step_scale,
      # λ in K's units, not the solve's λ̃.
      normalization_ratio=spectral_filter.normalization_ratio(true_damping, mass),
  )
  return coeffs, shift - exponent, stats
