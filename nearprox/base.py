"""What the modules of nearprox share: the factored-leaf interface, dtypes and exact rescaling.

Every other module imports this one and it imports none of them, so the package has no
import cycle.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp


class PerExampleFactor(abc.ABC):
  """A per-example gradient leaf in factored form: stands where one params leaf stands.

  Subclasses are registered pytrees whose array children all have the batch axis first.
  They implement the operations the filter needs, the products in float32 or wider.
  """

  @abc.abstractmethod
  def gram(self, other: PerExampleFactor) -> jax.Array:
    """Inner products ⟨g_i, g'_j⟩ between self's and other's examples: [B_self, B_other]."""

  @abc.abstractmethod
  def combine(self, coeffs: jax.Array) -> jax.Array:
    """Σ_i coeffs_i g_i, with the shape and dtype of the parameter leaf."""

  @abc.abstractmethod
  def log2_scale(self) -> jax.Array:
    """An int32 e with every entry of every g_i at most about 2^e in magnitude (up to a
    factor polynomial in the shapes), from the factors alone; 0 when they are not finite."""

  @abc.abstractmethod
  def rescale(self, exponent: jax.Array) -> PerExampleFactor:
    """The same leaf for the gradients 2^exponent · g_i (an int32 exponent), scaled exactly by
    powers of two but for entries that underflow."""

  def sketch(self, key: jax.Array, sketch_dim: int, batch: int) -> jax.Array | None:
    """Random features Φ [B, k'] with E[Φ Φᵀ] = this leaf's Gram, or None to keep the exact
    Gram (the default; :mod:`nearprox.sketch`). ``batch`` is the batch size the cost
    comparison is made for."""
    del key, sketch_dim, batch
    return None

  def for_sketched_combine(self) -> PerExampleFactor:
    """This leaf as it should combine once its Gram was sketched (default: unchanged)."""
    return self


def is_factor(x: Any) -> bool:
  return isinstance(x, PerExampleFactor)


def compute_dtype(dtype) -> jnp.dtype:
  """float32, or wider when the gradients already are (float64 under jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def exponent_range(dtype) -> tuple[int, int]:
  """(lo, hi): 2^lo … 2^(hi + 1) are normal numbers of ``dtype``'s compute dtype, with room
  for a value in [0.5, 1) times 2^hi to be multiplied by 2 without overflow."""
  info = jnp.finfo(compute_dtype(dtype))
  return int(info.minexp), int(info.maxexp) - 2


def log2_max_abs(x: jax.Array) -> jax.Array:
  """The int32 e with max|x| ∈ [2^(e−1), 2^e) (frexp's exponent); 0 for an all-zero or
  empty x and when the maximum is not finite (NaN and Inf then propagate on their own)."""
  largest = jnp.max(jnp.abs(x), initial=0).astype(compute_dtype(x.dtype))
  exponent = jnp.frexp(largest)[1].astype(jnp.int32)
  return jnp.where(jnp.isfinite(largest), exponent, 0)


def _power_of_two(exponent: jax.Array, dtype) -> jax.Array:
  """2^exponent exactly, built from its bits (exp2 may round); exponent within the normal range."""
  info = jnp.finfo(dtype)
  int_dtype = jnp.int64 if info.bits == 64 else jnp.int32
  bits = (exponent.astype(int_dtype) + (info.maxexp - 1)) << info.nmant
  return jax.lax.bitcast_convert_type(bits, dtype)


def _floor_third(n: jax.Array, lo: int, hi: int) -> jax.Array:
  """⌊n / 3⌋ of an int32 n in [lo, hi], by a multiplication and a shift.

  No integer division: XLA does not copy a division into the consumers of a scalar, so each
  one was a kernel of its own, several per leaf of the filter, and they doubled its compile
  time. For 0 ≤ m < 2^15, ⌊m / 3⌋ = (m · 43691) >> 17: 43691 / 2^17 = 1/3 + 1/(3 · 2^17), and
  m / (3 · 2^17) < 1/12 never carries m / 3 (fractional part at most 2/3) past an integer.
  """
  offset = -(lo // 3)  # n + 3 · offset ≥ 0
  if not 0 <= hi + 3 * offset < 1 << 15:
    raise ValueError(f"_floor_third: [{lo}, {hi}] is too wide")
  return (((n + 3 * offset) * 43691) >> 17) - offset


def times_power_of_two(x, exponent) -> jax.Array:
  """x · 2^exponent in x's compute dtype, exact unless the result overflows or underflows.

  Three multiplications by normal powers of two of the same direction (none subnormal, which
  a backend may flush to zero), so any int exponent works: beyond ±3 times the largest normal
  exponent every representable x overflows or underflows anyway.
  """
  dtype = compute_dtype(jnp.asarray(x).dtype)
  x = jnp.asarray(x, dtype)
  info = jnp.finfo(dtype)
  lo, hi = 3 * info.minexp, 3 * (info.maxexp - 1)
  exponent = jnp.clip(jnp.asarray(exponent, jnp.int32), lo, hi)
  first = _floor_third(exponent, lo, hi)
  second = (exponent - first) >> 1  # an arithmetic shift: ⌊(exponent − first) / 2⌋
  for part in (first, second, exponent - first - second):
    x = x * _power_of_two(part, dtype)
  return x


def check_aux(aux, batch: int) -> None:
  """Every leaf of ``loss_fn``'s aux output must have the batch axis (size ``batch``) first."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(aux)[0]:
    shape = getattr(leaf, "shape", ())
    if len(shape) == 0 or shape[0] != batch:
      raise ValueError(
          f"aux output {jax.tree_util.keystr(path) or '(root)'} of loss_fn has shape "
          f"{tuple(shape)}; with has_aux=True every aux array needs the batch axis "
          f"(size {batch}) first"
      )
