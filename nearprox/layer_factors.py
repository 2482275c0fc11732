"""Factored per-example gradients of dense and embedding layers (leaves of the fast path).

The mathematics and the cost trade-offs are in docs/method.md §2.1–§2.4.

A dense layer applied to a sequence of T positions, with inputs a_i (T × d_in) and output
cotangents δ_i (T × d_out) for example i, has the per-example kernel gradient g_i = a_iᵀ δ_i.
:class:`DenseFactor` keeps (a, δ) instead of the B × d_in × d_out gradients and implements
the operations of :class:`nearprox.base.PerExampleFactor`:

* Gram: ⟨g_i, g'_j⟩ = Σ_{t,s} (a_it·a'_js)(δ_it·δ'_js) = sum((A_i A'_jᵀ) ∘ (Δ_i Δ'_jᵀ)), the
  "ghost" formula, ~B·B'·T·T'·(d_in+d_out) multiply-adds; or materialize each side's g_i
  (B·T·d_in·d_out) and take G G'ᵀ (B·B'·d_in·d_out). :func:`dense_gram_method` picks the
  cheaper from the static shapes; both are float32 at HIGHEST precision. A large G is formed
  in cache-sized blocks of columns (:class:`GramBlocking`), each multiplied into K at once.
* Sketch (``scale_by_proximal(sketch_dim=k)``): the Kronecker sketch (A_iS₁)ᵀ(Δ_iS₂) of
  :mod:`nearprox.sketch`, when it costs less than the exact Gram (:meth:`DenseFactor.sketch`).
* combine: Σ_i c_i g_i = Aᵀ(c ∘ Δ), one contraction over all B·T positions
  (B·T·d_in·d_out); or, with ``combine_method="materialized"``, cᵀG from the G that the
  materializing Gram computed (B·d_in·d_out, but G stays alive until the combine).
* rescale: a and δ times powers of two whose product is the requested one, a's largest
  entries brought to about 1 (the scale-free Gram of docs/method.md §1.7).

An embedding table looked up at tokens tok_it has the sparse per-example gradient
g_i = Σ_t e_{tok_it} δ_itᵀ. :class:`EmbedFactor` keeps (tok, δ):

* Gram: ⟨g_i, g'_j⟩ = Σ_{t,s} [tok_it = tok'_js] δ_it·δ'_js (the ghost formula with one-hot
  inputs), or materialize the [B, V, D] gradients when the table is small (position and
  token-type tables); chosen by :func:`embed_gram_method`.
* combine: a scatter-add of c_i δ_it into rows tok_it.
* no sketch: a table keeps its exact Gram under ``sketch_dim`` (docs/method.md §2.9).

A table that is also the output projection (``Embed.attend``, weight tying) has
g_i = Σ_t e_{tok_it} δ_itᵀ + Σ_s ε_isᵀ q_is (ε the logits' cotangents, q the queries):
:class:`nearprox.tied_embed_factor.TiedEmbedFactor` holds the two parts, an EmbedFactor and a
DenseFactor, and adds their cross terms to the Gram.

A layer called several times (a shared module) contributes Σ_calls a_callᵀ δ_call, which is
again of the form Aᵀ Δ with the calls' positions concatenated along the T axis, so one factor
holds all its calls.

Both classes are registered pytrees whose array children have the batch axis first
(``jax.tree_util.register_dataclass``; shapes and dtypes are static metadata), so masking,
slicing and ``lax.all_gather`` act on them example-wise.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nearprox import sketch as sketch_lib
from nearprox.base import (
    PerExampleFactor,
    compute_dtype,
    exponent_range,
    log2_max_abs,
    times_power_of_two,
)

_HIGHEST = jax.lax.Precision.HIGHEST

GRAM_METHODS = ("ghost", "materialize")
COMBINE_METHODS = ("factored", "materialized")


def _check_same_kind(self, other) -> None:
  if type(other) is not type(self):
    raise ValueError(
        f"cannot take inner products between a {type(self).__name__} and a "
        f"{type(other).__name__}; the two per-example pytrees must match"
    )


def dense_gram_costs(
    batch: int, length: int, other_batch: int, other_length: int, d_in: int, d_out: int, same: bool
) -> dict[str, int]:
  """Multiply-adds of a dense layer's Gram by each method.

  ghost:       B·B'·T·T'·(d_in + d_out)
  materialize: (B·T + B'·T')·d_in·d_out (only B·T·d_in·d_out when both sides are the same
               examples) + B·B'·d_in·d_out
  """
  ghost = batch * other_batch * length * other_length * (d_in + d_out)
  per_example = batch * length if same else batch * length + other_batch * other_length
  return {"ghost": ghost, "materialize": (per_example + batch * other_batch) * d_in * d_out}


def dense_gram_method(
    batch: int, length: int, other_batch: int, other_length: int, d_in: int, d_out: int, same: bool
) -> str:
  """ "ghost" or "materialize", whichever needs fewer multiply-adds (:func:`dense_gram_costs`).

  For one batch against itself, ghost wins when B·T²·(d_in + d_out) < (T + B)·d_in·d_out
  (docs/method.md §2.2; its memory crossover is 2·B·T² < d_in·d_out, not used here).
  """
  costs = dense_gram_costs(batch, length, other_batch, other_length, d_in, d_out, same)
  return "ghost" if costs["ghost"] <= costs["materialize"] else "materialize"


def embed_gram_method(
    batch: int,
    length: int,
    other_batch: int,
    other_length: int,
    num_embeddings: int,
    features: int,
    same: bool,
) -> str:
  """ "ghost" (token-equality mask) or "materialize" ([B, V, D] gradients), by cost."""
  ghost = batch * other_batch * length * other_length * (features + 1)
  rows = batch if same else batch + other_batch
  materialize = (rows + batch * other_batch) * num_embeddings * features
  return "ghost" if ghost <= materialize else "materialize"


class GramBlocking(NamedTuple):
  """When the materializing Gram forms the per-example kernel gradients G (B·d_in·d_out
  numbers) in blocks of columns of its longer side, each multiplied into K while it is still in
  cache instead of G going to memory and back (docs/method.md §2.7).

  Attributes:
    block_numbers: about how many numbers one block holds; 0 turns the blocking off.
    blocked_above: G is blocked only when it has more than this many numbers.
    backends: the ``jax.default_backend()`` values it is done on (on a GPU the loop over
      blocks made the step slower than forming G whole).
  """

  block_numbers: int = 1 << 22
  blocked_above: int = 1 << 23
  backends: tuple[str, ...] = ("cpu",)


def _gram_blocks(batch: int, d_in: int, d_out: int, blocking: GramBlocking) -> int:
  """Number of blocks of the materializing Gram along max(d_in, d_out) (1: not blocked)."""
  if (
      blocking.block_numbers <= 0
      or batch * d_in * d_out <= blocking.blocked_above
      or jax.default_backend() not in blocking.backends
  ):
    return 1
  width = max(1, blocking.block_numbers // (batch * min(d_in, d_out)))
  return -(-max(d_in, d_out) // width)


def _blocked_materialized_gram(mine: DenseFactor, other: DenseFactor | None, blocks: int):
  """Σ_c G_c G'_cᵀ over ``blocks`` blocks c of columns of the longer side of the per-example
  gradients G_i = A_iᵀΔ_i: the materializing Gram without ever holding all of G (``other``
  None: the same examples). ⟨G_i, G_j⟩ = ⟨G_iᵀ, G_jᵀ⟩, so a long input side is blocked by
  exchanging the roles of A and Δ."""
  dtype = compute_dtype(mine.cotangents.dtype)
  swap = mine.inputs.shape[-1] > mine.cotangents.shape[-1]

  def sides(factor):  # (short side, long side), float32 or wider
    a, d = factor.inputs.astype(dtype), factor.cotangents.astype(dtype)
    return (d, a) if swap else (a, d)

  long = max(mine.inputs.shape[-1], mine.cotangents.shape[-1])
  width = -(-long // blocks)

  def split(x):  # [B, T, long] -> [blocks, B, T, width], zero-padded columns
    if blocks * width != long:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, blocks * width - long)))
    return jnp.moveaxis(x.reshape(x.shape[:2] + (blocks, width)), 2, 0)

  def grads(short, block):
    g = jnp.einsum("btk,btl->bkl", short, block, precision=_HIGHEST)
    return g.reshape(g.shape[0], -1)

  short, long_side = sides(mine)
  if other is None:

    def body(total, block):
      g = grads(short, block)
      return total + jnp.matmul(g, g.T, precision=_HIGHEST), None

    xs, shape = split(long_side), (short.shape[0], short.shape[0])
  else:
    other_short, other_long = sides(other)

    def body(total, block):
      g, h = grads(short, block[0]), grads(other_short, block[1])
      return total + jnp.matmul(g, h.T, precision=_HIGHEST), None

    xs, shape = (split(long_side), split(other_long)), (short.shape[0], other_short.shape[0])
  return jax.lax.scan(body, jnp.zeros(shape, dtype), xs)[0]


@dataclasses.dataclass(frozen=True)
class DenseFactor(PerExampleFactor):
  """Per-example gradients a_iᵀ δ_i of one dense kernel.

  Attributes:
    inputs: a, [B, T, d_in]: the layer's inputs with its contracted axes flattened last and
      every other non-batch axis (and every call of a shared layer) flattened into T.
    cotangents: δ, [B, T, d_out]: cotangents of the layer's outputs, features flattened.
    kernel_shape: the kernel's shape, (*input feature dims, *output feature dims), whose
      row-major flattening is [d_in, d_out].
    kernel_dtype: the kernel's dtype (the dtype of ``combine``'s result).
    gram_method: "auto" (by cost, :func:`dense_gram_method`), "ghost" or "materialize".
    combine_method: "factored": Aᵀ(c ∘ Δ), B·T·d_in·d_out multiply-adds and no memory
      beyond the factors; "materialized": cᵀG from the per-example gradients G that the
      materializing Gram computes anyway (XLA's common-subexpression elimination shares
      them), B·d_in·d_out multiply-adds, but G (B·d_in·d_out numbers) then stays alive from
      the Gram to the combine. Used only when the Gram materializes.
    gram_blocking: when a materializing Gram forms G in blocks (:class:`GramBlocking`).
  """

  inputs: jax.Array
  cotangents: jax.Array
  kernel_shape: tuple[int, ...]
  kernel_dtype: Any
  gram_method: str = "auto"
  combine_method: str = "factored"
  gram_blocking: GramBlocking = GramBlocking()

  def __post_init__(self):
    if self.gram_method not in ("auto",) + GRAM_METHODS:
      raise ValueError(
          f"gram_method must be 'auto' or one of {GRAM_METHODS}, " f"got {self.gram_method!r}"
      )
    if self.combine_method not in COMBINE_METHODS:
      raise ValueError(
          f"combine_method must be one of {COMBINE_METHODS}, " f"got {self.combine_method!r}"
      )

  def _method(self, other: DenseFactor) -> str:
    if self.gram_method != "auto":
      return self.gram_method
    batch, length, d_in = self.inputs.shape
    other_batch, other_length, _ = other.inputs.shape
    return dense_gram_method(
        batch, length, other_batch, other_length, d_in, self.cotangents.shape[-1], other is self
    )

  def _per_example(self) -> jax.Array:
    """G, [B, d_in · d_out]: the materialized per-example kernel gradients."""
    dtype = compute_dtype(self.cotangents.dtype)
    grads = jnp.einsum(
        "btk,btl->bkl", self.inputs.astype(dtype), self.cotangents.astype(dtype), precision=_HIGHEST
    )
    return grads.reshape(grads.shape[0], -1)

  def gram(self, other: DenseFactor) -> jax.Array:
    _check_same_kind(self, other)
    dtype = compute_dtype(self.cotangents.dtype)
    if self._method(other) == "materialize":
      batch = max(self.inputs.shape[0], other.inputs.shape[0])
      blocks = _gram_blocks(
          batch, self.inputs.shape[-1], self.cotangents.shape[-1], self.gram_blocking
      )
      if self.combine_method == "factored" and blocks > 1:
        return _blocked_materialized_gram(self, None if other is self else other, blocks)
      mine = self._per_example()
      theirs = mine if other is self else other._per_example()
      return jnp.matmul(mine, theirs.T, precision=_HIGHEST)
    # [B, T, B', T'] is the plain matmul's output order: no transpose before the product.
    inner_a = jnp.einsum(
        "itk,jsk->itjs", self.inputs.astype(dtype), other.inputs.astype(dtype), precision=_HIGHEST
    )
    inner_d = jnp.einsum(
        "itl,jsl->itjs",
        self.cotangents.astype(dtype),
        other.cotangents.astype(dtype),
        precision=_HIGHEST,
    )
    return jnp.sum(inner_a * inner_d, axis=(1, 3))

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """(d_in, d_out): the per-example gradient as the matrix the sketch multiplies."""
    return self.inputs.shape[-1], self.cotangents.shape[-1]

  def sketch(self, key: jax.Array, sketch_dim: int, batch: int) -> jax.Array | None:
    """The Kronecker sketch (A_iS₁)ᵀ(Δ_iS₂) [B, k₁k₂] (:func:`nearprox.sketch.kronecker_features`)
    when it costs fewer multiply-adds than the exact Gram plus the difference in combine cost
    (a sketched kernel combines as Aᵀ(c∘Δ): a "materialized" combine would need its G), for
    ``batch`` examples; None otherwise."""
    _, length, d_in = self.inputs.shape
    d_out = self.cotangents.shape[-1]
    k1, k2 = sketch_lib.side_dims(d_in, d_out, sketch_dim)
    if k1 >= d_in and k2 >= d_out:
      return None  # the "sketch" would be the gradient itself
    method = self.gram_method
    if method == "auto":
      method = dense_gram_method(batch, length, batch, length, d_in, d_out, True)
    exact = dense_gram_costs(batch, length, batch, length, d_in, d_out, True)[method]
    factored_combine = batch * length * d_in * d_out
    kept = self.combine_method == "materialized" and method == "materialize"
    exact += batch * d_in * d_out if kept else factored_combine
    cost = sketch_lib.dense_sketch_cost(batch, length, d_in, d_out, k1, k2) + factored_combine
    if cost >= exact:
      return None
    return sketch_lib.kronecker_features(self.inputs, self.cotangents, key, k1, k2)

  def for_sketched_combine(self) -> DenseFactor:
    return dataclasses.replace(self, combine_method="factored")

  def log2_scale(self) -> jax.Array:
    """|g_i| ≤ T·max|a|·max|δ| entrywise: the sum of the two factors' exponents."""
    return log2_max_abs(self.inputs) + log2_max_abs(self.cotangents)

  def rescale(self, exponent: jax.Array) -> DenseFactor:
    """a times 2^−e_a (its own largest entries to about 1) and δ times 2^(exponent + e_a)."""
    lo, hi = exponent_range(self.inputs.dtype)
    inputs_exponent = jnp.clip(log2_max_abs(self.inputs), lo, hi)
    return dataclasses.replace(
        self,
        inputs=times_power_of_two(self.inputs, -inputs_exponent).astype(self.inputs.dtype),
        cotangents=times_power_of_two(self.cotangents, exponent + inputs_exponent).astype(
            self.cotangents.dtype
        ),
    )

  def combine(self, coeffs: jax.Array) -> jax.Array:
    dtype = compute_dtype(self.cotangents.dtype)
    if self.combine_method == "materialized" and self._method(self) == "materialize":
      out = jnp.matmul(coeffs.astype(dtype), self._per_example(), precision=_HIGHEST)
    else:
      weighted = self.cotangents.astype(dtype) * coeffs.astype(dtype)[:, None, None]
      out = jnp.einsum("btk,btl->kl", self.inputs.astype(dtype), weighted, precision=_HIGHEST)
    return out.reshape(self.kernel_shape).astype(self.kernel_dtype)


@dataclasses.dataclass(frozen=True)
class EmbedFactor(PerExampleFactor):
  """Per-example gradients Σ_t e_{tok_it} δ_itᵀ of one embedding table [V, D].

  Attributes:
    ids: tok, [B, T] integer rows looked up (every call of a shared table concatenated).
    cotangents: δ, [B, T, D]: cotangents of the looked-up vectors.
    num_embeddings: V.
    table_dtype: the table's dtype.
    gram_method: "auto" (:func:`embed_gram_method`), "ghost" or "materialize".
  """

  ids: jax.Array
  cotangents: jax.Array
  num_embeddings: int
  table_dtype: Any
  gram_method: str = "auto"

  def __post_init__(self):
    if self.gram_method not in ("auto",) + GRAM_METHODS:
      raise ValueError(
          f"gram_method must be 'auto' or one of {GRAM_METHODS}, " f"got {self.gram_method!r}"
      )

  def _method(self, other: EmbedFactor) -> str:
    if self.gram_method != "auto":
      return self.gram_method
    batch, length, features = self.cotangents.shape
    return embed_gram_method(
        batch,
        length,
        other.ids.shape[0],
        other.ids.shape[1],
        self.num_embeddings,
        features,
        other is self,
    )

  def _per_example(self) -> jax.Array:
    """[B, V · D]: the materialized per-example table gradients (scatter-add)."""
    batch, length, features = self.cotangents.shape
    dtype = compute_dtype(self.cotangents.dtype)
    rows = jnp.arange(batch, dtype=self.ids.dtype)[:, None] * self.num_embeddings + self.ids
    grads = jax.ops.segment_sum(
        self.cotangents.astype(dtype).reshape(-1, features),
        rows.reshape(-1),
        num_segments=batch * self.num_embeddings,
    )
    return grads.reshape(batch, -1)

  def gram(self, other: EmbedFactor) -> jax.Array:
    _check_same_kind(self, other)
    dtype = compute_dtype(self.cotangents.dtype)
    if self._method(other) == "materialize":
      mine = self._per_example()
      theirs = mine if other is self else other._per_example()
      return jnp.matmul(mine, theirs.T, precision=_HIGHEST)
    same_row = self.ids[:, :, None, None] == other.ids[None, None, :, :]
    inner_d = jnp.einsum(
        "itd,jsd->itjs",
        self.cotangents.astype(dtype),
        other.cotangents.astype(dtype),
        precision=_HIGHEST,
    )
    return jnp.sum(jnp.where(same_row, inner_d, 0.0), axis=(1, 3))

  def log2_scale(self) -> jax.Array:
    return log2_max_abs(self.cotangents)

  def rescale(self, exponent: jax.Array) -> EmbedFactor:
    cotangents = times_power_of_two(self.cotangents, exponent).astype(self.cotangents.dtype)
    return dataclasses.replace(self, cotangents=cotangents)

  def combine(self, coeffs: jax.Array) -> jax.Array:
    dtype = compute_dtype(self.cotangents.dtype)
    features = self.cotangents.shape[-1]
    weighted = self.cotangents.astype(dtype) * coeffs.astype(dtype)[:, None, None]
    table = jax.ops.segment_sum(
        weighted.reshape(-1, features), self.ids.reshape(-1), num_segments=self.num_embeddings
    )
    return table.astype(self.table_dtype)


for _cls in (DenseFactor, EmbedFactor):
  _data = [f.name for f in dataclasses.fields(_cls) if f.name in ("inputs", "ids", "cotangents")]
  jax.tree_util.register_dataclass(
      _cls,
      data_fields=_data,
      meta_fields=[f.name for f in dataclasses.fields(_cls) if f.name not in _data],
  )


def factor_nbytes(per_example_grads) -> int:
  """Bytes of every array in a per-example pytree (factored or dense): what an all_gather of it
  moves per participating device."""
  return int(
      sum(
          np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
          for x in jax.tree.leaves(per_example_grads)
      )
  )
