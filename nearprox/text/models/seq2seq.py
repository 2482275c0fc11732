"""An encoder–decoder Transformer (Vaswani et al. 2017) in Flax linen, for translation.

Pre-layer-norm blocks (Xiong et al. 2020): ``x + dropout(sublayer(LayerNorm(x)))``, and a final
LayerNorm after each stack. One token embedding E [V, H] is shared by the source and the
target and tied to the output projection, logits = h Eᵀ (``nn.Embed.attend``; Press & Wolf
2017). Looked-up vectors are multiplied by √H, as in Vaswani et al. §3.4, so that with E's
initialisation N(0, 1/H) they have unit-variance entries like the positions. Positions are
the fixed sinusoids of Vaswani et al. §3.5 (no parameters; any length up to
``max_length``), added after the scaling.

Attention is ``nn.MultiHeadDotProductAttention`` (its q, k, v and output projections are
``nn.DenseGeneral``): encoder self-attention masks padded source keys; decoder
self-attention is causal and masks padded target keys; cross-attention takes queries from
the decoder and keys and values from the encoder memory, masking padded source keys. Padded
query positions compute outputs that no real position reads (their keys are masked), so a
padded position never changes another position's logits.

Dropout (rate ``dropout_rate``) acts on the embedding sums, each sub-layer's output before
the residual sum (Vaswani et al. §5.4) and the feed-forward's hidden layer, with a mask per
example drawn from that example's own key (:class:`ExampleDropout`), so no vmap over
examples is needed and example i's outputs depend on example i alone. The attention weights
are not dropped (fairseq's transformer default, attention_dropout=0; flax's attention
dropout would draw one mask for the batch from one rng).

Every parameter lives in ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Embed`` / ``nn.LayerNorm``
called with the batch axis first, so the factored per-example gradients
(:mod:`nearprox.factored_grads`) see every leaf, the tied projection ``Embed.attend``
included. No operation mixes the examples of a batch.

Token ids: pad 0, bos 1, eos 2 (``Seq2SeqConfig``). The source is x + [eos], the target input
[bos] + y, the target output y + [eos], each padded with ``pad_id``.

References:
  Vaswani et al., "Attention Is All You Need", NeurIPS 2017, arXiv 1706.03762.
  Xiong et al., "On Layer Normalization in the Transformer Architecture", ICML 2020,
  arXiv 2002.04745.
  Press & Wolf, "Using the Output Embedding to Improve Language Models", EACL 2017,
  arXiv 1608.05859.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nearprox.text.models.dropout import ExampleDropout, check_dropout_keys

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """Hyper-parameters of :class:`Seq2SeqTransformer` (defaults: 3 + 3 layers, d = 256).

  ``max_length`` is the longest source or target sequence (the sinusoid table's length).
  """

  vocab_size: int
  num_encoder_layers: int = 3
  num_decoder_layers: int = 3
  hidden_size: int = 256
  num_heads: int = 4
  intermediate_size: int = 1024
  dropout_rate: float = 0.1
  max_length: int = 128
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "num_heads", "intermediate_size", "max_length"):
      if int(getattr(self, name)) < 1:
        raise ValueError(f"Seq2SeqConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("num_encoder_layers", "num_decoder_layers"):
      if int(getattr(self, name)) < 0:
        raise ValueError(f"Seq2SeqConfig.{name} must be >= 0, got {getattr(self, name)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"Seq2SeqConfig.hidden_size ({self.hidden_size}) must be a multiple of "
          f"num_heads ({self.num_heads})"
      )
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"Seq2SeqConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}")
    ids = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
    for name, value in ids.items():
      if not 0 <= value < self.vocab_size:
        raise ValueError(
            f"Seq2SeqConfig.{name}={value} is outside the vocabulary [0, {self.vocab_size})"
        )
    if len(set(ids.values())) != 3:
      raise ValueError(f"Seq2SeqConfig pad, bos and eos ids must differ, got {ids}")


def sinusoidal_positions(length: int, features: int) -> np.ndarray:
  """[length, features]: PE(p, 2k) = sin(p / 10000^(2k/H)), PE(p, 2k+1) = cos(same)."""
  position = np.arange(length, dtype=np.float64)[:, None]
  rates = np.exp(-math.log(10000.0) * np.arange(0, features, 2, dtype=np.float64) / features)
  table = np.zeros((length, features), np.float64)
  table[:, 0::2] = np.sin(position * rates)
  table[:, 1::2] = np.cos(position * rates[: features // 2])
  return table.astype(np.float32)


class _Block(nn.Module):
  """Base: config and dtypes, and the standard layers built from them."""

  config: Seq2SeqConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _layer_norm(self, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  def _attention(self, name: str, decode: bool = False) -> nn.MultiHeadDotProductAttention:
    # No dropout on the attention weights (dropout_rate=0): Vaswani et al. §5.4 drop only the
    # sub-layer outputs and the embedding sums, and fairseq's transformer defaults to
    # attention_dropout=0. (Flax's attention dropout would also draw one mask for the whole
    # batch from one rng, not one per example.)
    return nn.MultiHeadDotProductAttention(
        num_heads=self.config.num_heads,
        dropout_rate=0.0,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        decode=decode,
        name=name,
    )

  def _dropout(self, x, keys, deterministic: bool):
    """Per-example dropout (example i's mask from ``keys[i]``; :class:`ExampleDropout`)."""
    return ExampleDropout(self.config.dropout_rate)(x, keys, deterministic)

  def _feed_forward(self, x, keys, deterministic: bool):
    """dense(dropout(relu(dense(x)))), inner width ``intermediate_size``."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.relu(nn.Dense(self.config.intermediate_size, **kw, name="ff_in")(x))
    x = self._dropout(x, keys, deterministic)
    return nn.Dense(self.config.hidden_size, **kw, name="ff_out")(x)


class EncoderLayer(_Block):
  """x + self_attention(LN(x)), then x + feed_forward(LN(x)); ``key_mask`` [B, 1, 1, S]."""

  @nn.compact
  def __call__(self, x, key_mask, *, deterministic: bool, dropout_keys=None):
    h = self._layer_norm("self_attention_norm")(x)
    h = self._attention("self_attention")(h, h, mask=key_mask, deterministic=deterministic)
    x = x + self._dropout(h, dropout_keys, deterministic)
    h = self._feed_forward(self._layer_norm("feed_forward_norm")(x), dropout_keys, deterministic)
    return x + self._dropout(h, dropout_keys, deterministic)


class DecoderLayer(_Block):
  """Causal self-attention, cross-attention to the memory, feed-forward; each pre-LN."""

  decode: bool = False

  @nn.compact
  def __call__(self, x, memory, self_mask, cross_mask, *, deterministic: bool, dropout_keys=None):
    h = self._layer_norm("self_attention_norm")(x)
    attention = self._attention("self_attention", decode=self.decode)
    h = attention(h, h, mask=self_mask, deterministic=deterministic)
    x = x + self._dropout(h, dropout_keys, deterministic)
    h = self._layer_norm("cross_attention_norm")(x)
    h = self._attention("cross_attention")(h, memory, mask=cross_mask, deterministic=deterministic)
    x = x + self._dropout(h, dropout_keys, deterministic)
    h = self._feed_forward(self._layer_norm("feed_forward_norm")(x), dropout_keys, deterministic)
    return x + self._dropout(h, dropout_keys, deterministic)


class Encoder(_Block):
  """Positions and dropout on the scaled token vectors x, the layers, a final LayerNorm."""

  @nn.compact
  def __call__(self, x, key_mask, *, deterministic: bool, dropout_keys=None):
    x = x + jnp.asarray(sinusoidal_positions(x.shape[1], self.config.hidden_size), x.dtype)
    x = self._dropout(x, dropout_keys, deterministic)
    for i in range(self.config.num_encoder_layers):
      x = EncoderLayer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(
          x, key_mask, deterministic=deterministic, dropout_keys=dropout_keys
      )
    return self._layer_norm("final_norm")(x)


class Decoder(_Block):
  """Like :class:`Encoder`, with cross-attention to ``memory``.

  ``decode=True``: incremental decoding, one position per call, with the keys and values of
  earlier positions (and the position counter) in the ``"cache"`` collection; the first call,
  with the full-length input, only creates that cache.
  """

  decode: bool = False

  @nn.compact
  def __call__(self, x, memory, self_mask, cross_mask, *, deterministic: bool, dropout_keys=None):
    table = sinusoidal_positions(self.config.max_length, self.config.hidden_size)
    positions = jnp.asarray(table[: x.shape[1]])
    if self.decode:
      initialized = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      if initialized:
        positions = jax.lax.dynamic_slice_in_dim(jnp.asarray(table), position.value, 1)
        position.value = position.value + 1
      self_mask = None  # the cached attention masks the positions not yet decoded
    x = self._dropout(x + positions.astype(x.dtype), dropout_keys, deterministic)
    for i in range(self.config.num_decoder_layers):
      x = DecoderLayer(
          self.config, self.dtype, self.param_dtype, decode=self.decode, name=f"layer_{i}"
      )(x, memory, self_mask, cross_mask, deterministic=deterministic, dropout_keys=dropout_keys)
    return self._layer_norm("final_norm")(x)


def _check_ids(name: str, ids, config: Seq2SeqConfig) -> None:
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(
        f"{name} must be an integer array [batch, length], got shape {ids.shape} "
        f"dtype {ids.dtype}"
    )
  if ids.shape[1] > config.max_length:
    raise ValueError(
        f"{name} has length {ids.shape[1]} > Seq2SeqConfig.max_length={config.max_length}; "
        "truncate the inputs or raise max_length"
    )


class Seq2SeqTransformer(nn.Module):
  """Encoder–decoder Transformer with a shared, tied token embedding (module docstring).

  ``__call__(source_ids [B, S], target_input_ids [B, T])`` -> logits [B, T, V];
  ``encode`` -> memory [B, S, H]; ``decode(memory, source_ids, target_input_ids)`` -> logits.
  ``source_embedding_delta`` [B, S, H] is added to the looked-up source vectors before the √H
  scaling (adversarial training perturbs them). Dropout (``deterministic=False``) needs
  ``dropout_keys`` [B], one key per example: each dropout site draws example i's mask from
  ``dropout_keys[i]`` alone (:class:`ExampleDropout`; the embedding sums, the sub-layer
  outputs and the feed-forward's hidden layer, not the attention weights, see
  ``_Block._attention``). ``incremental=True`` (``model.clone(incremental=True)``, used by
  :mod:`nearprox.text.decoding`): ``decode`` takes one target position per call and keeps the
  decoder's keys and values in the ``"cache"`` collection (see :class:`Decoder`).
  """

  config: Seq2SeqConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  incremental: bool = False

  def setup(self):
    cfg = self.config
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    self.token_embed = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        embedding_init=nn.initializers.normal(stddev=cfg.hidden_size**-0.5),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    self.encoder = Encoder(**kw)
    self.decoder = Decoder(**kw, decode=self.incremental)

  def _embed(self, ids, delta):
    """(E[ids] (+ delta)) · √H; the stacks add the positions."""
    vectors = self.token_embed(ids)
    if delta is not None:
      if delta.shape != vectors.shape:
        raise ValueError(
            f"source_embedding_delta shape {delta.shape} != {vectors.shape} "
            "(batch, source length, hidden_size)"
        )
      vectors = vectors + delta.astype(vectors.dtype)
    return vectors * jnp.asarray(math.sqrt(self.config.hidden_size), vectors.dtype)

  def encode(
      self,
      source_ids,
      *,
      source_embedding_delta=None,
      deterministic: bool = True,
      dropout_keys=None,
  ):
    _check_ids("source_ids", source_ids, self.config)
    check_dropout_keys(dropout_keys, source_ids.shape[0], deterministic, "Seq2SeqTransformer")
    key_mask = (source_ids != self.config.pad_id)[:, None, None, :]
    x = self._embed(source_ids, source_embedding_delta)
    return self.encoder(x, key_mask, deterministic=deterministic, dropout_keys=dropout_keys)

  def decode(
      self,
      memory,
      source_ids,
      target_input_ids,
      *,
      deterministic: bool = True,
      dropout_keys=None,
  ):
    _check_ids("source_ids", source_ids, self.config)
    _check_ids("target_input_ids", target_input_ids, self.config)
    check_dropout_keys(dropout_keys, target_input_ids.shape[0], deterministic, "Seq2SeqTransformer")
    length = target_input_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), bool))
    self_mask = causal[None, None] & (target_input_ids != self.config.pad_id)[:, None, None, :]
    cross_mask = (source_ids != self.config.pad_id)[:, None, None, :]
    x = self._embed(target_input_ids, None)
    h = self.decoder(
        x, memory, self_mask, cross_mask, deterministic=deterministic, dropout_keys=dropout_keys
    )
    return self.token_embed.attend(h)

  def __call__(
      self,
      source_ids,
      target_input_ids,
      *,
      source_embedding_delta=None,
      deterministic: bool = True,
      dropout_keys=None,
  ):
    memory = self.encode(
        source_ids,
        source_embedding_delta=source_embedding_delta,
        deterministic=deterministic,
        dropout_keys=dropout_keys,
    )
    return self.decode(
        memory,
        source_ids,
        target_input_ids,
        deterministic=deterministic,
        dropout_keys=dropout_keys,
    )


def init_seq2seq(config: Seq2SeqConfig, rng: jax.Array):
  """Randomly initialised ``params`` (the "params" collection) of ``Seq2SeqTransformer``."""
  ids = jnp.zeros((1, 2), jnp.int32)
  # Jitted: one XLA compile, where an eager init compiles every op it meets (seconds on a CPU).
  init = lambda rng: Seq2SeqTransformer(config).init({"params": rng}, ids, ids)
  return jax.jit(init)(rng)["params"]


@functools.lru_cache(maxsize=64)  # The same function for the same model: jit caches hit.
def seq2seq_logits_fn(model: Seq2SeqTransformer, *, deterministic: bool = True):
  """``logits_fn(params, batch, word_embeddings_delta=None, rng=None)`` -> logits [B, T, V].

  Mirrors :func:`nearprox.text.models.bert_logits_fn`. ``batch`` holds ``"source_ids"``
  [B, S] and ``"target_input_ids"`` [B, T]; ``word_embeddings_delta`` [B, S, H] is added to
  the source token embeddings. With ``deterministic=False`` dropout draws from the
  per-example keys ``rng`` [B] (``rng=None`` is then an error): the model runs once on the
  whole batch with ``dropout_keys=rng`` and each dropout site draws example i's mask from
  ``rng[i]`` alone, so a batch of one reproduces its row and the factored per-example
  gradients see every layer.
  """

  def logits_fn(params, batch, word_embeddings_delta=None, rng=None):
    if not deterministic and rng is None:
      raise ValueError(
          "seq2seq_logits_fn(deterministic=False) needs per-example dropout keys rng [B]"
      )
    return model.apply(
        {"params": params},
        batch["source_ids"],
        batch["target_input_ids"],
        source_embedding_delta=word_embeddings_delta,
        deterministic=deterministic,
        dropout_keys=None if deterministic else rng,
    )

  return logits_fn
