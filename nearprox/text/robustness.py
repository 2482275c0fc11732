"""Robustness evaluation: accuracy under an embedding-space PGD attack, over a grid of ε.

For each radius ε the attacker perturbs every example's word embeddings by δ_i with
‖δ_i‖ ≤ ε (padding tokens untouched), found by K steps of projected steepest ascent on the
example's cross-entropy (Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks"). The step size defaults to Madry's 2.5·ε/K. ε = 0 is the clean
accuracy. The model is evaluated deterministically (no dropout).

Each example keeps its most damaging iterate (a misclassifying one if any, else the one of
highest loss), and with ``warm_start=True`` the radii are attacked in increasing order, each
starting from the previous radius's best perturbation (which lies inside the larger ball).
So the reported accuracy is non-increasing in ε, as the true robust accuracy is; a plain
last-iterate PGD is not (its larger steps at large ε can overshoot). The numbers are an
upper bound on the robust accuracy: a stronger attack can only lower them. Rows with
``batch["mask"] == 0`` (padding of a last partial batch) are left out of every count.

    rows = attack_accuracy(bert_logits_fn(model), params, batches, [0, 0.5, 1, 2],
                           hidden_size=config.hidden_size)
    write_csv(rows, "robustness.csv"); plot_accuracy(rows, "robustness.png")
"""

from __future__ import annotations

import csv
import functools
import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nearprox.text import losses, objectives, perturbations

FIELDS = ("epsilon", "accuracy", "loss", "num_examples", "num_steps", "step_size", "norm")


def madry_step_size(epsilon: float, num_steps: int) -> float:
  """α = 2.5·ε/K (Madry et al. 2018, appendix)."""
  return 2.5 * epsilon / num_steps


def pgd_attack(
    logits_fn: objectives.LogitsFn,
    params,
    batch,
    *,
    epsilon,
    step_size,
    num_steps: int,
    norm: str = "l2",
    hidden_size: int,
    start=None,
):
  """The most damaging of K PGD iterates per example, in the ε-ball, zero on padding.

  Starts from ``start`` (projected into the ball; default δ = 0), takes K steps
  δ ← Π_ε(δ + α·dir(∇_δ CE)) and keeps, per example, the iterate (start included) that
  misclassifies, or failing that has the highest cross-entropy. Deterministic forward
  (``rng=None``); ``epsilon`` and ``step_size`` may be traced (one compilation per grid).

  Returns:
    (δ [B, T, hidden_size], misclassified [B] bool, cross-entropy at δ [B]).
  """
  if norm not in perturbations.NORMS:
    raise ValueError(f"norm must be one of {perturbations.NORMS}, got {norm!r}")
  labels = batch["labels"]
  mask = perturbations.token_mask(batch)
  if start is None:
    start = jnp.zeros((*batch["input_ids"].shape, hidden_size), jnp.float32)
  start = perturbations.project_to_ball(start * mask, epsilon, norm)

  def evaluate(delta):
    logits = logits_fn(params, batch, delta, None)
    if not (hasattr(logits, "ndim") and logits.ndim == 2):
      raise ValueError("pgd_attack needs classification logits [B, k] from logits_fn")
    return losses.cross_entropy_loss(logits, labels), jnp.argmax(logits, axis=-1) != labels

  def keep_best(best, delta, loss, wrong):
    best_delta, best_wrong, best_loss = best
    better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
    pick = lambda new, old: jnp.where(better.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    return pick(delta, best_delta), pick(wrong, best_wrong), pick(loss, best_loss)

  def step(_, carry):
    delta, best = carry
    loss, pullback, wrong = jax.vjp(evaluate, delta, has_aux=True)
    grad = pullback(jnp.ones_like(loss))[0] * mask
    best = keep_best(best, delta, loss, wrong)
    moved = delta + step_size * perturbations.steepest_ascent_direction(grad, norm)
    return perturbations.project_to_ball(moved, epsilon, norm) * mask, best

  loss, wrong = evaluate(start)
  delta, best = jax.lax.fori_loop(0, num_steps, step, (start, (start, wrong, loss)))
  best = keep_best(best, delta, *evaluate(delta))
  return jax.tree.map(jax.lax.stop_gradient, best)


@functools.lru_cache(maxsize=16)  # One compilation per model across calls (e.g. each epoch).
def _make_batch_attack(logits_fn, hidden_size, num_steps, norm):
  @jax.jit
  def attack(params, batch, epsilon, step_size, start):
    delta, wrong, loss = pgd_attack(
        logits_fn,
        params,
        batch,
        epsilon=epsilon,
        step_size=step_size,
        num_steps=num_steps,
        norm=norm,
        hidden_size=hidden_size,
        start=start,
    )
    weight = batch.get("mask")
    weight = jnp.ones(loss.shape, jnp.float32) if weight is None else weight.astype(jnp.float32)
    correct = 1.0 - wrong.astype(jnp.float32)
    return delta, jnp.sum(weight * correct), jnp.sum(weight * loss), jnp.sum(weight)

  return attack


def attack_accuracy(
    logits_fn: objectives.LogitsFn,
    params,
    batches: Iterable,
    epsilons: Sequence[float],
    *,
    hidden_size: int,
    num_steps: int = 10,
    step_size: float | None = None,
    norm: str = "l2",
    warm_start: bool = True,
) -> list[dict]:
  """Accuracy (and mean cross-entropy) under the PGD attack, one row per ε.

  Args:
    logits_fn: ``logits_fn(params, batch, word_embeddings_delta, rng)`` → logits [B, k]
      (e.g. :func:`nearprox.text.models.bert_logits_fn` (model)); called with ``rng=None``.
    params: the model parameters.
    batches: batches (dicts with ``input_ids``, ``labels``, optional ``attention_mask``,
      ``token_type_ids``, ``mask``); materialized once as a list.
    epsilons: attack radii, each ≥ 0 (0 gives the clean accuracy), in any order.
    hidden_size: the word-embedding width.
    num_steps: PGD steps K per radius.
    step_size: α; None gives 2.5·ε/K for each ε.
    norm: "l2" (default) or "linf" ball.
    warm_start: attack radii in increasing order, each from the previous best δ.

  Returns:
    ``[{"epsilon", "accuracy", "loss", "num_examples", "num_steps", "step_size", "norm"}]``
    in the order of ``epsilons``; accuracy and loss over unmasked rows.
  """
  if norm not in perturbations.NORMS:
    raise ValueError(f"norm must be one of {perturbations.NORMS}, got {norm!r}")
  if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  if step_size is not None and not step_size >= 0:
    raise ValueError(f"step_size must be >= 0 or None, got {step_size!r}")
  epsilons = [float(e) for e in epsilons]
  if not epsilons or any(not e >= 0 for e in epsilons):
    raise ValueError(f"epsilons must be a non-empty list of numbers >= 0, got {epsilons}")
  batches = list(batches)
  if not batches:
    raise ValueError("batches is empty")
  attack = _make_batch_attack(logits_fn, hidden_size, num_steps, norm)
  starts = [None] * len(batches)
  rows = {}
  for epsilon in sorted(set(epsilons)):
    alpha = madry_step_size(epsilon, num_steps) if step_size is None else step_size
    correct = total_loss = count = 0.0
    for i, batch in enumerate(batches):
      start = starts[i]
      if start is None:
        start = jnp.zeros((*batch["input_ids"].shape, hidden_size), jnp.float32)
      delta, num_correct, loss_sum, num = attack(
          params, batch, jnp.float32(epsilon), jnp.float32(alpha), start
      )
      if warm_start:
        starts[i] = delta
      correct, total_loss, count = (
          correct + float(num_correct),
          total_loss + float(loss_sum),
          count + float(num),
      )
    if count == 0:
      raise ValueError("every row of every batch is masked (batch['mask'] == 0)")
    rows[epsilon] = dict(
        epsilon=epsilon,
        accuracy=correct / count,
        loss=total_loss / count,
        num_examples=int(count),
        num_steps=num_steps,
        step_size=alpha,
        norm=norm,
    )
  return [dict(rows[e]) for e in epsilons]


def write_csv(rows: Sequence[dict], path) -> None:
  """The rows of :func:`attack_accuracy` as a CSV table (columns ``FIELDS``)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path) -> list[dict]:
  """Reads :func:`write_csv`'s table back (numbers as float/int)."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for key in ("epsilon", "accuracy", "loss", "step_size"):
      row[key] = float(row[key])
    for key in ("num_examples", "num_steps"):
      row[key] = int(row[key])
  return rows


def plot_accuracy(curves, path, title: str = "Accuracy under embedding-space PGD") -> None:
  """Accuracy vs ε as a PNG (matplotlib, Agg backend).

  ``curves``: the rows of one :func:`attack_accuracy` call, or a dict label → rows to
  compare several models/objectives on one plot.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not isinstance(curves, dict):
    curves = {None: curves}
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, rows in curves.items():
    eps = np.array([r["epsilon"] for r in rows])
    acc = np.array([r["accuracy"] for r in rows])
    ax.plot(eps, acc, marker="o", label=label)
  first = next(iter(curves.values()))[0]
  ax.set_xlabel(f"ε ({first['norm']} ball on word embeddings, K={first['num_steps']})")
  ax.set_ylabel("accuracy under attack")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.set_title(title)
  if any(label is not None for label in curves):
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
