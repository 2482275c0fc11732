"""The optimizers of the training config, and the L2 term they share.

``create_optimizer(config, num_steps, axis_name)`` builds ``config.optimizer.name`` (one of
:data:`OPTIMIZERS`) with the warmup + linear-decay schedule of :func:`learning_rate_schedule`.
The L2 gradient λθ (on dense kernels, :func:`kernel_mask`) is added after any proximal filter:
it is the same for every example, so it stays out of the per-example Gram matrix.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

import nearprox

Params = Any
OPTIMIZERS = ("proximal_sgd", "proximal_norm_sgd", "sgd", "adamw")


def learning_rate_schedule(config, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak learning rate, then linear decay to 0."""
  peak = config.optimizer.learning_rate
  warmup = int(round(config.optimizer.warmup_fraction * num_steps))
  return optax.join_schedules(
      [
          optax.linear_schedule(0.0, peak, max(warmup, 1)),
          optax.linear_schedule(peak, 0.0, max(num_steps - warmup, 1)),
      ],
      [warmup],
  )


def create_optimizer(config, num_steps: int, axis_name: str | None):
  """(optax transformation, whether it takes per-example gradients)."""
  opt = config.optimizer
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {opt.name!r}")
  schedule = learning_rate_schedule(config, num_steps)
  # The L2 gradient λθ is added after any filtering: it is the same for every example.
  l2 = l2_regularization(config.objective.l2_weight)
  sgd = optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov)
  if opt.name == "proximal_sgd":
    proximal = nearprox.scale_by_proximal(
        opt.damping,
        filter=opt.filter,
        damping_mode=opt.damping_mode,
        axis_name=axis_name,
        gram=opt.gram if axis_name else "local",
    )  # one device: local and global coincide
    return optax.chain(proximal, l2, sgd), True
  if opt.name == "proximal_norm_sgd":
    return optax.chain(nearprox.scale_by_proximal_norm(opt.damping), l2, sgd), False
  if opt.name == "sgd":
    return optax.chain(l2, sgd), False
  adamw = optax.adamw(schedule, weight_decay=opt.weight_decay, mask=kernel_mask)
  return optax.chain(l2, adamw), False


def _leaf_name(path) -> str | None:
  last = path[-1] if path else None
  for attr in ("key", "name", "idx"):
    if hasattr(last, attr):
      return str(getattr(last, attr))
  return None


def kernel_mask(params: Params) -> Params:
  """True on leaves named ``"kernel"`` (dense weights), False elsewhere: biases, LayerNorm
  ``scale``/``bias`` and ``embedding`` tables are not decayed (BERT fine-tuning practice)."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) == "kernel", params)


def _resolve_mask(mask, params):
  return mask(params) if callable(mask) else mask


def l2_penalty(params: Params, weight: float, mask=kernel_mask) -> jax.Array:
  """λ·½‖θ_S‖² (a scalar) over the leaves selected by ``mask`` (pytree of bools or a
  function of params); for logging, the gradient is applied by :func:`l2_regularization`."""
  selected = jax.tree.map(
      lambda p, m: jnp.sum(jnp.square(p.astype(jnp.float32))) if m else jnp.zeros((), jnp.float32),
      params,
      _resolve_mask(mask, params),
  )
  return 0.5 * weight * sum(jax.tree.leaves(selected), jnp.zeros((), jnp.float32))


def l2_regularization(weight: float, mask=kernel_mask) -> optax.GradientTransformation:
  """Adds ∇(λ·½‖θ_S‖²) = λ·θ on the selected leaves (0 elsewhere) to the updates.

  ``optax.add_decayed_weights(weight, mask)``; place it AFTER ``scale_by_proximal`` (the
  L2 gradient is the same for every example, so it stays out of the per-example Gram) and
  before the learning-rate scaling, e.g.
  ``optax.chain(nearprox.scale_by_proximal(d), l2_regularization(λ), optax.sgd(lr))``.
  """
  if not weight >= 0:
    raise ValueError(f"weight must be >= 0, got {weight!r}")
  return optax.add_decayed_weights(weight, mask)
