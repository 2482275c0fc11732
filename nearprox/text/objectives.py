"""Training objectives as PER-EXAMPLE loss vectors: task, adversarial and L2 terms.

The proximal transform (:func:`nearprox.scale_by_proximal`) needs the per-example losses
ℓ_i(θ) (a vector [B]), so every term here is per example:

    ℓ_i(θ) = task_i(θ; δ=0) + adv_weight · adv_i(θ; sg(δ_i))       (combine="sum")
    ℓ_i(θ) =                               adv_i(θ; sg(δ_i))       (combine="adv_only")

δ_i ∈ R^{T×H} is added to example i's word-embedding lookup (before positions, token types
and LayerNorm; for task "translation" to the source sentence's token embeddings), is zero on padding tokens (attention_mask == 0), is found by gradient ascent
on example i's own loss and is a constant for the parameter gradient (``stop_gradient``).
Every normalization and projection is per example (over that example's T×H entries),
never across the batch, so ℓ_i depends on example i only: evaluated on a batch of one it
gives the same number as in the full batch (what :func:`nearprox.per_example_grads`'s
vmap oracle relies on). The δ-gradient of Σ_j ℓ_j is (∂ℓ_i/∂δ_i)_i because the model mixes
no examples (BERT has no batch statistics), so one backward pass yields all of them.

Perturbations (``ObjectiveConfig.kind``):

* ``"fgm"``: Miyato, Dai & Goodfellow 2017, "Adversarial Training Methods for
  Semi-Supervised Text Classification". δ_i = ε g_i/‖g_i‖₂, g_i = ∂task_i/∂δ_i at δ=0
  (``norm="linf"``: ε·sign(g_i), FGSM).
* ``"pgd"``: Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
  Attacks"; on word embeddings as in FreeLB (Zhu et al. 2020). Optional random start in the
  ε-ball, then K steps δ ← Π_ε(δ + α·g/‖g‖₂) (ℓ2, FreeLB's normalized step) or
  δ ← clip(δ + α·sign g, ±ε) (ℓ∞). The adversarial loss is taken at the last iterate
  (Madry); FreeLB's average over the K iterates is not implemented.
* ``"smart"``: Jiang et al. 2020, "SMART: Robust and Efficient Fine-Tuning for Pre-trained
  Natural Language Models through Principled Regularized Optimization". Label-free
  smoothness term: symmetric KL between clean and perturbed predictions (squared difference
  for regression). δ starts as N(0, σ²) noise (σ = ``noise_std``), then K steps
  δ ← Π_ε(δ + η·ĝ), ĝ = ∇_δ KL(sg(p) ‖ p̃(δ)) normalized PER TOKEN: g/(‖g‖∞ + 1e-6)
  over the hidden axis (mt-dnn's ``_norm_grad``, norm_level 0; ℓ2 per token for
  ``norm="l2"``). That is the paper's Algorithm 1 with mt-dnn's normalization. mt-dnn's
  current code instead renormalizes (noise + η·g) per token and never projects, so with
  σ = 1e-5, η = 1e-3 its δ is the noise direction unless |g| ≳ 1e-2. We bound δ by ε
  (default ε = η: one step lands on the ball). As in mt-dnn's ``SymKlCriterion`` each KL
  direction treats its target distribution as a constant: KL(sg(p̃)‖p) + KL(sg(p)‖p̃).

Passes per evaluation of ∇θ Σℓ_i (F = forward, B = full backward, Bδ = backward to the input
only, no weight gradients):

    kind                         combine="sum"         "adv_only"
    clean                        1F + 1B
    fgm                          2F + 2B + 1Bδ         2F + 1B + 1Bδ
    pgd, K steps, no rand. start (K+1)F + 2B + K·Bδ    (K+1)F + 1B + K·Bδ
    pgd, K steps, random start   (K+2)F + 2B + K·Bδ    (K+1)F + 1B + K·Bδ
    smart, K steps               (K+2)F + 2B + K·Bδ

The clean forward at δ = 0 is shared with the first ascent gradient (one ``jax.vjp``) for FGM
and for PGD without random start. What these passes cost in step time, relative to the clean
objective, is measured by ``experiments/bench_objectives.py`` (run it on the machine in
question; it prints the table).

PyTorch implementations get the FGM ascent gradient from the clean backward for free
(2F2B); here the loss is a pure function differentiated outside, so the δ-gradient is an
extra input-only backward pass.

Randomness (dropout, PGD random start, SMART noise) comes from PER-EXAMPLE keys ``rng``
[B] (typed) or [B, 2] (raw uint32): example i's key alone decides its dropout masks and
noise. All forward passes of one loss evaluation use the same dropout key, so the
perturbation is the only difference between the clean and perturbed predictions.

iEF weights (``make_loss_at_perturbation(..., with_ief_weights=True)``, :func:`ief_weights`):
by default (``ObjectiveConfig.ief_weights="clean_term"``) s_i = ‖∇_z task_i‖² of the clean
task term at the clean logits, whatever the adversarial term; ``"whole_loss"`` takes the
squared logit gradient of the whole ℓ_i over the clean and the perturbed logits, which is
what iEF asks for (docs/method.md §3).

L2 regularization λ·½‖θ_S‖² is NOT part of the per-example loss: it would add the same
vector λθ to every g_i, i.e. a rank-one term to the Gram matrix that the spectral filter would
then damp (docs/method.md §3). :mod:`nearprox.training.optimizers` adds its gradient after
the filter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nearprox.text import losses
from nearprox.text.losses import TASKS, Batch
from nearprox.text.objective_config import ObjectiveConfig
from nearprox.text.perturbations import (
    per_token_normalize,
    pgd_ascent,
    project_to_ball,
    random_ball_point,
    steepest_ascent_direction,
    sum_grad,
    token_mask,
)

Params = Any
# logits_fn(params, batch, word_embeddings_delta [B,T,H] or None, per-example keys or None)
# -> logits [B, k] (classification/regression) or (start [B,T], end [B,T]) (qa).
LogitsFn = Callable[[Params, Batch, Any, Any], Any]

# ----------------------------------------------------------------------------------------
# The objective.


def _split_keys(rng, batch_size):
  """Per-example keys [B] → (dropout keys, noise keys), or (None, None) without rng."""
  if rng is None:
    return None, None
  if rng.shape[0] != batch_size:
    raise ValueError(
        f"rng must hold one key per example (leading axis {batch_size}), got "
        f"shape {rng.shape}; use jax.random.split(key, batch_size)"
    )
  keys = jax.vmap(jax.random.split)(rng)
  return keys[:, 0], keys[:, 1]


def _perturbed_ids(task: str, batch: Batch) -> jax.Array:
  """The token ids [B, T] whose embeddings δ perturbs: the source sentence for translation."""
  return batch["source_ids"] if task == "translation" else batch["input_ids"]


def _perturbed_mask(task: str, batch: Batch) -> jax.Array:
  """[B, T, 1]: 1 on the perturbed real tokens, 0 on padding."""
  if task == "translation":
    return (batch["source_ids"] != losses.PAD_ID).astype(jnp.float32)[..., None]
  return token_mask(batch)


def _task_loss(config: ObjectiveConfig, task: str, logits, batch: Batch) -> jax.Array:
  return losses.task_loss(task, logits, batch, label_smoothing=config.label_smoothing)


def _needs_noise(config: ObjectiveConfig) -> bool:
  return (config.kind == "pgd" and config.random_start) or (
      config.kind == "smart" and config.noise_std > 0
  )


def _perturb(logits_fn, config, task, hidden_size, params, batch, rng):
  """(clean logits, sg(δ) [B,T,H], dropout keys) for an adversarial ``config``; the clean
  logits keep their dependence on ``params`` so the clean forward can be shared."""
  input_ids = _perturbed_ids(task, batch)
  shape = (*input_ids.shape, hidden_size)
  mask = _perturbed_mask(task, batch)
  dropout_keys, noise_keys = _split_keys(rng, input_ids.shape[0])
  if noise_keys is None and _needs_noise(config):
    raise ValueError(
        f"ObjectiveConfig(kind={config.kind!r}) draws random noise: pass "
        "per-example keys rng [B] (jax.random.split(key, B))"
    )
  zeros = jnp.zeros(shape, jnp.float32)

  def logits_at(delta):
    return logits_fn(params, batch, delta, dropout_keys)

  def task_at(delta):
    logits = logits_at(delta)
    return _task_loss(config, task, logits, batch), logits

  if config.kind == "smart":
    clean_logits = logits_at(zeros)
    target = jax.lax.stop_gradient(clean_logits)
    divergence = lambda d: losses.smoothness_divergence(task, target, logits_at(d), batch)
    grad_fn = sum_grad(divergence)

    def step(_, delta):
      moved = delta + config.step_size * per_token_normalize(grad_fn(delta) * mask, config.norm)
      return project_to_ball(moved, config.epsilon, config.norm) * mask

    if config.noise_std == 0:
      # δ = 0 is the KL's minimum: the exact ascent direction is 0, and following the
      # round-off of p̃(0) − p would be noise, not ascent.
      return clean_logits, zeros, dropout_keys
    noise = jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(noise_keys)
    delta = project_to_ball(config.noise_std * noise * mask, config.epsilon, config.norm)
    delta = jax.lax.fori_loop(0, config.num_steps, step, delta)
    return clean_logits, jax.lax.stop_gradient(delta), dropout_keys

  # FGM / PGD: ascend the task loss. At δ = 0 one jax.vjp serves both the clean loss (whose
  # θ-dependence the outer gradient uses) and the ascent gradient (a constant for it).
  clean_losses, pullback, clean_logits = jax.vjp(task_at, zeros, has_aux=True)
  ones = jnp.ones_like(clean_losses)
  if config.kind == "fgm":
    grad = pullback(ones)[0] * mask
    delta = config.epsilon * steepest_ascent_direction(grad, config.norm)
    return clean_logits, jax.lax.stop_gradient(delta), dropout_keys
  if config.kind == "pgd":
    objective = lambda d: task_at(d)[0]
    if config.random_start:
      start = random_ball_point(noise_keys, shape, config.epsilon, config.norm, mask)
      grad = None
    else:
      start, grad = zeros, pullback(ones)[0]
    delta = pgd_ascent(
        objective,
        start,
        grad,
        mask,
        epsilon=config.epsilon,
        step_size=config.step_size,
        num_steps=config.num_steps,
        norm=config.norm,
    )
    return clean_logits, jax.lax.stop_gradient(delta), dropout_keys
  raise ValueError(f"no perturbation for kind={config.kind!r}")


def adversarial_perturbation(
    logits_fn: LogitsFn,
    config: ObjectiveConfig,
    params,
    batch: Batch,
    rng=None,
    *,
    task: str = "classification",
    hidden_size: int,
) -> jax.Array:
  """The per-example perturbation δ [B, T, hidden_size] that ``config`` trains against.

  A constant for differentiation (``stop_gradient``); zero on padding; zero for "clean".
  ``rng``: per-example keys [B] (needed for dropout, PGD random start and SMART noise).
  """
  _check(config, task, hidden_size)
  if config.kind == "clean":
    return jnp.zeros((*_perturbed_ids(task, batch).shape, hidden_size), jnp.float32)
  return _perturb(logits_fn, config, task, hidden_size, params, batch, rng)[1]


def _check(config, task, hidden_size):
  if not isinstance(config, ObjectiveConfig):
    raise ValueError(f"config must be an ObjectiveConfig, got {type(config).__name__}")
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")
  if config.label_smoothing and task != "translation":
    raise ValueError(
        f"ObjectiveConfig.label_smoothing is for task 'translation'; task {task!r} needs 0, "
        f"got {config.label_smoothing}"
    )
  if config.kind != "clean" and (not isinstance(hidden_size, int) or hidden_size < 1):
    raise ValueError(
        f"hidden_size must be a positive int (the word-embedding width), got " f"{hidden_size!r}"
    )


def _combine(config, task, batch, clean_logits, perturbed_logits) -> jax.Array:
  """ℓ_i = task_i + adv_weight·adv_i ("sum") or adv_i ("adv_only"), per example."""
  if config.kind == "smart":
    adv = losses.smoothness_divergence(task, clean_logits, perturbed_logits, batch)
  else:
    adv = _task_loss(config, task, perturbed_logits, batch)
  if config.combine == "adv_only":
    return adv
  return _task_loss(config, task, clean_logits, batch) + config.adv_weight * adv


def make_per_example_loss(
    logits_fn: LogitsFn,
    config: ObjectiveConfig,
    *,
    task: str = "classification",
    hidden_size: int | None = None,
):
  """The per-example training objective ``loss_fn(params, batch, rng=None) -> [B]``.

  Args:
    logits_fn: ``logits_fn(params, batch, word_embeddings_delta, rng)`` → logits [B, k]
      (classification; [B, 1] for regression) or (start [B, T], end [B, T]) (qa).
      ``word_embeddings_delta`` is [B, T, hidden_size] or None; ``rng`` the per-example
      dropout keys or None (deterministic). :func:`bert_logits_fn` adapts a nearprox BERT.
    config: the :class:`ObjectiveConfig`.
    task: "classification", "regression" or "qa" (which labels in ``batch``: see
      :func:`nearprox.text.losses.task_loss`).
    hidden_size: the word-embedding width H (needed unless kind == "clean").

  Returns:
    ``loss_fn(params, batch, rng=None)`` returning ℓ [B] (module docstring). ``batch`` is a
    dict of arrays with the batch axis first (``input_ids`` [B, T], optional
    ``attention_mask``/``token_type_ids``, the labels); ``rng`` is per-example keys [B]
    (typed) or [B, 2] (raw), so ``nearprox.per_example_grads(loss_fn, params, batch, keys)``
    slices it with the rest. Rows masked by ``batch["mask"]`` are NOT zeroed here: their
    losses are finite, and the transform drops them (pass ``mask=`` to its update). The
    L2 term (``config.l2_weight``) is not included: see :func:`l2_regularization`.
  """
  _check(config, task, hidden_size)

  def loss_fn(params, batch, rng=None):
    if config.kind == "clean":
      dropout_keys, _ = _split_keys(rng, _perturbed_ids(task, batch).shape[0])
      return _task_loss(config, task, logits_fn(params, batch, None, dropout_keys), batch)
    clean_logits, delta, dropout_keys = _perturb(
        logits_fn, config, task, hidden_size, params, batch, rng
    )
    perturbed_logits = logits_fn(params, batch, delta, dropout_keys)
    return _combine(config, task, batch, clean_logits, perturbed_logits)

  return loss_fn


def make_loss_at_perturbation(
    logits_fn: LogitsFn,
    config: ObjectiveConfig,
    *,
    task: str = "classification",
    with_ief_weights: bool = False,
):
  """The same objective with δ given: ``loss_fn(params, batch, rng, delta) -> [B]``.

  Pair it with :func:`adversarial_perturbation` (computed first, a constant):

      delta = adversarial_perturbation(logits_fn, config, params, batch, rng, ...)
      per_example_grads(make_loss_at_perturbation(logits_fn, config), params, batch, rng, delta)

  equals ``make_per_example_loss``'s gradients, but the differentiated function contains
  no inner differentiation (the ascent for δ happens outside it). That is what
  ``per_example_grads(..., method="factored")`` needs to factor every layer: inside
  ``make_per_example_loss`` the ascent's backward pass reads the kernels outside their
  layers' calls, which sends every leaf to the exact (slow) fallback. It costs one more
  forward pass than sharing the clean forward with the ascent.

  ``with_ief_weights``: ``loss_fn`` returns ``(losses, s)`` with the iEF weights s of the
  same forward passes (constants: ``stop_gradient``), for
  ``per_example_value_and_grads(..., has_aux=True)``. Which weights is
  ``config.ief_weights`` (:func:`ief_weights`): "clean_term" (default),
  :func:`nearprox.text.losses.ief_weights` at the clean logits, i.e. from the clean task term
  only; "whole_loss", the squared logit gradient of the whole per-example loss over the clean
  and the perturbed logits.
  """
  _check(config, task, 1)

  def loss_fn(params, batch, rng, delta):
    dropout_keys, _ = _split_keys(rng, _perturbed_ids(task, batch).shape[0])
    clean_logits = logits_fn(params, batch, None, dropout_keys)
    perturbed_logits = None
    if config.kind == "clean":
      values = _task_loss(config, task, clean_logits, batch)
    else:
      perturbed_logits = logits_fn(params, batch, jax.lax.stop_gradient(delta), dropout_keys)
      values = _combine(config, task, batch, clean_logits, perturbed_logits)
    if not with_ief_weights:
      return values
    return values, ief_weights(config, task, batch, clean_logits, perturbed_logits)

  return loss_fn


def ief_weights(config: ObjectiveConfig, task: str, batch: Batch, clean_logits, perturbed_logits):
  """The iEF weights s [B] of the objective's per-example loss ℓ at the given logits
  (constants: computed from ``stop_gradient`` of the logits).

  ``config.ief_weights == "clean_term"`` (and every kind="clean" objective):
  s_i = ‖∇_z task_i‖² at the clean logits z (:func:`nearprox.text.losses.ief_weights`),
  whatever the adversarial term. ``"whole_loss"``: s_i = ‖∂ℓ_i/∂z_i‖² + ‖∂ℓ_i/∂z̃_i‖² for
  ℓ_i = :func:`_combine`'s task + adv_weight·adv (or adv alone), z the clean and z̃ the
  perturbed logits (``perturbed_logits``; a tuple of start and end logits for "qa"), with
  the objective's own stop-gradients (SMART's KL directions), i.e. exactly the logit
  gradient that the parameter gradient g_i = J_zᵀ∂ℓ_i/∂z + J_z̃ᵀ∂ℓ_i/∂z̃ is made of. One
  gradient of Σ_i ℓ_i at the logits, whose row i is example i's (ℓ_i depends on row i only).
  For example, FGM/PGD classification with combine="sum":
  s_i = ‖softmax(z_i) − y_i‖² + adv_weight²·‖softmax(z̃_i) − y_i‖²; SMART:
  ‖softmax(z_i) − y_i + a(p_i − p̃_i)‖² + a²‖p̃_i − p_i‖².
  """
  clean_logits = jax.lax.stop_gradient(clean_logits)
  if config.kind == "clean" or config.ief_weights == "clean_term":
    return losses.ief_weights(task, clean_logits, batch, label_smoothing=config.label_smoothing)
  perturbed_logits = jax.lax.stop_gradient(perturbed_logits)
  total = lambda clean, perturbed: jnp.sum(_combine(config, task, batch, clean, perturbed))
  grads = jax.grad(total, argnums=(0, 1))(clean_logits, perturbed_logits)
  return sum(
      jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
      for g in jax.tree.leaves(grads)
  )
