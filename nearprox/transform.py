"""The proximal gradient scaling as optax gradient transformations.

``scale_by_proximal`` turns per-example gradients g_1 … g_B into one filtered gradient

    d = Gᵀ f(K) w,     K = G Gᵀ,   w = m / Σm,

with f(K) = K(K+λI)⁻¹ ("tikhonov", the proximal gradient scaling ⟨∇L,∇L⟩/(⟨∇L,∇L⟩+λI)) or
f(K) = λ(K+λI)⁻¹ ("natural": the damped natural gradient ρ(F+ρI)⁻¹g with empirical Fisher
F = GᵀG/B and ρ = λ/B, by the Woodbury identity). See DESIGN.md §1 and :mod:`nearprox.spectral_filter`.

Like ``optax.contrib.differentially_private_aggregate``, it must come first in a chain: its
input is per-example, its output is an ordinary aggregated gradient.

Several devices (``axis_name`` set, inside ``jax.pmap`` or ``jax.shard_map``):

* ``gram="local"``: each device filters its own examples; the results are averaged over
  devices, weighted by each device's number of unmasked examples (a plain mean when no
  example is masked). Communication: one all-reduce of P numbers, the same as data-parallel
  SGD.
* ``gram="global"``: exact. Each device all-gathers every device's per-example gradients
  (dense: (n−1)·B·P numbers received per device; factored: the factors, see
  :mod:`nearprox.factored_grads`), computes its rows of the global K and all-gathers those rows
  (n·B² numbers), then solves the same global system; its share of d is all-reduced
  (P numbers). The result equals the single-device result on the concatenated global batch.

Non-finite gradients: a NaN or Inf in an unmasked example's gradient reaches K and therefore
every coefficient, so the whole update becomes non-finite. To skip such steps, wrap what
follows the aggregation: ``optax.chain(scale_by_proximal(λ), optax.apply_if_finite(
optax.sgd(lr), max_consecutive_errors=k))`` (wrapping ``scale_by_proximal`` itself cannot work:
a skipped step would return zeros of the per-example shapes). Rows of masked examples are zeroed before use,
so anything in them (NaN included) has no effect.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nearprox import spectral_filter

GRAM_MODES = ("local", "global")

Damping = float | Callable[[jax.Array], jax.Array]


class ScaleByProximalState(NamedTuple):
  """Step count and what the last filtered step did (see :class:`nearprox.spectral_filter.FilterStats`)."""

  count: jax.Array
  stats: spectral_filter.FilterStats


def _check_damping(damping: Damping, name: str = "damping") -> None:
  if callable(damping):
    return
  try:
    value = float(damping)
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


def scale_by_proximal(
    damping: Damping,
    filter: str = "tikhonov",
    damping_mode: str = "absolute",
    axis_name: str | None = None,
    gram: str = "local",
) -> optax.GradientTransformationExtraArgs:
  """Filters per-example gradients through K(K+λI)⁻¹ (or λ(K+λI)⁻¹) and aggregates them.

  Args:
    damping: λ > 0, or a schedule ``count -> λ``. With ``damping_mode="relative"`` it is the
      factor in λ = damping · trace(K) / B_eff (invariant to rescaling the loss).
    filter: "tikhonov" keeps directions many examples agree on (σ/(σ+λ)); "natural" is the
      damped natural gradient (λ/(σ+λ)). The two filtered gradients sum to the mean gradient.
    damping_mode: "absolute" or "relative".
    axis_name: the mapped axis (pmap / shard_map) over which the batch is split, or None.
    gram: "local" (per-device Gram, averaged results) or "global" (exact Gram of the global
      batch); see the module docstring for their communication.

  Returns:
    A transformation whose ``update(per_example_grads, state, params=None, *, mask=None)``
    takes the params pytree with a leading batch axis B on every leaf (or the factored form
    from ``nearprox.per_example_grads(..., method="factored")``) and an optional 0/1 ``mask``
    of shape [B] for padded examples, and returns the filtered gradient (params' shapes).
  """
  _check_damping(damping)
  _check_choice(filter, spectral_filter.FILTERS, "filter")
  _check_choice(damping_mode, spectral_filter.DAMPING_MODES, "damping_mode")
  _check_choice(gram, GRAM_MODES, "gram")
  if gram == "global" and axis_name is None:
    raise ValueError('gram="global" needs axis_name: the mapped axis the batch is split over')

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return ScaleByProximalState(
        jnp.zeros((), jnp.int32), spectral_filter.FilterStats(zero, zero, zero, zero)
    )

  def update_fn(updates, state, params=None, *, mask=None, **extra_args):
    del params, extra_args
    batch = spectral_filter.batch_size(updates)
    mask = _mask_for(mask, batch)
    updates = spectral_filter.zero_masked_examples(updates, mask)
    damping_now = damping(state.count) if callable(damping) else damping

    def solve(k, m):
      return spectral_filter.filter_coefficients(k, m, damping_now, filter, damping_mode)

    if axis_name is None:
      coeffs, stats = solve(spectral_filter.gram_matrix(updates), mask)
      filtered = spectral_filter.combine(updates, coeffs)
    elif gram == "local":
      coeffs, stats = solve(spectral_filter.gram_matrix(updates), mask)
      num_kept = jnp.sum(mask > 0).astype(jnp.float32)
      total_kept = jax.lax.psum(num_kept, axis_name)
      share = num_kept / jnp.maximum(total_kept, 1.0)
      filtered = jax.lax.psum(spectral_filter.combine(updates, coeffs * share), axis_name)
      # Devices' statistics differ; their mean keeps the state the same on every device.
      stats = jax.lax.pmean(stats, axis_name)
    else:
      everyone = jax.lax.all_gather(updates, axis_name, tiled=True)
      my_rows = spectral_filter.gram_matrix(updates, everyone)
      global_gram = jax.lax.all_gather(my_rows, axis_name, tiled=True)
      global_mask = jax.lax.all_gather(mask, axis_name, tiled=True)
      global_coeffs, stats = solve(global_gram, global_mask)
      start = jax.lax.axis_index(axis_name) * batch
      coeffs = jax.lax.dynamic_slice_in_dim(global_coeffs, start, batch)
      filtered = jax.lax.psum(spectral_filter.combine(updates, coeffs), axis_name)

    stats = spectral_filter.FilterStats(*(jnp.asarray(s, jnp.float32) for s in stats))
    return filtered, ScaleByProximalState(optax.safe_increment(state.count), stats)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def proximal_sgd(
    learning_rate: optax.ScalarOrSchedule,
    damping: Damping,
    filter: str = "tikhonov",
    momentum: float | None = None,
    nesterov: bool = False,
    **proximal_kwargs,
) -> optax.GradientTransformationExtraArgs:
  """SGD on the proximally filtered gradient: ``chain(scale_by_proximal(...), optax.sgd(...))``.

  The update is −learning_rate · d (with optional heavy-ball or Nesterov momentum on d).
  ``proximal_kwargs`` go to :func:`scale_by_proximal` (damping_mode, axis_name, gram).
  Feed it per-example gradients: ``opt.update(per_example_grads, state, params, mask=mask)``.
  """
  return optax.chain(
      scale_by_proximal(damping, filter=filter, **proximal_kwargs),
      optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


def scale_by_proximal_norm(damping: float) -> optax.GradientTransformation:
  """The rank-one proximal scaling of an aggregated gradient: g · ‖g‖² / (‖g‖² + λ).

  This is the B = 1 case of the tikhonov filter, applied to the batch gradient itself when
  per-example gradients are not available; it composes anywhere in an optax chain. ‖g‖ is
  the global norm over the whole pytree, computed in float32 or wider.
  """
  _check_damping(damping)
  damping = float(damping)

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    dtype = spectral_filter.compute_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
    sq_norm = sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves)
    scale = sq_norm / (sq_norm + damping)
    return jax.tree.map(lambda x: (x.astype(dtype) * scale).astype(x.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
