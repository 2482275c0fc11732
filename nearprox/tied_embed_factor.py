"""Per-example gradients of an embedding table that is also the output projection (weight
tying, ``nn.Embed.attend``): :class:`TiedEmbedFactor`, the lookups'
:class:`~nearprox.layer_factors.EmbedFactor` plus the projection's
:class:`~nearprox.layer_factors.DenseFactor`, with the cross terms of their Gram
(docs/method.md §2.4).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nearprox import sketch as sketch_lib
from nearprox.base import PerExampleFactor, compute_dtype
from nearprox.layer_factors import (
    _HIGHEST,
    GRAM_METHODS,
    DenseFactor,
    EmbedFactor,
    _check_same_kind,
)


def tied_embed_gram_costs(
    batch: int,
    lookup_length: int,
    projection_length: int,
    other_batch: int,
    other_lookup_length: int,
    other_projection_length: int,
    num_embeddings: int,
    features: int,
    same: bool,
) -> dict[str, int]:
  """Multiply-adds of a tied table's Gram (:class:`TiedEmbedFactor`) by each method.

  ghost:       B·B'·[T_l·T'_l·(D+1) + T_p·T'_p·(V+D) + (T_l·T'_p + T_p·T'_l)·(D+1)]
  materialize: (B·T_p + B'·T'_p)·V·D (only B·T_p·V·D when both sides are the same
               examples; the lookups' scatter-add is B·T_l·D) + B·B'·V·D
  """
  ghost = (
      batch
      * other_batch
      * (
          lookup_length * other_lookup_length * (features + 1)
          + projection_length * other_projection_length * (num_embeddings + features)
          + (lookup_length * other_projection_length + projection_length * other_lookup_length)
          * (features + 1)
      )
  )
  rows = batch * projection_length
  rows += 0 if same else other_batch * other_projection_length
  materialize = (rows + batch * other_batch) * num_embeddings * features
  return {"ghost": ghost, "materialize": materialize}


def _lookup_projection_gram(lookup: EmbedFactor, projection: DenseFactor) -> jax.Array:
  """⟨E_i, P_j⟩ = Σ_{t,s} δ^p_js[tok_it] (δ^l_it · q_js) [B_l, B_p]: a lookup's gradient
  E_i = Σ_t e_{tok_it} (δ^l_it)ᵀ against a projection's P_j = Σ_s (δ^p_js)ᵀ q_js."""
  dtype = compute_dtype(lookup.cotangents.dtype)
  inner = jnp.einsum(
      "itd,jsd->itjs",
      lookup.cotangents.astype(dtype),
      projection.cotangents.astype(dtype),
      precision=_HIGHEST,
  )
  picked = jnp.take(projection.inputs.astype(dtype), lookup.ids, axis=2)  # [B_p, T_p, B_l, T_l]
  return jnp.einsum("itjs,jsit->ij", inner, picked, precision=_HIGHEST)


@dataclasses.dataclass(frozen=True)
class TiedEmbedFactor(PerExampleFactor):
  """Per-example gradients of an embedding table E [V, D] that is also the output projection
  (weight tying, ``nn.Embed.attend``): g_i = E_i + P_i with

  * the lookups' part E_i = Σ_t e_{tok_it} (δ^l_it)ᵀ (an :class:`EmbedFactor`), and
  * the projection's part: attend(q) = q Eᵀ, logits [T_p, V], so P_i = Σ_s (δ^p_is)ᵀ q_is with
    δ^p the logits' cotangents: a :class:`DenseFactor` with inputs a = δ^p [B, T_p, V],
    cotangents q [B, T_p, D] and kernel shape (V, D).

  Gram: ⟨g_i, g'_j⟩ = ⟨E_i, E'_j⟩ + ⟨P_i, P'_j⟩ + ⟨E_i, P'_j⟩ + ⟨P_i, E'_j⟩, each part by the
  ghost formula, the cross terms ⟨E_i, P'_j⟩ = Σ_{t,s} δ^p'_js[tok_it] (δ^l_it · q'_js) by
  gathering the logits' cotangents at the looked-up tokens; or, when cheaper
  (:func:`tied_embed_gram_costs`), materialize the [B, V, D] gradients P_i + E_i (a matmul and
  a scatter-add) and take G G'ᵀ. Why not the simpler alternative, a :class:`DenseFactor` whose
  inputs concatenate one-hot(tok) [B, T_l, V] with δ^p: it holds B·T_l·V more numbers and
  spends B·T_l·V·D multiply-adds multiplying zeros (in its materializing Gram and its combine,
  both by factors of (T_l + T_p)/T_p), where this form pays B·T_l·D for the scatter.

  Sketch (``sketch_dim``): Φ_i = S₁ᵀ g_i S₂ is linear in g_i, so it is the Kronecker sketch
  (δ^p_iS₁)ᵀ(q_iS₂) of the projection plus Σ_t S₁[tok_it]ᵀ(S₂ᵀδ^l_it), with the matrices
  S₁ [V, k₁], S₂ [D, k₂] of :func:`nearprox.sketch.kronecker_features`; used when cheaper than
  the exact Gram. combine: the projection's Aᵀ(c∘Δ) plus the lookups' scatter-add. rescale:
  both parts by the same power of two.

  Attributes:
    lookup: the lookups' :class:`EmbedFactor` (T_l = 0 when the table is only projected with).
    projection: the output projection's :class:`DenseFactor` (``combine_method`` "factored").
    gram_method: "auto" (cheaper by :func:`tied_embed_gram_costs`), "ghost" or "materialize".
  """

  lookup: EmbedFactor
  projection: DenseFactor
  gram_method: str = "auto"

  def __post_init__(self):
    if self.gram_method not in ("auto",) + GRAM_METHODS:
      raise ValueError(
          f"gram_method must be 'auto' or one of {GRAM_METHODS}, " f"got {self.gram_method!r}"
      )
    shape = (self.lookup.num_embeddings, self.lookup.cotangents.shape[-1])
    if tuple(self.projection.kernel_shape) != shape:
      raise ValueError(
          f"TiedEmbedFactor: the projection's kernel shape {self.projection.kernel_shape} "
          f"must be the table's (num_embeddings, features) = {shape}"
      )

  @property
  def matrix_shape(self) -> tuple[int, int]:
    """(V, D): the per-example gradient as the matrix the sketch multiplies."""
    return self.projection.matrix_shape

  def _costs(self, other: TiedEmbedFactor, batch=None) -> dict[str, int]:
    b, tl = self.lookup.ids.shape
    ob, otl = other.lookup.ids.shape
    if batch is not None:
      b = ob = batch
    return tied_embed_gram_costs(
        b,
        tl,
        self.projection.inputs.shape[1],
        ob,
        otl,
        other.projection.inputs.shape[1],
        *self.matrix_shape,
        other is self or batch is not None,
    )

  def _method(self, other: TiedEmbedFactor) -> str:
    if self.gram_method != "auto":
      return self.gram_method
    costs = self._costs(other)
    return "ghost" if costs["ghost"] <= costs["materialize"] else "materialize"

  def _per_example(self) -> jax.Array:
    """[B, V · D]: the materialized per-example gradients P_i + E_i."""
    return self.projection._per_example() + self.lookup._per_example()

  def gram(self, other: TiedEmbedFactor) -> jax.Array:
    _check_same_kind(self, other)
    if self._method(other) == "materialize":
      mine = self._per_example()
      theirs = mine if other is self else other._per_example()
      return jnp.matmul(mine, theirs.T, precision=_HIGHEST)
    force = lambda f: dataclasses.replace(f, gram_method="ghost")
    lookup, projection = force(self.lookup), force(self.projection)
    other_lookup, other_projection = (
        (lookup, projection) if other is self else (force(other.lookup), force(other.projection))
    )
    mixed = _lookup_projection_gram(lookup, other_projection)
    mixed_back = mixed if other is self else _lookup_projection_gram(other_lookup, projection)
    return (
        lookup.gram(other_lookup)
        + projection.gram(other_projection)
        + mixed
        + mixed_back.T.astype(mixed.dtype)
    )

  def sketch(self, key: jax.Array, sketch_dim: int, batch: int) -> jax.Array | None:
    """Φ [B, k₁k₂] (class docstring) when it costs fewer multiply-adds than the exact Gram
    for ``batch`` examples; None otherwise."""
    rows, cols = self.matrix_shape
    k1, k2 = sketch_lib.side_dims(rows, cols, sketch_dim)
    if k1 >= rows and k2 >= cols:
      return None
    lookup_length = self.lookup.ids.shape[1]
    exact = min(self._costs(self, batch).values())
    cost = sketch_lib.dense_sketch_cost(
        batch, self.projection.inputs.shape[1], rows, cols, k1, k2
    ) + batch * lookup_length * (cols * k2 + k1 * k2)
    if cost >= exact:
      return None
    features = sketch_lib.kronecker_features(
        self.projection.inputs, self.projection.cotangents, key, k1, k2
    )
    dtype = features.dtype
    left = sketch_lib.projection(jax.random.fold_in(key, 0), rows, k1, dtype)
    right = sketch_lib.projection(jax.random.fold_in(key, 1), cols, k2, dtype)
    ids, cotangents = self.lookup.ids, self.lookup.cotangents.astype(dtype)
    rows_of = jax.nn.one_hot(ids, rows, dtype=dtype) if left is None else left[ids]
    right_side = cotangents if right is None else jnp.matmul(cotangents, right, precision=_HIGHEST)
    looked_up = jnp.einsum("btr,bts->brs", rows_of, right_side, precision=_HIGHEST)
    return features + looked_up.reshape(features.shape)

  def log2_scale(self) -> jax.Array:
    return jnp.maximum(self.lookup.log2_scale(), self.projection.log2_scale())

  def rescale(self, exponent: jax.Array) -> TiedEmbedFactor:
    return dataclasses.replace(
        self, lookup=self.lookup.rescale(exponent), projection=self.projection.rescale(exponent)
    )

  def combine(self, coeffs: jax.Array) -> jax.Array:
    table = self.projection.combine(coeffs).astype(compute_dtype(self.lookup.table_dtype))
    return (table + self.lookup.combine(coeffs)).astype(self.lookup.table_dtype)


jax.tree_util.register_dataclass(
    TiedEmbedFactor, data_fields=["lookup", "projection"], meta_fields=["gram_method"]
)
