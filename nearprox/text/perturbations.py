"""Per-example perturbation geometry for adversarial objectives and attacks.

Arrays are [B, T, H] (a perturbation δ of the word embeddings, or its gradient); norms are
over (T, H) per example, never across the batch, so example i's result depends on example i
only (what :mod:`nearprox.text.objectives` needs for per-example losses). Used by the
objectives (FGM, PGD, SMART) and by the robustness attacks (:mod:`nearprox.text.robustness`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from nearprox.text.losses import Batch

NORMS = ("l2", "linf")


def token_mask(batch: Batch, dtype=jnp.float32) -> jax.Array:
  """[B, T, 1]: 1 on real tokens, 0 on padding (``attention_mask``; all ones if absent)."""
  mask = batch.get("attention_mask")
  if mask is None:
    mask = jnp.ones(batch["input_ids"].shape)
  return mask.astype(dtype)[..., None]


def per_example_norm(x: jax.Array, norm: str) -> jax.Array:
  """‖x_i‖ over all non-batch axes, shape [B]: Euclidean ("l2") or max-abs ("linf")."""
  flat = x.reshape(x.shape[0], -1)
  if norm == "l2":
    return jnp.sqrt(jnp.sum(jnp.square(flat), axis=-1))
  if norm == "linf":
    return jnp.max(jnp.abs(flat), axis=-1)
  raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def _per_example(v: jax.Array, like: jax.Array) -> jax.Array:
  return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _safe_scale(x: jax.Array, length: jax.Array) -> jax.Array:
  """x / length, and 0 where length == 0 (a zero gradient gives a zero step, not NaN)."""
  safe = jnp.where(length > 0, length, 1.0)
  return jnp.where(length > 0, x / safe, 0.0)


def steepest_ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """argmax_{‖u‖≤1} ⟨u, g⟩ per example: g/‖g‖₂ ("l2") or sign(g) ("linf")."""
  if norm == "l2":
    return _safe_scale(grad, _per_example(per_example_norm(grad, "l2"), grad))
  if norm == "linf":
    return jnp.sign(grad)
  raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def project_to_ball(delta: jax.Array, epsilon, norm: str) -> jax.Array:
  """Euclidean projection of each example's δ_i onto {‖δ_i‖ ≤ ε} (ℓ2: rescale; ℓ∞: clip)."""
  if norm == "l2":
    length = _per_example(per_example_norm(delta, "l2"), delta)
    return jnp.where(length > epsilon, delta * _safe_scale(epsilon, length), delta)
  if norm == "linf":
    return jnp.clip(delta, -epsilon, epsilon)
  raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def random_ball_point(keys, shape, epsilon, norm: str, mask: jax.Array) -> jax.Array:
  """A uniform random point of each example's ε-ball over its unmasked entries.

  ℓ∞: U(−ε, ε) per entry. ℓ2: Gaussian direction, radius ε·u^{1/n} (n = unmasked entries).
  ``keys`` are per-example, so example i's point depends on its key only.
  """
  one_shape = tuple(shape[1:])
  if norm == "linf":
    draw = jax.vmap(lambda k: jax.random.uniform(k, one_shape, minval=-1.0, maxval=1.0))
    return epsilon * draw(keys) * mask
  if norm == "l2":

    def draw(key):
      key_dir, key_radius = jax.random.split(key)
      return jax.random.normal(key_dir, one_shape), jax.random.uniform(key_radius)

    direction, u = jax.vmap(draw)(keys)
    direction = steepest_ascent_direction(direction * mask, "l2")
    n = jnp.sum(jnp.broadcast_to(mask, shape).reshape(shape[0], -1), axis=-1)
    radius = epsilon * u ** (1.0 / jnp.maximum(n, 1.0))
    return direction * _per_example(radius, direction)
  raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


SMART_NORM_EPSILON = 1e-6  # mt-dnn SmartPerturbation(epsilon=1e-6)


def per_token_normalize(grad: jax.Array, norm: str) -> jax.Array:
  """mt-dnn's SMART direction g/(‖g‖ + 1e-6), per token (over the hidden axis), ℓ∞ or ℓ2.

  The additive 1e-6 (mt-dnn) keeps a round-off-sized gradient (as at δ = 0, where the KL
  has its minimum) from being blown up to a full step.
  """
  if norm == "linf":
    length = jnp.max(jnp.abs(grad), axis=-1, keepdims=True)
  elif norm == "l2":
    length = jnp.sqrt(jnp.sum(jnp.square(grad), axis=-1, keepdims=True))
  else:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
  return grad / (length + SMART_NORM_EPSILON)


def sum_grad(objective: Callable[[jax.Array], jax.Array]):
  """δ ↦ ∂(Σ_i objective(δ)_i)/∂δ = (∂objective_i/∂δ_i)_i for an example-separable model."""
  return jax.grad(lambda delta: jnp.sum(objective(delta)))


def pgd_ascent(objective, delta, grad, mask, *, epsilon, step_size, num_steps, norm):
  """K projected steepest-ascent steps on Σ_i objective(δ)_i from δ (per-example ball).

  Args:
    objective: δ [B,T,H] → per-example losses [B] (the thing to maximize).
    delta: the start point (zeros or a random ball point), zero on padding.
    grad: ∂objective/∂δ at ``delta`` if already known (shared with a clean pass), or None.
    mask: [B, T, 1] token mask; padding entries of δ stay exactly 0.
  Returns:
    δ after ``num_steps`` steps, inside the ε-ball, zero on padding.
  """
  grad_fn = sum_grad(objective)

  def step(delta, grad):
    moved = delta + step_size * steepest_ascent_direction(grad * mask, norm)
    return project_to_ball(moved, epsilon, norm) * mask

  if grad is None:
    grad = grad_fn(delta)
  delta = step(delta, grad)
  return jax.lax.fori_loop(1, num_steps, lambda _, d: step(d, grad_fn(d)), delta)
