"""The optimizers of the training config, and the L2 term they share.

``create_optimizer(config, num_steps, axis_name)`` builds ``config.optimizer.name`` (one of
:data:`OPTIMIZERS`) with the warmup + linear-decay schedule of :func:`warmup_linear_decay`.
The peak learning rate and the proximal filter's damping are optimizer state
(``optax.inject_hyperparams``), so runs that differ only in them share one compiled step.
The L2 gradient λθ (on dense kernels, :func:`kernel_mask`) is added after any proximal filter:
it is the same for every example, so it stays out of the per-example Gram matrix.
``config.optimizer.l1_weight`` > 0 ends every chain with the L1 prox on kernels
(:func:`nearprox.soft_threshold_l1`, soft-thresholding at η_t·λ₁ with the same schedule).

The per-example optimizers put :func:`nearprox.scale_by_proximal` first: "proximal_sgd"
(SGD on the filtered gradient) and "proximal_adamw" (AdamW on it, the filter in front of
Adam as in Natural GaLore). ``config.optimizer.weighting`` ("uniform" or "ief") and
``step_size`` / ``max_update_norm`` (0 disables the clip) configure the filter; the
weighting needs a per-example optimizer. "weighted_mean_adamw" is the ablation of
"proximal_adamw" without the filter: AdamW on the example-weighted mean of the per-example
gradients (:func:`weighted_mean_aggregate`), the same weights and chain, no Gram.
"pcgrad_adamw" (``config.task = "multitask"`` only) is the multi-task peer: AdamW on Yu et
al.'s PCGrad direction (:func:`nearprox.pcgrad_aggregate`, the per-task gradients of the
mixed batch with their conflicting components projected away), seeded by ``config.seed``.

The peers (:data:`PEERS`, what a JAX user would pick instead of AdamW) keep their library's
direction and defaults inside AdamW's chain: the L2 gradient first, then the direction, the
decoupled weight decay on kernels, the learning rate. "muon" (``optax.contrib`` Muon on the
hidden layers' matrices, :func:`muon_mask`; its Adam elsewhere), "lion" (``optax.lion``),
"psgd_kron" (``psgdax``, imported only when asked for), "schedule_free_adamw"
(``optax.contrib.schedule_free_adamw``: warmup, then a constant rate; evaluate and export
:func:`evaluation_params`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nearprox
from nearprox import pcgrad, spectral_filter

Params = Any
PEERS = ("muon", "schedule_free_adamw", "lion", "psgd_kron")
OPTIMIZERS = ("proximal_sgd", "proximal_adamw", "proximal_norm_sgd", "sgd", "adamw", *PEERS)
OPTIMIZERS += ("weighted_mean_adamw",)
# Optimizers of multi-task runs only: their update needs each example's task (task_ids=).
MULTITASK_OPTIMIZERS = ("pcgrad_adamw",)
PER_EXAMPLE_OPTIMIZERS = ("proximal_sgd", "proximal_adamw", "weighted_mean_adamw", "pcgrad_adamw")
# Aggregations of per-example gradients without the Gram filter: the filter's settings do not apply.
_WITHOUT_FILTER = ("weighted_mean_adamw", "pcgrad_adamw")
WEIGHTINGS = ("uniform", "ief")


def warmup_linear_decay(peak_learning_rate, warmup_steps: int, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak learning rate, then linear decay to 0."""
  return optax.join_schedules(
      [
          optax.linear_schedule(0.0, peak_learning_rate, max(warmup_steps, 1)),
          optax.linear_schedule(peak_learning_rate, 0.0, max(num_steps - warmup_steps, 1)),
      ],
      [warmup_steps],
  )


def _scale_by_warmup_linear_decay(peak_learning_rate, warmup_steps: int, num_steps: int):
  return optax.scale_by_learning_rate(
      warmup_linear_decay(peak_learning_rate, warmup_steps, num_steps)
  )


# The peak learning rate and the filter's damping live in the optimizer state, so they are
# inputs of the compiled train step rather than constants folded into it: the trials of a
# tuning grid (and their seeds) share one executable and the persistent compilation cache.
_scale_by_learning_rate = optax.inject_hyperparams(
    _scale_by_warmup_linear_decay, static_args=("warmup_steps", "num_steps")
)
_scale_by_proximal = optax.inject_hyperparams(
    nearprox.scale_by_proximal,
    static_args=[
        p for p in inspect.signature(nearprox.scale_by_proximal).parameters if p != "damping"
    ],
)
_scale_by_proximal_norm = optax.inject_hyperparams(nearprox.scale_by_proximal_norm)


# ------------------------------------------------------------------------------ the peers

# The task heads of nearprox.text.models: the output layer, which Muon leaves to Adam.
OUTPUT_HEADS = ("classifier", "qa_outputs")
# Muon's update scaled to AdamW's RMS, 0.2·√max(fan_in, fan_out) (Liu et al. 2025, "Muon is
# Scalable for LLM Training"), so one learning rate and weight decay serve both of its parts
# and AdamW's grid transfers; without it (optax's default width scaling) Muon's matrices want
# a rate 10-100× Adam's, a second rate to tune.
MUON_CONSISTENT_RMS = 0.2


def muon_dimension_numbers(params: Params) -> Params:
  """Per leaf, how Muon sees it as a matrix (``optax.contrib.MuonDimensionNumbers``: its
  reduction and output axes), or None for the leaves its Adam trains.

  Muon orthogonalizes the ``kernel`` of every hidden dense layer (attention, feed-forward,
  pooler): a 2-D [in, out] kernel as it is, and flax attention's 3-D kernels as the matrix of
  the map they compute: query/key/value [in, heads, head_dim] with reduction axis 0 and
  output axes (1, 2), the output projection ``out`` [heads, head_dim, out] with reduction axes
  (0, 1) and output axis 2. Adam trains biases, LayerNorm, the ``embedding`` tables (the
  input layer) and the task head (:data:`OUTPUT_HEADS`, the output layer), as Muon's authors
  prescribe (Jordan et al. 2024: "the input embedding, final output layer, and any internal
  gains or biases should be optimized using a standard method such as AdamW"; Liu et al.
  2025 keep embeddings and head on AdamW too)."""
  dims = optax.contrib.MuonDimensionNumbers

  def of_leaf(path, x):
    top = getattr(path[0], "key", None) if path else None
    if _leaf_name(path) != "kernel" or top in OUTPUT_HEADS:
      return None
    if jnp.ndim(x) == 2:
      return dims(0, 1)
    if jnp.ndim(x) == 3:
      module = getattr(path[-2], "key", None) if len(path) > 1 else None
      return dims((0, 1), 2) if module == "out" else dims(0, (1, 2))
    return None

  return jax.tree_util.tree_map_with_path(of_leaf, params)


def muon_mask(params: Params) -> Params:
  """True on the leaves Muon orthogonalizes (:func:`muon_dimension_numbers`), False on the
  leaves its Adam trains."""
  numbers = muon_dimension_numbers(params)
  return jax.tree.map(
      lambda n: n is not None, numbers, is_leaf=lambda n: n is None or isinstance(n, tuple)
  )


def _muon_fans(numbers, shape) -> tuple[int, int]:
  """(fan_in, fan_out): the products of a Muon leaf's reduction and output axes."""
  axes = lambda a: (a,) if isinstance(a, int) else tuple(a)
  fan_in = math.prod(shape[a] for a in axes(numbers.reduction_axis))
  return fan_in, math.prod(shape[a] for a in axes(numbers.output_axis))


def scale_by_muon_and_adam() -> optax.GradientTransformation:
  """``optax.contrib.muon``'s directions with its defaults, before weight decay and learning
  rate: Muon (Nesterov momentum β = 0.95, 5 Newton–Schulz steps, scaled to AdamW's RMS,
  :data:`MUON_CONSISTENT_RMS`·√max(fan_in, fan_out)) on the leaves of
  :func:`muon_dimension_numbers`, and Muon's inner Adam (b1 0.9, b2 0.999, eps 1e-8,
  Nesterov, as ``muon`` builds it) on the others."""
  is_numbers = lambda n: isinstance(n, optax.contrib.MuonDimensionNumbers)
  # The muon branch sees its own leaves only (the others are masked out of its tree).
  numbers = lambda updates: muon_dimension_numbers(updates)

  def rms_like_adamw(updates, state, params=None):
    del params
    scale = lambda u, n: u * (MUON_CONSISTENT_RMS * math.sqrt(max(_muon_fans(n, u.shape))))
    return jax.tree.map(scale, updates, numbers(updates), is_leaf=is_numbers), state

  return optax.partition(
      {
          "muon": optax.chain(
              optax.contrib.scale_by_muon(weight_dimension_numbers=numbers),
              optax.GradientTransformation(lambda _: optax.EmptyState(), rms_like_adamw),
          ),
          "adam": optax.scale_by_adam(nesterov=True),
      },
      lambda params: jax.tree.map(lambda m: "muon" if m else "adam", muon_mask(params)),
  )


def scale_by_psgd_kron(seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """``psgdax.kron``'s direction with its defaults (Kronecker-factored preconditioners,
  momentum 0.9, preconditioner scale from the first gradients, updates clipped to RMS 1),
  its random preconditioner updates seeded by ``seed``. psgdax is optional (the ``train``
  extra): imported here, when asked for."""
  try:
    import psgdax
  except ImportError as error:
    raise ImportError(
        "config.optimizer.name='psgd_kron' needs psgdax: pip install psgdax (or nearprox[train])"
    ) from error
  return psgdax.scale_by_kron(preconditioner_init_scale=None, key=jax.random.PRNGKey(seed))


def _schedule_free_adamw(peak_learning_rate, warmup_steps: int, weight_decay):
  """``optax.contrib.schedule_free_adamw`` (b1 0.9, b2 0.999, eps 1e-8, weight_lr_power 2)
  with its weight decay on kernels only (:func:`kernel_mask`, as AdamW's). Its learning rate
  warms up linearly and then stays constant: schedule-free forbids a decay, the averaging of
  the iterates does its work (Defazio et al. 2024)."""
  schedule = optax.warmup_constant_schedule(0.0, peak_learning_rate, max(warmup_steps, 1))
  adamw_without_momentum = optax.chain(
      optax.scale_by_rms(decay=0.999, eps=1e-8, eps_in_sqrt=False, bias_correction=True),
      optax.add_decayed_weights(weight_decay, kernel_mask),
      optax.scale_by_learning_rate(schedule),
  )
  return optax.contrib.schedule_free(adamw_without_momentum, schedule, b1=0.9)


_schedule_free = optax.inject_hyperparams(_schedule_free_adamw, static_args=("warmup_steps",))


def weighted_mean_aggregate(axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
  """Aggregates per-example gradients into their example-weighted mean, with no filter:

      d = Σ_i w_i g_i,     w = m∘s / Σ m∘s,

  mask m and example weights s ≥ 0 (s = 1 by default: the plain masked mean), the right-hand
  side of :func:`nearprox.scale_by_proximal` without K: it is that transformation with the
  identity in place of f(K). Like it, it comes first in a chain and takes the params pytree
  with a leading batch axis on every leaf, or the factored form of
  :func:`nearprox.per_example_grads`; ``update(..., mask=None, example_weights=None)``.
  With ``axis_name`` (pmap / shard_map) the normalization Σ m∘s is over the global batch, so
  every split of the batch gives the same d. Masked rows are zeroed first (NaN included);
  an all-zero mass gives d = 0.

  With the iEF weights s_i = ‖∇_z ℓ_i‖² in front of AdamW, it separates the iEF weights'
  share of "iEF → AdamW" from the Gram filter's (issue 40, part 2).

  References:
    Wu, Yu, Zhang & Woodland, `An Improved Empirical Fisher Approximation for Natural
    Gradient Descent <https://arxiv.org/abs/2406.06420>`_, NeurIPS 2024 (the iEF weights).
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, mask=None, example_weights=None, **extra_args):
    del params, extra_args
    batch = spectral_filter.batch_size(updates)
    mask = jnp.ones((batch,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if mask.shape != (batch,):
      raise ValueError(f"mask must have shape ({batch},), got {mask.shape}")
    scaled = spectral_filter.masked_weights(mask, example_weights)  # m∘s
    mass = jnp.sum(scaled)
    if axis_name is not None:
      mass = jax.lax.psum(mass, axis_name)
    weights = jnp.where(mass > 0, scaled / jnp.where(mass > 0, mass, 1.0), 0.0)
    updates = spectral_filter.zero_masked_examples(updates, mask)
    aggregated = spectral_filter.combine(updates, weights)
    if axis_name is not None:
      aggregated = jax.lax.psum(aggregated, axis_name)
    return aggregated, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def evaluation_params(opt_state, params: Params) -> Params:
  """The parameters to evaluate and export. "schedule_free_adamw" (the only optimizer whose
  state holds a ``ScheduleFreeState``): its averaged iterate x,
  ``optax.contrib.schedule_free_eval_params``, not the interpolated point y that its
  gradients are taken at and ``params`` hold. Every other optimizer: ``params``."""
  schedule_free = optax.tree_utils.tree_get(opt_state, "ScheduleFreeState")
  if schedule_free is None:
    return params
  return optax.contrib.schedule_free_eval_params(schedule_free, params)


def _check_choice(value, choices, name: str) -> None:
  if value not in choices:
    raise ValueError(f"config.optimizer.{name} must be one of {choices}, got {value!r}")


def _soft_threshold_l1_with_warmup_linear_decay(
    peak_learning_rate, l1_weight, warmup_steps: int, num_steps: int
):
  schedule = warmup_linear_decay(peak_learning_rate, warmup_steps, num_steps)
  return nearprox.soft_threshold_l1(schedule, l1_weight, kernel_mask)


# Peak learning rate and λ₁ in the state, like the optimizer's own learning rate.
_soft_threshold_l1 = optax.inject_hyperparams(
    _soft_threshold_l1_with_warmup_linear_decay, static_args=("warmup_steps", "num_steps")
)


def create_optimizer(config, num_steps: int, axis_name: str | None):
  """(optax transformation, whether it takes per-example gradients).

  ``config.optimizer.l1_weight`` λ₁ > 0 appends :func:`nearprox.soft_threshold_l1` (the L1
  prox, exact zeros) on kernels (:func:`kernel_mask`) after the whole chain, with the
  optimizer's warmup + linear-decay learning rate; λ₁ = 0 builds the chain without it."""
  l1_weight = config.optimizer.get("l1_weight", 0.0)
  if isinstance(l1_weight, bool) or not (
      isinstance(l1_weight, (int, float)) and math.isfinite(l1_weight) and l1_weight >= 0
  ):
    raise ValueError(f"config.optimizer.l1_weight must be finite and >= 0, got {l1_weight!r}")
  if l1_weight and config.optimizer.name == "schedule_free_adamw":
    # Its params are the interpolation y of the iterates z and x; thresholding y leaves the
    # evaluated x = (y − (1−β)z)/β without zeros.
    raise ValueError(
        "config.optimizer.l1_weight > 0 cannot work with name='schedule_free_adamw': its "
        "evaluated (averaged) iterate is not the thresholded point"
    )
  tx, per_example = _optimizer_without_l1(config, num_steps, axis_name)
  if not l1_weight:
    return tx, per_example  # the chain, and state, of the runs before the field existed
  warmup_steps = int(round(config.optimizer.warmup_fraction * num_steps))
  prox = _soft_threshold_l1(config.optimizer.learning_rate, l1_weight, warmup_steps, num_steps)
  return optax.chain(tx, prox), per_example


def kernel_zero_fractions(params: Params) -> dict[str, jax.Array]:
  """The fraction of exactly zero kernel weights (:func:`kernel_mask`) per layer and "all":
  :func:`nearprox.l1_prox.zero_fractions`; what the L1 prox is for."""
  return nearprox.l1_prox.zero_fractions(params, kernel_mask)


def _optimizer_without_l1(config, num_steps: int, axis_name: str | None):
  opt = config.optimizer
  # Configs written before these fields existed keep today's behaviour.
  weighting = opt.get("weighting", "uniform")
  step_size = opt.get("step_size", "none")
  max_update_norm = opt.get("max_update_norm", 0.0)
  sketch_dim = opt.get("sketch_dim", 0)
  _check_choice(opt.name, OPTIMIZERS + MULTITASK_OPTIMIZERS, "name")
  _check_choice(weighting, WEIGHTINGS, "weighting")
  _check_choice(step_size, spectral_filter.STEP_SIZES, "step_size")
  per_example = opt.name in PER_EXAMPLE_OPTIMIZERS
  if weighting != "uniform" and not per_example:
    raise ValueError(
        f"config.optimizer.weighting={weighting!r} weights per-example gradients: it needs one "
        f"of {PER_EXAMPLE_OPTIMIZERS}, got name={opt.name!r}"
    )
  normalization = opt.get("weight_normalization", "sum")
  if not per_example and (step_size != "none" or max_update_norm or normalization != "sum"):
    raise ValueError(
        "config.optimizer.step_size, max_update_norm and weight_normalization configure the "
        "proximal filter: they "
        f"need one of {PER_EXAMPLE_OPTIMIZERS}, got name={opt.name!r}"
    )
  if opt.name in _WITHOUT_FILTER and (
      step_size != "none" or max_update_norm or normalization != "sum" or sketch_dim
  ):
    raise ValueError(
        "config.optimizer.step_size, max_update_norm, weight_normalization and sketch_dim "
        f"configure the proximal filter, which name={opt.name!r} does not apply"
    )
  pcgrad_task_weighting = opt.get("pcgrad_task_weighting", "batch")
  _check_choice(pcgrad_task_weighting, pcgrad.TASK_WEIGHTINGS, "pcgrad_task_weighting")
  if pcgrad_task_weighting != "batch" and opt.name != "pcgrad_adamw":
    raise ValueError(
        "config.optimizer.pcgrad_task_weighting configures name='pcgrad_adamw', got "
        f"name={opt.name!r}"
    )
  if opt.name == "pcgrad_adamw" and config.task != "multitask":
    raise ValueError(
        "config.optimizer.name='pcgrad_adamw' projects the gradients of several tasks: it "
        f"needs config.task='multitask' (and config.tasks), got task={config.task!r}"
    )
  if not max_update_norm >= 0:
    raise ValueError(
        f"config.optimizer.max_update_norm must be >= 0 (0 disables), got {max_update_norm!r}"
    )
  # A negative peak learning rate ascends the loss, 0 trains nothing, NaN or inf destroy
  # the parameters at the first step.
  if not (math.isfinite(opt.learning_rate) and opt.learning_rate > 0):
    raise ValueError(
        f"config.optimizer.learning_rate must be finite and > 0, got {opt.learning_rate!r}"
    )
  warmup_steps = int(round(opt.warmup_fraction * num_steps))
  learning_rate = _scale_by_learning_rate(opt.learning_rate, warmup_steps, num_steps)
  # The L2 gradient λθ is added after any filtering: it is the same for every example.
  l2 = l2_regularization(config.objective.l2_weight)
  # optax.adamw and optax.sgd, with the learning rate above.
  adamw = optax.chain(
      optax.scale_by_adam(), optax.add_decayed_weights(opt.weight_decay, kernel_mask), learning_rate
  )
  momentum = (
      optax.trace(decay=opt.momentum, nesterov=opt.nesterov) if opt.momentum else optax.identity()
  )
  sgd = optax.chain(momentum, learning_rate)
  if opt.name == "weighted_mean_adamw":  # the filter's ablation: the weights alone
    return optax.chain(weighted_mean_aggregate(axis_name), l2, adamw), True
  if opt.name == "pcgrad_adamw":  # the multi-task peer: PCGrad on the task gradients, AdamW
    projected = nearprox.pcgrad_aggregate(
        len(config.tasks),
        seed=config.seed,
        task_weighting=pcgrad_task_weighting,
        axis_name=axis_name,
    )
    return optax.chain(projected, l2, adamw), True
  if per_example:
    settings = dict(
        filter=opt.filter,
        damping_mode=opt.damping_mode,
        axis_name=axis_name,
        gram=opt.gram if axis_name else "local",  # one device: local and global coincide
        step_size=step_size,
        max_update_norm=max_update_norm or None,
        sketch_dim=sketch_dim,
        weight_normalization=normalization,
        # nearprox.text.data pads a partial batch with copies of its real rows (finite), so
        # the filter need not copy every per-example array to zero them.
        zero_masked_rows=False,
    )
    nearprox.scale_by_proximal(opt.damping, **settings)  # its argument errors now, not at init
    proximal = _scale_by_proximal(opt.damping, **settings)
    return optax.chain(proximal, l2, sgd if opt.name == "proximal_sgd" else adamw), True
  if opt.name == "proximal_norm_sgd":
    nearprox.scale_by_proximal_norm(opt.damping)  # its argument errors now, not at init
    return optax.chain(_scale_by_proximal_norm(opt.damping), l2, sgd), False
  if opt.name == "sgd":
    return optax.chain(l2, sgd), False
  # The peers: their library's direction in AdamW's place, the same decay and learning rate.
  decay = optax.add_decayed_weights(opt.weight_decay, kernel_mask)
  if opt.name == "muon":
    return optax.chain(l2, scale_by_muon_and_adam(), decay, learning_rate), False
  if opt.name == "lion":
    return optax.chain(l2, optax.scale_by_lion(), decay, learning_rate), False
  if opt.name == "psgd_kron":
    return optax.chain(l2, scale_by_psgd_kron(config.seed), decay, learning_rate), False
  if opt.name == "schedule_free_adamw":  # its own schedule: warmup, then constant
    return optax.chain(l2, _schedule_free(opt.learning_rate, warmup_steps, opt.weight_decay)), False
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
  function of params); the train step logs it, :func:`l2_regularization` applies its gradient."""
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
