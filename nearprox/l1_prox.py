"""L1 regularization as its proximal operator (soft-thresholding), an optax transformation.

The proximal gradient (ISTA) step for L(θ) + λ₁‖θ‖₁ with step size η is

    θ⁺ = prox_{ηλ₁‖·‖₁}(θ − η d) = S_{ηλ₁}(θ − η d),     S_τ(x) = sign(x)·max(|x| − τ, 0),

elementwise, with d = ∇L(θ) (Parikh & Boyd 2014, §4.2 and §6.5.2; Beck & Teboulle 2009). An
optax chain delivers u = −η d as its update, so :func:`soft_threshold_l1`, placed last, turns
it into S_{ηλ₁}(θ + u) − θ and ``optax.apply_updates`` lands on S_{ηλ₁}(θ + u). Unlike the
subgradient λ₁·sign(θ) added to d, which makes every weight oscillate around 0 by about ηλ₁
and never reach it, the prox sets every coordinate with |θ + u| ≤ ηλ₁ to exactly 0.

References:
  N. Parikh and S. Boyd, "Proximal Algorithms", Foundations and Trends in Optimization 1(3),
  2014.
  A. Beck and M. Teboulle, "A Fast Iterative Shrinkage-Thresholding Algorithm for Linear
  Inverse Problems", SIAM J. Imaging Sciences 2(1), 2009.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SoftThresholdL1State(NamedTuple):
  """The number of updates made: the learning-rate schedule's argument (as in
  ``optax.scale_by_schedule``, the first update uses ``learning_rate(0)``)."""

  count: jax.Array


def soft_threshold(x: jax.Array, threshold) -> jax.Array:
  """S_τ(x) = sign(x)·max(|x| − τ, 0), elementwise: the proximal operator of τ‖·‖₁."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)


def _check_constant(value, name: str) -> None:
  # Python numbers only: under optax.inject_hyperparams the values arrive as (traced) arrays,
  # checked when the transformation was first built from the Python numbers.
  if isinstance(value, numbers.Real) and not (math.isfinite(value) and value >= 0):
    raise ValueError(f"soft_threshold_l1: {name} must be finite and >= 0, got {value!r}")


def soft_threshold_l1(
    learning_rate: optax.ScalarOrSchedule,
    l1_weight: float,
    mask: Any | None = None,
) -> optax.GradientTransformation:
  """Turns the update u into S_{ηλ₁}(θ + u) − θ: the proximal step of λ₁‖θ_S‖₁ after it.

  Place it LAST in a chain, after the learning rate (so u = −η·direction), with the same
  learning rate η (a float, or the same ``optax`` schedule the optimizer uses; its own step
  count follows the optimizer's): ``optax.apply_updates(params, updates)`` then lands on the
  soft-thresholded point S_{ηλ₁}(θ + u), S_τ(x) = sign(x)·max(|x| − τ, 0) (:func:`soft_threshold`).
  ``mask`` (a pytree of bools or a function of params, as ``optax.add_decayed_weights``'):
  the leaves θ_S it applies to; the other leaves' updates pass unchanged. Training puts it on
  dense kernels only, like the L2 term (``nearprox.training.optimizers.kernel_mask``).

  The name says what it does: it soft-thresholds, the proximal operator of the L1 norm
  (Parikh & Boyd 2014, §6.5.2). It is not called "proximal_…" because in this library that
  word names the Gram filter (:func:`nearprox.scale_by_proximal`), a different operation.

  What the step means depends on what comes before it:

  * ``optax.sgd(η)`` (no momentum): exactly ISTA, θ⁺ = S_{ηλ₁}(θ − η∇L), whose fixed points
    are the minimizers (convex L) / stationary points of L(θ) + λ₁‖θ_S‖₁.
  * Any other direction d (momentum, the proximal filter of :func:`nearprox.proximal_sgd`,
    Adam): the same thresholding after a step along d, θ⁺ = S_{ηλ₁}(θ − η d). After Adam's
    preconditioning d = m̂/(√v̂ + ε) this is the prox of λ₁‖·‖₁ in the Euclidean metric, NOT in
    Adam's metric D = diag(√v̂ + ε) (which would threshold coordinate i by ηλ₁/D_i). At a fixed
    point with m̂ ≈ ∇L, ∇_iL ∈ −λ₁ D_i ∂|θ_i|: it is stationary for L + λ₁ Σ_i D_i|θ_i|, an L1
    reweighted by Adam's denominator, and each zero stays zero while |m̂_i|/(√v̂_i + ε) ≤ λ₁:
    Adam's normalized step is at most about 1, so λ₁ is measured against it, and λ₁ ≳ 1 can
    zero any weight (given enough Σηₜ). The zeros are exact either way.

  Args:
    learning_rate: η, a float ≥ 0 or a schedule of the step count (the optimizer's).
    l1_weight: λ₁ ≥ 0 (0: an identity on the updates).
    mask: which leaves are thresholded (None: all).

  Returns:
    An ``optax.GradientTransformation`` whose ``update`` needs ``params``; its state is a
    :class:`SoftThresholdL1State` (inside ``optax.masked``'s state when ``mask`` is given).
  """
  if not callable(learning_rate):
    _check_constant(learning_rate, "learning_rate")
  _check_constant(l1_weight, "l1_weight")

  def init_fn(params):
    del params
    return SoftThresholdL1State(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("soft_threshold_l1 needs the params: call update(updates, state, params)")
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def threshold(u, p):
      if u is None:
        return None
      tau = jnp.asarray(eta * l1_weight, dtype=p.dtype)
      return (soft_threshold(p + u.astype(p.dtype), tau) - p).astype(u.dtype)

    updates = jax.tree.map(threshold, updates, params, is_leaf=lambda x: x is None)
    return updates, SoftThresholdL1State(count=optax.safe_increment(state.count))

  transform = optax.GradientTransformation(init_fn, update_fn)
  return transform if mask is None else optax.masked(transform, mask)


def zero_fractions(params: Any, mask: Any | None = None) -> dict[str, jax.Array]:
  """The fraction of exact zeros among the selected leaves (``mask``: a pytree of bools or a
  function of params; None: all leaves), per top-level group and overall.

  Groups (layers): the path of a leaf up to its first component that ends in a digit
  (``bert/encoder/layer_3``: Flax names a stack's layers so), else its module's path
  (``bert/pooler/dense``, ``classifier``); keys ``"<group>"`` and ``"all"`` (the fraction of
  all selected elements). Float32 fractions; {} when nothing is selected."""
  selected = mask(params) if callable(mask) else mask
  if selected is None:
    selected = jax.tree.map(lambda _: True, params)
  counts: dict[str, list] = {}
  for (path, leaf), keep in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(selected)
  ):
    if not keep:
      continue
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    group = next(
        ("/".join(names[: i + 1]) for i, n in enumerate(names[:-1]) if n[-1:].isdigit()),
        "/".join(names[:-1]) or names[0],
    )
    zeros = jnp.sum(leaf == 0).astype(jnp.float32)
    counts.setdefault(group, []).append((zeros, leaf.size))
  if not counts:
    return {}
  fractions = {g: sum(z for z, _ in c) / sum(n for _, n in c) for g, c in counts.items()}
  total = sum(n for c in counts.values() for _, n in c)
  fractions["all"] = sum(z for c in counts.values() for z, _ in c) / total
  return fractions
