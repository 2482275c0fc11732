"""Per-example task losses, their logit gradients' squared norms (iEF weights) and SMART's
smoothness divergence: logits in, one number per example [B] out.

``task`` is one of :data:`TASKS`: ``"classification"`` (logits [B, k], integer
``batch["labels"]``), ``"regression"`` (predictions [B] or [B, 1], float ``batch["labels"]``)
``"qa"`` (a pair of start and end logits [B, T], ``batch["start_positions"]`` and
``batch["end_positions"]``) or ``"translation"`` (logits [B, T, V] of every target position,
integer ``batch["target_output_ids"]`` [B, T], padding id :data:`PAD_ID` = 0: one sentence
pair is one example, its loss the mean over its target tokens).

References:
  Wu, Yu, Zhang & Woodland, "An Improved Empirical Fisher Approximation for Natural Gradient
  Descent", NeurIPS 2024, arXiv 2406.06420 (the iEF weights).
  Jiang et al., "SMART: Robust and Efficient Fine-Tuning for Pre-trained Natural Language
  Models through Principled Regularized Optimization", ACL 2020 (the smoothness term).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, jax.Array]
TASKS = ("classification", "regression", "qa", "translation")
PAD_ID = 0  # translation targets: the padding id (nearprox.text.data.subwords.PAD_ID)


def _single_output(predictions: jax.Array) -> jax.Array:
  """Regression outputs [B] or [B, 1] as a float32 vector [B]; other shapes are an error."""
  predictions = predictions.reshape(predictions.shape[0], -1)
  if predictions.shape[1] != 1:
    raise ValueError(
        f"regression needs one output per example (num_labels=1), got "
        f"predictions of shape {predictions.shape}"
    )
  return predictions[:, 0].astype(jnp.float32)


def _by_task(
    task: str, logits, batch: Batch, *, classification, regression, qa, translation
) -> jax.Array:
  """The task's function of (logits, labels): ``classification`` and ``regression`` take
  (logits, ``batch["labels"]``), ``qa`` takes (start logits, end logits, start and end
  positions), ``translation`` (logits, ``batch["target_output_ids"]``)."""
  if task == "translation":
    return translation(logits, batch["target_output_ids"])
  if task == "classification":
    return classification(logits, batch["labels"])
  if task == "regression":
    return regression(logits, batch["labels"])
  if task == "qa":
    start_logits, end_logits = logits
    return qa(start_logits, end_logits, batch["start_positions"], batch["end_positions"])
  raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """−log softmax(logits)[label] per example: logits [B, k], integer labels [B] → [B]."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32)
  )


def mse_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """Squared error (pred − y)² per example: predictions [B] or [B, 1], targets [B] → [B]."""
  return jnp.square(_single_output(predictions) - targets.astype(jnp.float32))


def span_cross_entropy_loss(start_logits, end_logits, start_positions, end_positions):
  """Extractive QA: ½(CE(start) + CE(end)) per example; logits [B, T], positions [B]."""
  return 0.5 * (
      cross_entropy_loss(start_logits, start_positions)
      + cross_entropy_loss(end_logits, end_positions)
  )


def symmetric_kl(logits: jax.Array, perturbed_logits: jax.Array) -> jax.Array:
  """KL(sg(p̃)‖p) + KL(sg(p)‖p̃) per example (value: the symmetric KL, ≥ 0), [B, k] → [B].

  Each direction's target distribution is a constant, as in mt-dnn's SymKlCriterion, so
  the gradient flows into p through the first term and into p̃ through the second.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(perturbed_logits.astype(jnp.float32), axis=-1)
  sg = jax.lax.stop_gradient
  kl_q_p = jnp.sum(jnp.exp(sg(log_q)) * (sg(log_q) - log_p), axis=-1)
  kl_p_q = jnp.sum(jnp.exp(sg(log_p)) * (sg(log_p) - log_q), axis=-1)
  return kl_q_p + kl_p_q


def _target_mask(targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(1 on real target tokens [B, T], their count n_i ≥ 1 [B])."""
  mask = (targets != PAD_ID).astype(jnp.float32)
  return mask, jnp.maximum(jnp.sum(mask, axis=-1), 1.0)


def _smoothed_targets(targets: jax.Array, vocab_size: int, label_smoothing: float) -> jax.Array:
  """ỹ_t = (1 − ε)·onehot(y_t) + ε/V, [B, T, V]."""
  one_hot = jax.nn.one_hot(targets.astype(jnp.int32), vocab_size, dtype=jnp.float32)
  return optax.smooth_labels(one_hot, label_smoothing)


def translation_loss(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
  """ℓ_i = (1/n_i) Σ_t m_it CE(ỹ_it, softmax(z_it)) per sentence pair: logits [B, T, V],
  target ids [B, T] (0 = padding, m = 0), n_i = Σ_t m_it real target tokens → [B].

  ỹ is the one-hot target smoothed towards uniform by ``label_smoothing`` ε (Szegedy et
  al. 2016, "Rethinking the Inception Architecture for Computer Vision"; 0.1 in Vaswani et
  al. 2017).
  """
  mask, count = _target_mask(targets)
  soft = _smoothed_targets(targets, logits.shape[-1], label_smoothing)
  token_losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), soft)
  return jnp.sum(token_losses * mask, axis=-1) / count


def _check_smoothing(task: str, label_smoothing: float) -> None:
  if label_smoothing and task != "translation":
    raise ValueError(
        f"label_smoothing is for task 'translation', got {label_smoothing} for {task!r}"
    )


def task_loss(task: str, logits, batch: Batch, *, label_smoothing: float = 0.0) -> jax.Array:
  """The task's per-example loss [B] from ``logits_fn``'s output and the batch's labels.

  classification: ``batch["labels"]`` int [B]; regression: ``batch["labels"]`` float [B];
  qa: ``batch["start_positions"]``, ``batch["end_positions"]`` int [B]; translation:
  ``batch["target_output_ids"]`` int [B, T] (``label_smoothing`` ε: translation only).
  """
  _check_smoothing(task, label_smoothing)
  return _by_task(
      task,
      logits,
      batch,
      classification=cross_entropy_loss,
      regression=mse_loss,
      qa=span_cross_entropy_loss,
      translation=lambda z, y: translation_loss(z, y, label_smoothing),
  )


# ----------------------------------------------------------------------------------------
# Example weights for nearprox.scale_by_proximal: s_n = ‖∇_{z_n} ℓ_n‖², the squared norm of
# example n's task-loss gradient with respect to its own logits z_n (the iEF weights of Wu,
# Yu, Zhang & Woodland, "An Improved Empirical Fisher Approximation for Natural Gradient
# Descent", NeurIPS 2024, arXiv 2406.06420). Each is the exact gradient of the loss above it.


def cross_entropy_logit_grad_sq_norm(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """‖∇_z cross_entropy_loss‖² = ‖softmax(z) − onehot(y)‖² per example: [B, k], [B] → [B]."""
  logits = logits.astype(jnp.float32)
  residual = jax.nn.softmax(logits, axis=-1) - jax.nn.one_hot(
      labels.astype(jnp.int32), logits.shape[-1], dtype=jnp.float32
  )
  return jnp.sum(jnp.square(residual), axis=-1)


def mse_grad_sq_norm(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """‖∇_p mse_loss‖² = (2(p − y))² per example: predictions [B] or [B, 1], targets [B] → [B]."""
  residual = _single_output(predictions) - targets.astype(jnp.float32)
  return 4.0 * jnp.square(residual)


def span_cross_entropy_grad_sq_norm(start_logits, end_logits, start_positions, end_positions):
  """‖∇ span_cross_entropy_loss‖² over both start and end logits, per example [B].

  The loss is ½(CE(start) + CE(end)), so each half's gradient carries a factor ½:
  ¼(‖softmax(s) − e_start‖² + ‖softmax(e) − e_end‖²).
  """
  return 0.25 * (
      cross_entropy_logit_grad_sq_norm(start_logits, start_positions)
      + cross_entropy_logit_grad_sq_norm(end_logits, end_positions)
  )


def translation_grad_sq_norm(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0):
  """‖∇_z translation_loss‖² = (1/n_i²) Σ_t m_it ‖softmax(z_it) − ỹ_it‖² per pair, [B]
  (docs/method.md: each token's cross-entropy gradient is p_t − ỹ_t, scaled by the 1/n_i of
  the mean; padded positions have no gradient)."""
  mask, count = _target_mask(targets)
  soft = _smoothed_targets(targets, logits.shape[-1], label_smoothing)
  residual = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) - soft
  return jnp.sum(jnp.sum(jnp.square(residual), axis=-1) * mask, axis=-1) / jnp.square(count)


def ief_weights(task: str, logits, batch: Batch, *, label_smoothing: float = 0.0) -> jax.Array:
  """s_n = ‖∇_{z_n} task_loss_n‖² [B] for ``task_loss(task, logits, batch)``, same inputs.

  Pass them as ``example_weights`` to :func:`nearprox.scale_by_proximal`. With the natural
  filter and ``weight_normalization="damping"`` the update is Wu et al.'s damped iEF step
  Gᵀ(K+λI)⁻¹s (eq. 8: λI on the unnormalized Gram, not the damped iEF matrix); with the
  default ``"sum"`` it is that step times λ / Σ s, a per-batch scalar that a fixed learning
  rate does not absorb (the "graft" and "quadratic" step sizes do; docs/method.md §1.4).
  They are constants for the parameter gradient (wrap them in ``jax.lax.stop_gradient``
  when computed inside a differentiated function). For an adversarial objective these are
  the clean task term's weights; :func:`nearprox.text.objectives.ief_weights` also offers
  the whole loss's.
  """
  _check_smoothing(task, label_smoothing)
  return _by_task(
      task,
      logits,
      batch,
      classification=cross_entropy_logit_grad_sq_norm,
      regression=mse_grad_sq_norm,
      qa=span_cross_entropy_grad_sq_norm,
      translation=lambda z, y: translation_grad_sq_norm(z, y, label_smoothing),
  )


def smoothness_divergence(task: str, logits, perturbed_logits, batch: Batch | None = None):
  """SMART's label-free ℓ_s per example [B]: symmetric KL (classification; mean over start
  and end for qa; for translation per target token, averaged over the pair's real target
  tokens, which ``batch["target_output_ids"]`` marks) or squared difference of the outputs
  (regression, as mt-dnn)."""
  if task == "translation":
    if batch is None:
      raise ValueError("smoothness_divergence('translation', ...) needs the batch (target mask)")
    mask, count = _target_mask(batch["target_output_ids"])
    return jnp.sum(symmetric_kl(logits, perturbed_logits) * mask, axis=-1) / count
  if task == "classification":
    return symmetric_kl(logits, perturbed_logits)
  if task == "regression":
    diff = (perturbed_logits - logits).astype(jnp.float32)
    return jnp.sum(jnp.square(diff.reshape(diff.shape[0], -1)), axis=-1)
  if task == "qa":
    return 0.5 * (
        symmetric_kl(logits[0], perturbed_logits[0]) + symmetric_kl(logits[1], perturbed_logits[1])
    )
  raise ValueError(f"task must be one of {TASKS}, got {task!r}")
