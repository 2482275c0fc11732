"""BERT in Flax linen, numerically equal to Hugging Face's PyTorch ``BertModel``.

The modules and their parameter names follow ``transformers.models.bert`` one to one
(``embeddings/word_embeddings``, ``encoder/layer_0/attention/self/query`` ...), so converting a
checkpoint is a readable table (see ``hf_checkpoints.py``).

Every parameter lives in a standard linen layer: ``nn.Dense`` (q, k, v, attention output,
feed-forward, pooler, heads), ``nn.Embed`` (word, position and token-type tables, looked up
with ``__call__``), ``nn.LayerNorm``. The factored per-example-gradient path intercepts exactly
the ``nn.Dense`` / ``nn.Embed`` calls, so each one sees inputs with the batch axis first:
position and token-type ids are broadcast to ``[B, T]`` before the lookup. No operation mixes
examples of a batch, so example i's outputs depend only on example i's inputs.

Computation runs in ``dtype`` (float32 or bfloat16) while parameters are stored in
``param_dtype``; attention softmax and LayerNorm statistics are always computed in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from nearprox.text.models.bert_config import ACTIVATIONS, BertConfig
from nearprox.text.models.dropout import ExampleDropout, check_dropout_keys

Dtype = Any


@flax.struct.dataclass
class BertOutput:
  last_hidden_state: jax.Array  # [B, T, hidden]
  pooler_output: jax.Array | None  # [B, hidden]: tanh(W h_[CLS] + b); None without pooler


@flax.struct.dataclass
class SequenceClassifierOutput:
  logits: jax.Array  # [B, num_labels]


@flax.struct.dataclass
class QuestionAnsweringOutput:
  start_logits: jax.Array  # [B, T]
  end_logits: jax.Array  # [B, T]


def _kernel_init(config: BertConfig):
  return nn.initializers.truncated_normal(stddev=config.initializer_range)


class _Layer(nn.Module):
  """Base: carries config and dtypes, builds the standard layers with HF initialisation."""

  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _dense(self, features: int, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=_kernel_init(self.config),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )

  def _layer_norm(self, name: str = "LayerNorm") -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=self.config.layer_norm_eps,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )


class BertEmbeddings(_Layer):
  """LayerNorm(word[ids] (+ delta) + position[0..T-1] + token_type[type_ids]), then dropout."""

  @nn.compact
  def __call__(
      self,
      input_ids,
      token_type_ids,
      *,
      deterministic: bool,
      dropout_keys=None,
      word_embeddings_delta=None,
  ):
    cfg = self.config
    batch, length = input_ids.shape
    if length > cfg.max_position_embeddings:
      raise ValueError(
          f"input_ids has sequence length {length} > max_position_embeddings="
          f"{cfg.max_position_embeddings}; truncate the inputs"
      )
    embed = functools.partial(
        nn.Embed,
        features=cfg.hidden_size,
        embedding_init=_kernel_init(cfg),
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    words = embed(cfg.vocab_size, name="word_embeddings")(input_ids)
    if word_embeddings_delta is not None:
      words = words + word_embeddings_delta.astype(words.dtype)
    # Broadcast to [B, T] so the lookup, like every other layer call, is per example.
    position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    positions = embed(cfg.max_position_embeddings, name="position_embeddings")(position_ids)
    types = embed(cfg.type_vocab_size, name="token_type_embeddings")(token_type_ids)
    hidden = self._layer_norm()(words + positions + types)
    return ExampleDropout(cfg.hidden_dropout_prob)(hidden, dropout_keys, deterministic)


class BertSelfAttention(_Layer):
  """Multi-head softmax(q kᵀ/√d + mask) v; padded keys get zero weight."""

  @nn.compact
  def __call__(self, hidden, attention_mask, *, deterministic: bool, dropout_keys=None):
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads

    def project(name):  # [B, T, hidden] -> [B, T, heads, head_dim]
      out = self._dense(cfg.hidden_size, name)(hidden)
      return out.reshape(out.shape[:2] + (heads, head_dim))

    query, key, value = project("query"), project("key"), project("value")
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.asarray(
        math.sqrt(head_dim), query.dtype
    )
    scores = scores.astype(jnp.float32)  # softmax in float32 whatever the compute dtype
    keep = attention_mask[:, None, None, :].astype(bool)
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    # Per-example masks over [heads, query, key], as HF's dropout on the probabilities.
    probs = ExampleDropout(cfg.attention_probs_dropout_prob)(probs, dropout_keys, deterministic)
    context = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    return context.reshape(context.shape[:2] + (cfg.hidden_size,))


class BertResidualOutput(_Layer):
  """LayerNorm(residual + dropout(dense(x))): HF's BertSelfOutput and BertOutput."""

  @nn.compact
  def __call__(self, hidden, residual, *, deterministic: bool, dropout_keys=None):
    hidden = self._dense(self.config.hidden_size, "dense")(hidden)
    hidden = ExampleDropout(self.config.hidden_dropout_prob)(hidden, dropout_keys, deterministic)
    return self._layer_norm()(hidden + residual)


class BertAttention(_Layer):

  @nn.compact
  def __call__(self, hidden, attention_mask, *, deterministic: bool, dropout_keys=None):
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    context = BertSelfAttention(**kw, name="self")(
        hidden, attention_mask, deterministic=deterministic, dropout_keys=dropout_keys
    )
    return BertResidualOutput(**kw, name="output")(
        context, hidden, deterministic=deterministic, dropout_keys=dropout_keys
    )


class BertIntermediate(_Layer):

  @nn.compact
  def __call__(self, hidden):
    hidden = self._dense(self.config.intermediate_size, "dense")(hidden)
    return ACTIVATIONS[self.config.hidden_act](hidden)


class BertLayer(_Layer):
  """One transformer block: attention, then the feed-forward network, each post-LN."""

  @nn.compact
  def __call__(self, hidden, attention_mask, *, deterministic: bool, dropout_keys=None):
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    attended = BertAttention(**kw, name="attention")(
        hidden, attention_mask, deterministic=deterministic, dropout_keys=dropout_keys
    )
    inner = BertIntermediate(**kw, name="intermediate")(attended)
    return BertResidualOutput(**kw, name="output")(
        inner, attended, deterministic=deterministic, dropout_keys=dropout_keys
    )


class BertEncoder(_Layer):

  @nn.compact
  def __call__(self, hidden, attention_mask, *, deterministic: bool, dropout_keys=None):
    for i in range(self.config.num_hidden_layers):
      hidden = BertLayer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(
          hidden, attention_mask, deterministic=deterministic, dropout_keys=dropout_keys
      )
    return hidden


class BertPooler(_Layer):
  """tanh(dense(h_0)): the [CLS] token's hidden state through a dense layer."""

  @nn.compact
  def __call__(self, hidden):
    return jnp.tanh(self._dense(self.config.hidden_size, "dense")(hidden[:, 0]))


def _check_inputs(config, input_ids, attention_mask, token_type_ids, word_embeddings_delta):
  """Validates shapes (static, so errors come at trace time) and fills the defaults."""
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(
        f"input_ids must be an integer array [batch, seq_len], got shape "
        f"{input_ids.shape} dtype {input_ids.dtype}"
    )
  shape = input_ids.shape
  if attention_mask is None:
    attention_mask = jnp.ones(shape, jnp.int32)
  elif attention_mask.shape != shape:
    raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {shape}")
  if token_type_ids is None:
    token_type_ids = jnp.zeros(shape, jnp.int32)
  elif token_type_ids.shape != shape:
    raise ValueError(f"token_type_ids shape {token_type_ids.shape} != input_ids shape {shape}")
  if word_embeddings_delta is not None and word_embeddings_delta.shape != (
      *shape,
      config.hidden_size,
  ):
    raise ValueError(
        f"word_embeddings_delta shape {word_embeddings_delta.shape} != "
        f"{(*shape, config.hidden_size)} (batch, seq_len, hidden_size)"
    )
  return attention_mask, token_type_ids


class BertModel(_Layer):
  """The BERT encoder: embeddings, ``num_hidden_layers`` blocks, optional pooler.

  ``attention_mask`` is 1 for real tokens, 0 for padding (default all ones);
  ``token_type_ids`` default to zeros. ``word_embeddings_delta`` [B, T, hidden] is added to the
  word-embedding lookup before positions, token types and LayerNorm (adversarial training).
  Dropout (``deterministic=False``) needs ``dropout_keys`` [B], one key per example: every
  dropout site (embeddings, attention probabilities, residual branches, classifier) draws
  example i's mask from ``dropout_keys[i]`` alone (:class:`ExampleDropout`), so example i's
  outputs do not depend on the other examples, with dropout too.
  """

  add_pooling_layer: bool = True

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      deterministic: bool = True,
      dropout_keys=None,
      word_embeddings_delta=None,
  ) -> BertOutput:
    attention_mask, token_type_ids = _check_inputs(
        self.config, input_ids, attention_mask, token_type_ids, word_embeddings_delta
    )
    check_dropout_keys(dropout_keys, input_ids.shape[0], deterministic, type(self).__name__)
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = BertEmbeddings(**kw, name="embeddings")(
        input_ids,
        token_type_ids,
        deterministic=deterministic,
        dropout_keys=dropout_keys,
        word_embeddings_delta=word_embeddings_delta,
    )
    hidden = BertEncoder(**kw, name="encoder")(
        hidden, attention_mask, deterministic=deterministic, dropout_keys=dropout_keys
    )
    pooled = BertPooler(**kw, name="pooler")(hidden) if self.add_pooling_layer else None
    return BertOutput(last_hidden_state=hidden, pooler_output=pooled)


class BertForSequenceClassification(_Layer):
  """logits = classifier(dropout(pooler_output)), shape [B, num_labels].

  As in HF, ``num_labels == 1`` means regression (train ``logits[:, 0]`` with squared
  error), otherwise single-label classification (softmax cross-entropy).
  """

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      deterministic: bool = True,
      dropout_keys=None,
      word_embeddings_delta=None,
  ) -> SequenceClassifierOutput:
    cfg = self.config
    outputs = BertModel(cfg, self.dtype, self.param_dtype, name="bert")(
        input_ids,
        attention_mask,
        token_type_ids,
        deterministic=deterministic,
        dropout_keys=dropout_keys,
        word_embeddings_delta=word_embeddings_delta,
    )
    rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
    pooled = ExampleDropout(rate)(outputs.pooler_output, dropout_keys, deterministic)
    return SequenceClassifierOutput(logits=self._dense(cfg.num_labels, "classifier")(pooled))


class BertForQuestionAnswering(_Layer):
  """Extractive span QA: per-token start and end logits from one dense layer (no pooler)."""

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      deterministic: bool = True,
      dropout_keys=None,
      word_embeddings_delta=None,
  ) -> QuestionAnsweringOutput:
    outputs = BertModel(
        self.config, self.dtype, self.param_dtype, add_pooling_layer=False, name="bert"
    )(
        input_ids,
        attention_mask,
        token_type_ids,
        deterministic=deterministic,
        dropout_keys=dropout_keys,
        word_embeddings_delta=word_embeddings_delta,
    )
    logits = self._dense(2, "qa_outputs")(outputs.last_hidden_state)
    return QuestionAnsweringOutput(start_logits=logits[..., 0], end_logits=logits[..., 1])


def init_params(model: nn.Module, rng: jax.Array, batch_size: int = 2, seq_len: int = 8):
  """Randomly initialised ``params`` for ``model`` (HF init: truncated normal, zero bias)."""
  input_ids = jnp.zeros((batch_size, seq_len), jnp.int32)
  # The multi-task model computes every head on the whole batch: any task ids create them all.
  extra = _task_ids_argument(model, {"task_ids": jnp.zeros((batch_size,), jnp.int32)})
  # Jitted: one XLA compile, where an eager init compiles every op it meets (seconds on a CPU).
  init = lambda rng: model.init({"params": rng}, input_ids, deterministic=True, **extra)
  return jax.jit(init)(rng)["params"]


def _task_ids_argument(model, batch) -> dict:
  """``{"task_ids": batch["task_ids"]}`` for a model with a head per task
  (:class:`nearprox.text.models.multitask.BertForMultiTaskClassification`), else {}."""
  return {"task_ids": batch["task_ids"]} if getattr(model, "takes_task_ids", False) else {}


# ------------------------------------------------------------------------------ logits_fn


@functools.lru_cache(maxsize=64)  # The same function for the same model: jit caches hit.
def bert_logits_fn(model, deterministic: bool = True):
  """``logits_fn`` for ``nearprox.text.models.BertForSequenceClassification`` (→ ``.logits``)
  or ``BertForQuestionAnswering`` (→ ``(start_logits, end_logits)``), and for
  ``BertForMultiTaskClassification`` (→ ``.logits`` of each example's task, which
  ``batch["task_ids"]`` gives).

  ``params`` is the ``"params"`` collection. With ``deterministic=False`` dropout draws from
  the per-example keys ``rng`` [B] (``rng=None`` is then an error): the model runs once on
  the whole batch with ``dropout_keys=rng``, and each dropout site draws example i's mask
  from ``rng[i]`` alone (:class:`nearprox.text.models.dropout.ExampleDropout`). So example
  i's masks depend on its key only, a batch of one reproduces its row, and the layers see
  the whole batch, as the factored per-example gradients need.
  """

  def outputs(out):
    if hasattr(out, "logits"):
      return out.logits
    return out.start_logits, out.end_logits

  def logits_fn(params, batch, word_embeddings_delta=None, rng=None):
    if not deterministic and rng is None:
      raise ValueError("bert_logits_fn(deterministic=False) needs per-example dropout keys rng [B]")
    return outputs(
        model.apply(
            {"params": params},
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("token_type_ids"),
            deterministic=deterministic,
            dropout_keys=None if deterministic else rng,
            word_embeddings_delta=word_embeddings_delta,
            **_task_ids_argument(model, batch),
        )
    )

  return logits_fn
