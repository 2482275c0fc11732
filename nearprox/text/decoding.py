"""Greedy decoding and beam search for :class:`nearprox.text.models.Seq2SeqTransformer`, jittable.

Both encode the batch once, then run a fixed number ``max_length`` of decoder steps
(``jax.lax.scan``) with a key/value cache (the model cloned with ``incremental=True``): each
step feeds one token per hypothesis, so a step costs one position, not the whole prefix
(cross-attention recomputes the memory's keys and values every step). Outputs are ids
[B, max_length]: the generated tokens y_1 … y_n with y_n = eos, then ``pad_id``.

The hypotheses, for both (and for the brute-force search of the tests):

* tokens are drawn from the vocabulary less ``pad_id`` and ``bos_id``: each step's
  log-probabilities are log_softmax of the logits with those two removed;
* a hypothesis ends with eos, at the latest at position ``max_length``: the last step may
  only choose eos (scored by its log-probability), so every output holds an eos;
* beam search scores a finished hypothesis y by log p(y) / lp(|y|) with GNMT's length
  penalty lp(n) = ((5 + n) / 6)^α (Wu et al. 2016, eq. 14), |y| counting the eos.

Beam search (``beam_size`` K) keeps the K best unfinished prefixes by log p. Each step takes the
2K best one-token extensions; an extension ending in eos that ranks among the first K is
finished (as in fairseq), the K best others stay alive; a sentence stops once it holds K
finished hypotheses. The answer is the finished hypothesis of highest score. So K = 1 is
greedy decoding, and a K at least the number of candidates of every step searches
exhaustively.

References:
  Wu et al., "Google's Neural Machine Translation System", arXiv 1609.08144, 2016 (§7).
  Ott et al., "fairseq: A Fast, Extensible Toolkit for Sequence Modeling", NAACL 2019
  (its ``SequenceGenerator``: 2K candidates, eos among the first K finishes).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30  # a finite "minus infinity": sums and comparisons stay well defined


def _check(model, source_ids, max_length: int) -> None:
  limit = model.config.max_length
  if not isinstance(max_length, int) or not 1 <= max_length <= limit:
    raise ValueError(
        f"max_length must be an int in [1, Seq2SeqConfig.max_length={limit}], got {max_length!r}"
    )
  if source_ids.ndim != 2:
    raise ValueError(f"source_ids must be [batch, length], got shape {source_ids.shape}")


def step_log_probs(config, logits: jax.Array, last: jax.Array | bool) -> jax.Array:
  """Log-probabilities of the next token [..., V] from logits [..., V] (module docstring):
  pad and bos removed, and only eos allowed when ``last``."""
  vocab = jnp.arange(logits.shape[-1])
  banned = (vocab == config.pad_id) | (vocab == config.bos_id)
  logp = jax.nn.log_softmax(jnp.where(banned, -jnp.inf, logits.astype(jnp.float32)), axis=-1)
  logp = jnp.where(banned, _NEG_INF, logp)
  return jnp.where(jnp.logical_and(last, vocab != config.eos_id), _NEG_INF, logp)


def gnmt_length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's lp(n) = ((5 + n) / 6)^α."""
  return ((5.0 + length) / 6.0) ** alpha


def _start(model, params, source_ids, max_length: int, copies: int):
  """(memory, source ids, cache, step function) for ``copies`` hypotheses per sentence."""
  memory = model.apply({"params": params}, source_ids, method="encode")
  memory = jnp.repeat(memory, copies, axis=0)
  source_ids = jnp.repeat(source_ids, copies, axis=0)
  stepper = model.clone(incremental=True)
  decode = lambda variables, targets: stepper.apply(
      variables, memory, source_ids, targets, method="decode", mutable=["cache"]
  )
  full = jnp.zeros((source_ids.shape[0], max_length), source_ids.dtype)
  shapes = jax.eval_shape(lambda: decode({"params": params}, full)[1]["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def step(cache, tokens):  # tokens [N] -> (logits [N, V], new cache)
    logits, variables = decode({"params": params, "cache": cache}, tokens[:, None])
    return logits[:, 0], variables["cache"]

  return cache, step


def greedy_decode(model, params, source_ids, *, max_length: int) -> jax.Array:
  """ids [B, max_length]: at each step the most probable token (module docstring)."""
  _check(model, source_ids, max_length)
  cfg = model.config
  batch = source_ids.shape[0]
  cache, step = _start(model, params, source_ids, max_length, 1)

  def body(carry, t):
    cache, token, done = carry
    logits, cache = step(cache, token)
    token = jnp.argmax(step_log_probs(cfg, logits, t == max_length - 1), axis=-1)
    token = jnp.where(done, cfg.pad_id, token).astype(source_ids.dtype)
    return (cache, token, done | (token == cfg.eos_id)), token

  start = (cache, jnp.full((batch,), cfg.bos_id, source_ids.dtype), jnp.zeros((batch,), bool))
  return jax.lax.scan(body, start, jnp.arange(max_length))[1].T


def _reorder(cache, origin: jax.Array, batch: int, beams: int):
  """Each hypothesis's cache rows taken from the beam it extends (origin [B, K])."""

  def take(x):
    if x.ndim == 0:
      return x
    rows = x.reshape((batch, beams) + x.shape[1:])
    index = origin.reshape(origin.shape + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(rows, index, axis=1).reshape(x.shape)

  return jax.tree.map(take, cache)


def beam_search(
    model,
    params,
    source_ids,
    *,
    beam_size: int = 4,
    length_penalty: float = 0.6,
    max_length: int,
) -> jax.Array:
  """ids [B, max_length]: the highest-scoring finished hypothesis of a beam search
  (module docstring); ``length_penalty`` is GNMT's α."""
  _check(model, source_ids, max_length)
  if not isinstance(beam_size, int) or beam_size < 1:
    raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
  cfg, alpha, beams = model.config, length_penalty, beam_size
  batch = source_ids.shape[0]
  cache, step = _start(model, params, source_ids, max_length, beams)
  dtype = source_ids.dtype

  def body(carry, t):
    cache, alive, alive_logp, finished, finished_score, num_finished = carry
    logits, cache = step(cache, alive[:, :, t].reshape(-1))
    logp = step_log_probs(cfg, logits, t == max_length - 1).reshape(batch, beams, -1)
    vocab = logp.shape[-1]
    scores = (alive_logp[:, :, None] + logp).reshape(batch, -1)
    cand_logp, cand = jax.lax.top_k(scores, 2 * beams)  # [B, 2K], best first
    cand_beam, cand_token = cand // vocab, (cand % vocab).astype(dtype)
    valid = cand_logp > _NEG_INF / 2
    is_eos = cand_token == cfg.eos_id
    done = num_finished >= beams  # [B]
    # Finished: eos candidates among the first K, for sentences still searching.
    newly = is_eos & valid & (jnp.arange(2 * beams) < beams) & ~done[:, None]
    sequences = jnp.take_along_axis(alive, cand_beam[:, :, None], axis=1)
    sequences = sequences.at[:, :, t + 1].set(cand_token)
    new_score = jnp.where(newly, cand_logp / gnmt_length_penalty(t + 1.0, alpha), _NEG_INF)
    pool = jnp.concatenate([finished_score, new_score], axis=1)
    pool_seq = jnp.concatenate([finished, sequences], axis=1)
    finished_score, keep = jax.lax.top_k(pool, beams)
    finished = jnp.take_along_axis(pool_seq, keep[:, :, None], axis=1)
    num_finished = num_finished + jnp.sum(newly, axis=1)
    # Alive: the K best candidates that do not end in eos.
    rank = jnp.where(is_eos, _NEG_INF, cand_logp)
    alive_logp, keep = jax.lax.top_k(rank, beams)
    alive = jnp.take_along_axis(sequences, keep[:, :, None], axis=1)
    origin = jnp.take_along_axis(cand_beam, keep, axis=1)
    return (
        _reorder(cache, origin, batch, beams),
        alive,
        alive_logp,
        finished,
        finished_score,
        num_finished,
    ), None

  # Position 0 holds bos; K identical start beams, all but the first at -inf so that the
  # first step's candidates are distinct.
  alive = jnp.full((batch, beams, max_length + 1), cfg.pad_id, dtype).at[:, :, 0].set(cfg.bos_id)
  alive_logp = jnp.where(jnp.arange(beams) == 0, 0.0, _NEG_INF) * jnp.ones((batch, 1))
  start = (
      cache,
      alive,
      alive_logp,
      jnp.full((batch, beams, max_length + 1), cfg.pad_id, dtype),
      jnp.full((batch, beams), _NEG_INF),
      jnp.zeros((batch,), jnp.int32),
  )
  final = jax.lax.scan(body, start, jnp.arange(max_length))[0]
  return final[3][:, 0, 1:]
