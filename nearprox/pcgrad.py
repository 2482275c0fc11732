"""PCGrad ("gradient surgery") over the tasks of a mixed batch, as an optax transformation.

Yu et al.'s PCGrad (Algorithm 1) takes one gradient per task, g_1 … g_T, and for each task i
removes, one other task at a time in random order, the component of g_i that conflicts with
g_j (negative inner product) by projecting onto g_j's normal plane:

    g_i^PC ← g_i;   for j in a random order of {1..T} \\ {i}:
        if ⟨g_i^PC, g_j⟩ < 0:   g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩ / ‖g_j‖² · g_j
    d = Σ_i g_i^PC.

Each g_j is the task's original gradient; g_i^PC is updated in place. Without conflicts
d = Σ_i g_i; for two tasks the order does not matter and d has a non-negative inner product
with both task gradients.

**From per-example gradients.** A mixed batch has per-example gradients g_n (rows of G, the
dense ``[B, ...]`` leaves or the factored form of :func:`nearprox.per_example_grads`) and a
task id t_n per example. Each task gradient is a reweighting of the examples, g_t = Gᵀ W_{:,t}
with the example weights w = m∘s / Σ m∘s (mask m, optional example weights s, as
:func:`nearprox.scale_by_proximal`'s right-hand side):

* ``task_weighting="batch"`` (default): W_nt = w_n [t_n = t], task t's share of the batch's
  (weighted) mean gradient, so Σ_t g_t is exactly the mean gradient an optimizer without
  PCGrad would see on the same batch. This is Algorithm 1 applied to the losses
  (B_t/B)·L_t, whose sum is the batch's mean loss: the sampling rule of the mixed batches
  decides the tasks' weights, as it does for every other optimizer.
* ``task_weighting="mean"``: W_nt = m_n s_n [t_n = t] / Σ_{n'∈t} m_n' s_n', each task's own
  mean gradient, the paper's input (every task weighted equally whatever its share).

The projections never leave the span of the task gradients: g_i^PC = Σ_k C_ik g_k, so
Algorithm 1 runs on the T × T Gram matrix M_jk = ⟨g_j, g_k⟩ of the task gradients
(:func:`projection_coefficients`: ⟨g_i^PC, g_j⟩ = (C M)_ij, ‖g_j‖² = M_jj), and
d = Σ_k a_k g_k with a = Σ_i C_{i,:}. The cost is T reweighted sums of the per-example
gradients (for the factored form one einsum per layer and task, no second backward pass) and
T² inner products of parameter-sized vectors. A task with no example in the batch has
g_t = 0: nothing projects onto it and it adds nothing.

The random orders (one permutation of the other tasks per task and step) come from
``fold_in(PRNGKey(seed), step)``: reproducible, the same on every device, and resumed with
the optimizer state. Several devices (``axis_name``): the task gradients are summed over the
devices (weights normalized over the global batch), so every device computes the same d.

References:
  T. Yu, S. Kumar, A. Gupta, S. Levine, K. Hausman and C. Finn, "Gradient Surgery for
  Multi-Task Learning", NeurIPS 2020, arXiv 2001.06782 (Algorithm 1; the authors' code,
  github.com/tianheyu927/PCGrad ``PCGrad_tf.py``, sums the projected task gradients).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nearprox import spectral_filter

TASK_WEIGHTINGS = ("batch", "mean")
_HIGHEST = jax.lax.Precision.HIGHEST


class PCGradStats(NamedTuple):
  """What the last step's task gradients looked like (scalars, for logging).

  Attributes:
    conflict_fraction: of the pairs of tasks both present in the batch, the fraction whose
      gradients conflict (⟨g_s, g_t⟩ < 0); 0 without a pair.
    min_cosine: the smallest cosine between two present tasks' gradients (1 without a pair).
    projections: the number of projections Algorithm 1 made (at most T(T−1)).
  """

  conflict_fraction: jax.Array
  min_cosine: jax.Array
  projections: jax.Array


class PCGradState(NamedTuple):
  """The step count (which seeds the random orders) and the last step's :class:`PCGradStats`."""

  count: jax.Array
  stats: PCGradStats


def random_orders(key: jax.Array, num_tasks: int) -> jax.Array:
  """int32 [T, T−1]: row i is the tasks other than i in a random order (one draw per row)."""
  others = jnp.array([[j for j in range(num_tasks) if j != i] for i in range(num_tasks)])
  others = others.reshape(num_tasks, num_tasks - 1).astype(jnp.int32)
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(jax.random.permutation)(keys, others)


def projection_coefficients(task_gram: jax.Array, orders: jax.Array):
  """Algorithm 1 on the task gradients' Gram matrix M [T, T]: (C [T, T], projected [T, T−1]).

  g_i^PC = Σ_k C_ik g_k; ``projected[i, s]`` says whether task i was projected onto task
  ``orders[i, s]`` (their inner product at that point was negative). A task gradient with
  ‖g_j‖² = 0 is never projected onto.
  """
  num_tasks = task_gram.shape[0]
  gram = task_gram.astype(jnp.float32)
  rows, projected = [], []
  for i in range(num_tasks):  # T is small and static: unrolled
    c = jax.nn.one_hot(i, num_tasks, dtype=jnp.float32)
    fired = []
    for s in range(num_tasks - 1):
      j = orders[i, s]
      inner = jnp.dot(c, gram[:, j], precision=_HIGHEST)  # ⟨g_i^PC, g_j⟩
      norm_sq = gram[j, j]
      conflict = (inner < 0) & (norm_sq > 0)
      step = jnp.where(conflict, inner / jnp.where(norm_sq > 0, norm_sq, 1.0), 0.0)
      c = c - step * jax.nn.one_hot(j, num_tasks, dtype=jnp.float32)
      fired.append(conflict)
    rows.append(c)
    projected.append(jnp.stack(fired) if fired else jnp.zeros((0,), bool))
  return jnp.stack(rows), jnp.stack(projected)


def _tree_vdot(x, y) -> jax.Array:
  parts = jax.tree.map(
      lambda a, b: jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32), precision=_HIGHEST),
      x,
      y,
  )
  return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def _task_stats(gram: jax.Array, projected: jax.Array) -> PCGradStats:
  norms = jnp.sqrt(jnp.maximum(jnp.diag(gram), 0.0))
  present = norms > 0
  num_tasks = gram.shape[0]
  pair = present[:, None] & present[None, :] & ~jnp.eye(num_tasks, dtype=bool)
  cosine = gram / jnp.where(pair, norms[:, None] * norms[None, :], 1.0)
  pairs = jnp.sum(pair)
  conflicts = jnp.sum(pair & (gram < 0))
  return PCGradStats(
      conflict_fraction=jnp.where(pairs > 0, conflicts / jnp.maximum(pairs, 1), 0.0),
      min_cosine=jnp.min(jnp.where(pair, cosine, 1.0)),
      projections=jnp.sum(projected).astype(jnp.float32),
  )


def _check(num_tasks, seed, task_weighting) -> None:
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 2:
    raise ValueError(f"pcgrad_aggregate needs num_tasks >= 2 (an int), got {num_tasks!r}")
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed must be an int, got {seed!r}")
  if task_weighting not in TASK_WEIGHTINGS:
    raise ValueError(f"task_weighting must be one of {TASK_WEIGHTINGS}, got {task_weighting!r}")


def task_weights(
    task_ids, num_tasks: int, mask, example_weights=None, *, task_weighting="batch", axis_name=None
) -> jax.Array:
  """W [B, T]: the example weights of each task gradient g_t = Gᵀ W_{:,t} (module docstring).

  Masked examples and examples whose id lies outside [0, T) get 0. With ``axis_name`` the
  normalizations are over the global batch.
  """

  def total(x):
    x = jnp.sum(x, axis=0)
    return jax.lax.psum(x, axis_name) if axis_name is not None else x

  scaled = spectral_filter.masked_weights(mask, example_weights)  # m∘s [B]
  member = task_ids[:, None] == jnp.arange(num_tasks, dtype=task_ids.dtype)[None, :]
  per_task = jnp.where(member, scaled[:, None], 0.0)  # [B, T]
  mass = total(scaled) if task_weighting == "batch" else total(per_task)  # scalar or [T]
  return jnp.where(mass > 0, per_task / jnp.where(mass > 0, mass, 1.0), 0.0)


def pcgrad_aggregate(
    num_tasks: int,
    *,
    seed: int = 0,
    task_weighting: str = "batch",
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Aggregates per-example gradients of a mixed batch into the PCGrad direction d.

  Like :func:`nearprox.scale_by_proximal` it comes first in a chain: its input is the params
  pytree with a leading batch axis on every leaf, or the factored form of
  :func:`nearprox.per_example_grads`; its output has the params' shapes. Call
  ``update(updates, state, params=None, *, task_ids, mask=None, example_weights=None)``
  with ``task_ids`` int [B] in [0, T) (the task of each example). The math, the task
  weighting and the random orders: the module docstring.

  Args:
    num_tasks: T ≥ 2.
    seed: seeds the random order of the projections (with the step count).
    task_weighting: "batch" (each task's share of the batch's mean gradient; default) or
      "mean" (each task's own mean gradient, the paper's input).
    axis_name: the mapped axis the batch is split over (pmap / shard_map), if any.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`PCGradState`.
  """
  _check(num_tasks, seed, task_weighting)

  def init_fn(params):
    del params
    zero = jnp.zeros((), jnp.float32)
    return PCGradState(jnp.zeros((), jnp.int32), PCGradStats(zero, jnp.ones((), jnp.float32), zero))

  def update_fn(
      updates, state, params=None, *, task_ids=None, mask=None, example_weights=None, **extra
  ):
    del params, extra
    batch = spectral_filter.batch_size(updates)
    if task_ids is None:
      raise ValueError("pcgrad_aggregate needs task_ids=[B] (the task of each example) in update")
    task_ids = jnp.asarray(task_ids)
    if task_ids.shape != (batch,) or not jnp.issubdtype(task_ids.dtype, jnp.integer):
      raise ValueError(
          f"task_ids must be integers of shape ({batch},), got {task_ids.shape} "
          f"{task_ids.dtype}"
      )
    mask = jnp.ones((batch,), jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
    if mask.shape != (batch,):
      raise ValueError(f"mask must have shape ({batch},), got {mask.shape}")
    weights = task_weights(
        task_ids,
        num_tasks,
        mask,
        example_weights,
        task_weighting=task_weighting,
        axis_name=axis_name,
    )
    updates = spectral_filter.zero_masked_examples(updates, mask)
    task_grads = [spectral_filter.combine(updates, weights[:, t]) for t in range(num_tasks)]
    if axis_name is not None:
      task_grads = jax.lax.psum(task_grads, axis_name)
    # Algorithm 1 is invariant to one common scale of all g_t: dividing by the largest entry
    # keeps the T² inner products away from float32 underflow and overflow.
    largest = jnp.max(jnp.stack([optax.tree.max(jax.tree.map(jnp.abs, g)) for g in task_grads]))
    scale = jnp.where(largest > 0, largest, 1.0).astype(jnp.float32)
    scaled = [jax.tree.map(lambda x: x.astype(jnp.float32) / scale, g) for g in task_grads]
    gram = jnp.stack([jnp.stack([_tree_vdot(a, b) for b in scaled]) for a in scaled])
    orders = random_orders(jax.random.fold_in(jax.random.PRNGKey(seed), state.count), num_tasks)
    coeffs, projected = projection_coefficients(gram, orders)
    combined = jnp.sum(coeffs, axis=0)  # d = Σ_k a_k g_k
    direction = jax.tree.map(
        lambda *leaves: sum(a * leaf for a, leaf in zip(combined, leaves)).astype(leaves[0].dtype),
        *task_grads,
    )
    return direction, PCGradState(optax.safe_increment(state.count), _task_stats(gram, projected))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
