"""The proximal gradient scaling as optax gradient transformations.

``scale_by_proximal`` turns per-example gradients g_1 … g_B into one filtered gradient

    d = α · Gᵀ f(K) w,     K = G Gᵀ,   w = m∘s / Σ m∘s,

with f(K) = K(K+λI)⁻¹ ("tikhonov", the proximal gradient scaling ⟨∇L,∇L⟩/(⟨∇L,∇L⟩+λI)) or
f(K) = λ(K+λI)⁻¹ ("natural": the damped natural gradient ρ(F+ρI)⁻¹g with empirical Fisher
F = GᵀG/B and ρ = λ/B, by the Woodbury identity), mask m, optional example weights s ≥ 0
(s = 1 by default, so w = m / Σm) and a step-size factor α (1 by default; see
:func:`nearprox.spectral_filter.step_scale`). See ``docs/method.md`` and
:mod:`nearprox.spectral_filter`.

Like ``optax.contrib.differentially_private_aggregate``, it must come first in a chain: its
input is per-example, its output is an ordinary aggregated gradient, which any optax
optimizer can take, e.g. ``optax.chain(scale_by_proximal(λ), optax.adamw(lr))``.

Several devices (``axis_name`` set, inside ``jax.pmap`` or ``jax.shard_map``):

* ``gram="local"``: each device filters its own examples (its weights normalized over its
  own examples, its own step-size factor α and norm clip, all from its own K); the results
  are summed with shares proportional to each device's weight mass Σ m∘s (its number of
  unmasked examples without weights: a plain mean when no example is masked). So the
  identity filter would give exactly the global weighted mean, and a norm clip M also
  bounds the combined update (a convex combination of vectors of norm ≤ M). Communication:
  one all-reduce of P numbers, the same as data-parallel SGD.
* ``gram="global"``: exact. Each device all-gathers every device's per-example gradients
  (dense: (n−1)·B·P numbers received per device; factored: the factors, see
  :mod:`nearprox.factored_grads`), computes its rows of the global K and all-gathers those rows
  (n·B² numbers) with the masks and weights, then solves the same global system and
  computes the same global α; its share of d is all-reduced (P numbers). The result equals
  the single-device result on the concatenated global batch. With ``sketch_dim``, the
  sketched leaves' features (B·k' numbers per leaf) are gathered in place of their factors
  (see ``sketch_dim`` below); the result equals the single-device sketched result on the
  concatenated batch (the sketch matrices are the same on every device).

Non-finite gradients: a NaN or Inf in an unmasked example's gradient reaches K and therefore
every coefficient, so the whole update becomes non-finite. To skip such steps, wrap what
follows the aggregation: ``optax.chain(scale_by_proximal(λ), optax.apply_if_finite(
optax.sgd(lr), max_consecutive_errors=k))`` (wrapping ``scale_by_proximal`` itself cannot work:
a skipped step would return zeros of the per-example shapes). Rows of masked examples are
zeroed before use, so anything in them (NaN included) has no effect; so are their weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nearprox import sketch, spectral_filter

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
    filter: str = "tikhonov",
    damping_mode: str = "absolute",
    axis_name: str | None = None,
    gram: str = "local",
    step_size: str = "none",
    step_size_damping: float | None = None,
    max_update_norm: float | None = None,
    sketch_dim: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Filters per-example gradients through K(K+λI)⁻¹ (or λ(K+λI)⁻¹) and aggregates them.

  The update is d = α·Gᵀc with c = f(K) w, w = m∘s / Σ m∘s (module docstring).

  Example weights. ``update(..., example_weights=s)`` replaces the uniform right-hand side
  m / Σm by m∘s / Σ m∘s; K and λ are unchanged. With the natural filter and
  s_n = ‖∇_{z_n} ℓ_n‖² (the squared norm of example n's loss gradient with respect to its
  logits z_n, :func:`nearprox.text.losses.ief_weights`), d is the damped improved
  empirical Fisher (iEF) direction Gᵀ(K+λI)⁻¹s of Wu et al. (2024), scaled by λ / Σ m∘s:
  undamped, Gᵀ K⁻¹ v changes example n's loss by v_n to first order, so the empirical
  Fisher (v = 1) asks every example for the same decrease however well it is already fit,
  while v = s asks for decreases proportional to ‖∇_{z_n} ℓ_n‖².

  Step size. α is computed from K and c only (no extra pass over the model), with g the
  plain masked mean gradient (what SGD would step) and F = GᵀG / B_eff the empirical Fisher:
  ``"none"`` (α = 1), ``"graft"`` (α = ‖g‖/‖d‖, d takes the mean gradient's norm, as
  grafting takes another optimizer's step norm) or ``"quadratic"`` (α = max(gᵀd, 0) /
  (dᵀFd + ρ‖d‖²), the minimizer along d of the damped quadratic model, as K-FAC chooses its
  step; ρ = λ / B_eff by default). ``max_update_norm`` M then shrinks α so that ‖αd‖ ≤ M.
  See :func:`nearprox.spectral_filter.step_scale` for the formulas. The learning rate of
  whatever follows in the chain still multiplies αd; an optimizer that normalizes its input
  (Adam) undoes most of a global scale α, so these rules matter most before SGD.

  Args:
    damping: λ > 0, or a schedule ``count -> λ``. With ``damping_mode="relative"`` it is the
      factor in λ = damping · trace(K) / B_eff (invariant to rescaling the loss).
    filter: "tikhonov" keeps directions many examples agree on (σ/(σ+λ)); "natural" is the
      damped natural gradient (λ/(σ+λ)). The two filtered gradients sum to the (weighted)
      mean gradient.
    damping_mode: "absolute" or "relative".
    axis_name: the mapped axis (pmap / shard_map) over which the batch is split, or None.
    gram: "local" (per-device Gram, results combined by weight mass) or "global" (exact Gram
      of the global batch); see the module docstring for their communication.
    step_size: "none", "graft" or "quadratic" (above).
    step_size_damping: ρ ≥ 0 of the "quadratic" rule in place of λ / B_eff.
    max_update_norm: M > 0 bounding ‖αd‖, or None.
    sketch_dim: None or 0 (default): the exact Gram. k ≥ 1: an estimated Gram K̂, in which
      every leaf whose exact Gram costs more than a sketch (large dense kernels, factored or
      dense) contributes Φ Φᵀ, Φ ∈ ℝ^{B×k'} its Kronecker sketch with k' ≈ k features
      (unbiased, with a variance bound; docs/method.md §2.9, :mod:`nearprox.sketch`); the
      rest stay exact. The sketch matrices are drawn from the step count, the same on every
      device. λ (relative mode), c, α and the statistics then come from K̂; the filtered
      gradient is still Gᵀc with the exact per-example gradients (factors). With
      ``gram="global"`` each device all-gathers its sketched features (B·k' numbers per
      sketched leaf) and the exact leaves' factors instead of all factors. For BERT-base
      (12 layers, hidden 768, FFN 3072, 2 labels) at B = 32, T = 128 and k = 4096, where the
      72 attention and FFN kernels are sketched (k' = 64·64 each), that is 32 · 714,628
      numbers = 91.5 MB sent per device per step (the embedding tables' factors are 41% of
      it), instead of the factors' 2.77 GB (32 · 21,653,380 numbers;
      :func:`nearprox.factored_grads.encoder_gathered_numbers`), plus n·B² numbers of K̂'s
      rows and the all-reduce of P numbers, as without a sketch.

  Returns:
    A transformation whose ``update(per_example_grads, state, params=None, *, mask=None,
    example_weights=None)`` takes the params pytree with a leading batch axis B on every leaf
    (or the factored form from ``nearprox.per_example_grads(..., method="factored")``), an
    optional 0/1 ``mask`` of shape [B] for padded examples and optional example weights
    s ≥ 0 of shape [B] (all zero: a zero update), and returns the filtered gradient (params'
    shapes). Its state's ``stats`` (:class:`nearprox.spectral_filter.FilterStats`) record
    λ, the spectrum's trace and effective rank, the kept fraction and α.

  References:
    Wu, Yu, Zhang & Woodland, `An Improved Empirical Fisher Approximation for Natural
    Gradient Descent <https://arxiv.org/abs/2406.06420>`_, NeurIPS 2024 (iEF weights).

    Martens & Grosse, `Optimizing Neural Networks with Kronecker-factored Approximate
    Curvature <https://arxiv.org/abs/1503.05671>`_, ICML 2015 (the quadratic-model
    step size).

    Gupta, Koren & Singer, `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, ICML 2018, and Agarwal, Anil, Hazan, Koren &
    Zhang, `Disentangling Adaptive Gradient Methods from Learning Rates
    <https://arxiv.org/abs/2002.11803>`_, 2020 (grafting: one update's direction with
    another's norm).

    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
    Fine-tuning <https://arxiv.org/abs/2410.16029>`_, 2024 (a Woodbury natural-gradient
    filter in front of Adam).
  """
  _check_damping(damping)
  _check_choice(filter, spectral_filter.FILTERS, "filter")
  _check_choice(damping_mode, spectral_filter.DAMPING_MODES, "damping_mode")
  _check_choice(gram, GRAM_MODES, "gram")
  _check_choice(step_size, spectral_filter.STEP_SIZES, "step_size")
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
        spectral_filter.FilterStats(zero, zero, zero, zero, jnp.ones((), jnp.float32)),
    )

  def update_fn(updates, state, params=None, *, mask=None, example_weights=None, **extra_args):
    del params, extra_args
    batch = spectral_filter.batch_size(updates)
    mask = _mask_for(mask, batch)
    weights = _weights_for(example_weights, batch)
    updates = spectral_filter.zero_masked_examples(updates, mask)
    damping_now = damping(state.count) if callable(damping) else damping
    if sketch_dim is None:
      parts, to_combine, gram_of = updates, updates, spectral_filter.gram_matrix
    else:
      # The global Gram is that of the concatenated batch: its size decides what is sketched.
      gram_batch = batch * jax.lax.axis_size(axis_name) if gram == "global" else batch
      parts = sketch.sketch_per_example(updates, state.count, sketch_dim, gram_batch)
      to_combine, gram_of = parts.for_combine, sketch.estimated_gram

    def solve(k, m, s):
      """c and its statistics, with the step-size factor α folded into c."""
      coeffs, stats = spectral_filter.filter_coefficients(
          k, m, damping_now, filter, damping_mode, weights=s
      )
      alpha = spectral_filter.step_scale(
          k, m, coeffs, stats.damping, step_size, step_size_damping, max_update_norm
      )
      return coeffs * alpha.astype(coeffs.dtype), stats._replace(step_scale=alpha)

    if axis_name is None:
      coeffs, stats = solve(gram_of(parts), mask, weights)
      filtered = spectral_filter.combine(to_combine, coeffs)
    elif gram == "local":
      coeffs, stats = solve(gram_of(parts), mask, weights)
      _, mass = spectral_filter.normalized_weights(mask, weights, coeffs.dtype)
      total = jax.lax.psum(mass, axis_name)
      share = jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)
      filtered = jax.lax.psum(spectral_filter.combine(to_combine, coeffs * share), axis_name)
      # Devices' statistics differ; their mean keeps the state the same on every device.
      stats = jax.lax.pmean(stats, axis_name)
    else:
      if sketch_dim is None:
        everyone = jax.lax.all_gather(updates, axis_name, tiled=True)
      else:  # the sketched features and the exact leaves, not the factors of sketched ones
        gathered = jax.lax.all_gather((parts.features, parts.exact), axis_name, tiled=True)
        everyone = parts._replace(features=gathered[0], exact=gathered[1], for_combine=None)
      my_rows = gram_of(parts, everyone)
      global_gram = jax.lax.all_gather(my_rows, axis_name, tiled=True)
      global_mask = jax.lax.all_gather(mask, axis_name, tiled=True)
      global_weights = (
          None if weights is None else jax.lax.all_gather(weights, axis_name, tiled=True)
      )
      global_coeffs, stats = solve(global_gram, global_mask, global_weights)
      start = jax.lax.axis_index(axis_name) * batch
      coeffs = jax.lax.dynamic_slice_in_dim(global_coeffs, start, batch)
      filtered = jax.lax.psum(spectral_filter.combine(to_combine, coeffs), axis_name)

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
  ``proximal_kwargs`` go to :func:`scale_by_proximal` (damping_mode, axis_name, gram,
  step_size, step_size_damping, max_update_norm, sketch_dim).
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
  the global norm over the whole pytree, computed in float32 or wider.
  """
  if callable(damping):
    raise ValueError(f"scale_by_proximal_norm takes a constant damping, got {damping!r}")
  _check_damping(damping)

  def update_fn(updates, state, params=None):
    del params
    leaves = jax.tree.leaves(updates)
    dtype = spectral_filter.compute_dtype(jnp.result_type(*leaves)) if leaves else jnp.float32
    sq_norm = sum(jnp.sum(jnp.square(x.astype(dtype))) for x in leaves)
    scale = sq_norm / (sq_norm + damping)
    return jax.tree.map(lambda x: (x.astype(dtype) * scale).astype(x.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
