"""Per-example gradients: the inputs of :func:`nearprox.scale_by_proximal`.

``loss_fn(params, *args)`` returns the vector of per-example losses [B]; every array in
``args`` has the batch axis first. Two methods compute the gradients g_i = ∇θ ℓ_i:

* ``"factored"`` (the default): the fast path (:mod:`nearprox.factored_grads`; docs/method.md
  §2). One forward and one backward pass over the whole batch capture each Flax
  dense/embedding layer's inputs and output cotangents; the Gram matrix and the filtered
  gradient are computed from those factors. Leaves it cannot factor (any function that is not
  a Flax model, too) come back as exact dense [B, ...] arrays.
* ``"vmap"``: the reference. ``jax.vmap(jax.grad(...))`` over examples, each evaluated as
  a batch of one; materializes G (B × P numbers). It is the oracle of the tests. Randomness
  inside ``loss_fn`` must therefore come from per-example arrays in ``args`` (e.g. keys
  [B, 2]) for the two methods to agree.

With ``has_aux=True`` (as in ``jax.value_and_grad``) ``loss_fn`` returns ``(losses [B],
aux)``, every aux leaf with the batch axis first and row i depending on example i only
(e.g. iEF weights from the clean logits of the same forward pass): it comes back beside the
losses at no extra pass, as ``((losses, aux), grads)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from nearprox import factored_grads
from nearprox.base import check_aux

METHODS = ("vmap", "factored")


def _vmap_value_and_grads(loss_fn: Callable, params, *args, has_aux: bool = False):
  def one_example_loss(params, *example):
    batch_of_one = jax.tree.map(lambda x: x[None], example)
    out = loss_fn(params, *batch_of_one)
    losses, aux = out if has_aux else (out, None)
    if getattr(losses, "shape", None) != (1,):
      raise ValueError(
          "loss_fn must return the vector of per-example losses, shape [B]; for a batch of "
          f"one example it returned shape {getattr(losses, 'shape', type(losses))}"
      )
    if not has_aux:
      return losses[0]
    check_aux(aux, 1)
    return losses[0], jax.tree.map(lambda x: x[0], aux)

  value_and_grad = jax.value_and_grad(one_example_loss, has_aux=has_aux)
  return jax.vmap(value_and_grad, in_axes=(None,) + (0,) * len(args))(params, *args)


def _check_args(args) -> None:
  sizes = set()
  for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
    shape = getattr(leaf, "shape", ())
    if len(shape) == 0:
      raise ValueError(
          f"argument {jax.tree_util.keystr(path)} of loss_fn has no batch axis; every array "
          "argument needs the batch axis first (pass per-example keys for randomness)"
      )
    sizes.add(shape[0])
  if len(sizes) > 1:
    raise ValueError(f"arguments of loss_fn have different batch sizes: {sorted(sizes)}")


def per_example_value_and_grads(
    loss_fn: Callable,
    params,
    *args,
    method: str = "factored",
    has_aux: bool = False,
    **factored_options,
):
  """(losses [B], per-example gradients) of ``loss_fn(params, *args)``; with ``has_aux``,
  ``((losses, aux), gradients)`` of a ``loss_fn`` returning ``(losses, aux)``.

  The gradients are the params pytree with a leading batch axis ("vmap") or the factored
  form ("factored"); both are accepted by :func:`nearprox.scale_by_proximal`.
  ``factored_options`` go to :func:`nearprox.factored_grads.factored_value_and_grads`
  (``kernel_combine="auto" | "factored" | "materialized"``: time against memory;
  ``gram_blocking``: when a dense kernel's exact Gram is formed in blocks).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  _check_args(args)
  if method == "vmap":
    if factored_options:
      raise ValueError(f"options {sorted(factored_options)} apply to method='factored' only")
    return _vmap_value_and_grads(loss_fn, params, *args, has_aux=has_aux)
  return factored_grads.factored_value_and_grads(
      loss_fn, params, *args, has_aux=has_aux, **factored_options
  )


def per_example_grads(
    loss_fn: Callable, params, *args, method: str = "factored", **factored_options
):
  """Per-example gradients of ``loss_fn(params, *args)`` (which returns losses [B])."""
  return per_example_value_and_grads(loss_fn, params, *args, method=method, **factored_options)[1]
