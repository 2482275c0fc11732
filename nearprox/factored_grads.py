"""Per-example gradients of a Flax model in factored form, from one forward and one backward pass.

``factored_value_and_grads(loss_fn, params, *args)`` returns the per-example losses [B] and
the per-example gradients g_i = ∇θ ℓ_i as a pytree with the structure of ``params`` whose
leaves are (docs/method.md §2):

* ``nn.Dense`` / ``nn.DenseGeneral`` kernels (attention projections with multi-head outputs
  included): :class:`nearprox.layer_factors.DenseFactor` (a, δ), the layer's inputs and output
  cotangents, g_i = a_iᵀ δ_i;
* ``nn.Embed`` tables (looked up with ``__call__``): :class:`nearprox.layer_factors.EmbedFactor`
  (token ids, cotangents of the looked-up vectors);
* ``nn.Embed`` tables also used as the output projection (weight tying, ``Embed.attend``):
  :class:`nearprox.tied_embed_factor.TiedEmbedFactor`, the lookups' EmbedFactor plus a
  DenseFactor (a = the logits' cotangents [T, V], δ = the queries [T, D]) for the projection;
* everything else, materialized as [B, *param_shape] arrays: Dense/DenseGeneral biases
  (Σ_t δ_it), ``nn.LayerNorm`` / ``nn.RMSNorm`` parameters (a per-example vjp of that one
  layer on its captured input and output cotangent), and the **exact fallback** below.

How (docs/method.md §2.6). ``loss_fn(params, *args) -> losses [B]`` must call a Flax linen
model's ``apply``. ``flax.linen.intercept_methods`` wraps ``__call__`` of those layer types:
it records each call's input and adds a zero "probe" to its output (like ``Module.perturb``),
so the gradient of Σ_i ℓ_i with respect to the probe is the output cotangent δ. One
``jax.vjp`` over (probes, fallback leaves) with cotangent ones(B) gives every δ; the factored
leaves are closed over as constants, so no weight gradient is computed in the backward pass.
Which call reads which leaf is found by identity of the traced leaf values in an abstract
discovery trace (``jax.make_jaxpr``, no FLOPs), so ``loss_fn`` may wrap ``params`` freely
(``{"params": params}``, sub-trees) as long as it passes the arrays on unchanged.

Exact fallback. A leaf is factored only when every use of it is inside an intercepted call
that the path understands. Otherwise its per-example gradients come from
``jax.vmap(vjp)(I_B)`` (a reverse-mode Jacobian of the loss vector, reusing the same forward
pass; B backward passes, batched, restricted by XLA's dead-code elimination to what that
leaf needs; :func:`leaf_kinds` tells which path each leaf takes). That happens for:

* parameters of other layer types (``nn.Conv``, attention modules' own params, a custom
  ``self.param`` used directly in a module's code);
* a table or kernel also used outside its layer's ``__call__`` (and, for a table,
  ``attend``), e.g. a kernel read through ``self.variables``, and leaves that ``loss_fn``
  transforms before ``apply`` (e.g. casts to bfloat16);
* calls whose input does not have the batch axis first (size B), Dense layers contracting
  the batch axis, ``DenseGeneral(batch_dims=...)``, custom ``dot_general``, norms reducing
  over the batch axis or across devices (``axis_name``), and calls inside Flax lifted
  transforms or ``jax.checkpoint``/``scan`` bodies (``nn.remat``, ``nn.scan``).

A layer module called several times (shared weights) is supported: its calls' positions are
concatenated along the factor's T axis, since Σ_calls a_callᵀ δ_call = [a_1; a_2]ᵀ[δ_1; δ_2].

Assumptions.

* **Per-example independence**: ℓ_i depends only on example i's inputs (no batch norm, no
  in-batch negatives, no mean over the batch inside ``loss_fn``). Then the cotangent of
  Σ_j ℓ_j at example i's activations equals that of ℓ_i. Dropout is fine when it keeps that
  independence and runs outside any vmap: the gradients are those of the one evaluation of
  the batch. The text models draw example i's masks from its own key inside the batched
  pass (:class:`nearprox.text.models.dropout.ExampleDropout`), so every layer is factored
  and the vmap oracle, applying each example alone with its key, draws the same masks and
  gives the same gradients. (Dropout under ``jax.vmap`` of the model hides the layers and
  sends every leaf to the fallback; flax's ``nn.Dropout`` with one batch-level rng is exact
  here too, but its masks then depend on the batch, not on the example alone.)
* Every intercepted layer input has the batch axis first (the check catches most
  violations by shape, not a transposed [T, B, ...] with T = B).
* Out-of-range embedding ids (which ``Embed`` turns into NaN vectors) are not supported;
  negative ids index from the end, as in ``Embed``.

Cost: for the dense kernels the step does between (3T + B)/(3T) and (4T + B)/(3T) times the
multiply-adds of an SGD step (``kernel_combine="materialized"`` and ``"factored"``;
docs/method.md §2.7). Communication of ``gram="global"``: every device all-gathers the
factored pytree (with ``sketch_dim``, the sketched kernels' features in place of their
factors); :func:`gathered_bytes_per_device` measures it for any model from shapes
(docs/method.md §2.8, §2.9).

The discovery trace (which call reads which leaf) is :mod:`nearprox.layer_calls`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nearprox import layer_calls, layer_factors, sketch, tied_embed_factor
from nearprox.base import check_aux, compute_dtype


def _dense_factor_parts(call: layer_calls.LayerCall, x: jax.Array, delta: jax.Array, batch: int):
  """(a [B, T', d_in], δ [B, T', d_out]) of one dense call."""
  keep = [ax for ax in range(x.ndim) if ax not in call.contract_axes]
  d_in = int(np.prod([x.shape[ax] for ax in call.contract_axes]))
  inputs = jnp.transpose(x, keep + list(call.contract_axes)).reshape(batch, -1, d_in)
  out_features = call.output_shape[len(keep) :]
  return inputs, delta.reshape(batch, inputs.shape[1], int(np.prod(out_features)))


def _local_per_example(
    call: layer_calls.LayerCall, leaves: list, x: jax.Array, delta: jax.Array
) -> dict:
  """Per-example gradients of a norm layer's params: vmap of that layer's own vjp."""
  params = {name: leaves[leaf] for name, leaf in call.leaves.items()}

  def one(x_i, delta_i):
    _, pull = jax.vjp(lambda p: call.module.apply({"params": p}, x_i[None]), params)
    return pull(delta_i[None].astype(call.output_dtype))[0]

  return jax.vmap(one)(x, delta)


def factored_value_and_grads(
    loss_fn: Callable,
    params,
    *args,
    kernel_combine: str = "auto",
    gram_blocking: layer_factors.GramBlocking | None = None,
    has_aux: bool = False,
):
  """(losses [B], per-example gradients in factored form) of ``loss_fn(params, *args)``.

  Args:
    loss_fn: ``loss_fn(params, *args) -> [B]`` per-example losses; calls a Flax linen model's
      ``apply`` on (a pytree containing) the leaves of ``params``.
    params: the parameters pytree.
    *args: batch arrays, batch axis first.
    kernel_combine: how the filtered gradient of each dense kernel is formed
      (:class:`~nearprox.layer_factors.DenseFactor` ``combine_method``): "factored" (Aᵀ(c∘Δ):
      least memory, B·T·d_in·d_out more multiply-adds), "materialized" (reuse the Gram's
      per-example gradients: fewest multiply-adds, B·d_in·d_out more memory per layer), or
      "auto": "materialized" for the smallest layers, as long as the per-example gradients
      kept take no more memory in total than the kernel factors (see
      :func:`_kernel_combine_methods`).
    gram_blocking: when a dense kernel's materializing Gram forms its per-example gradients
      in blocks (:class:`~nearprox.layer_factors.GramBlocking`; None: ``GramBlocking()``,
      which blocks large ones on CPUs; ``GramBlocking(block_numbers=0)`` never does).
    has_aux: ``loss_fn`` returns ``(losses, aux)``, aux arrays with the batch axis first;
      they come from the same forward pass (:func:`nearprox.per_example_value_and_grads`).

  Returns:
    ``(losses, grads)`` (``((losses, aux), grads)`` with ``has_aux``) where ``grads`` has
    the structure of ``params`` and each leaf is a
    :class:`~nearprox.layer_factors.DenseFactor`, an
    :class:`~nearprox.layer_factors.EmbedFactor` or a dense [B, *leaf.shape] array; feed it
    to :func:`nearprox.scale_by_proximal`.
  """
  if kernel_combine not in ("auto",) + layer_factors.COMBINE_METHODS:
    raise ValueError(
        f"kernel_combine must be 'auto' or one of {layer_factors.COMBINE_METHODS}, "
        f"got {kernel_combine!r}"
    )
  leaves, treedef = jax.tree.flatten(params)
  losses_fn = (lambda *a: loss_fn(*a)[0]) if has_aux else loss_fn
  batch = layer_calls.loss_batch_size(losses_fn, params, args)
  plan = layer_calls.discover(losses_fn, treedef, leaves, args, batch)
  calls, kinds = plan.calls, plan.leaf_kinds
  fallback = [i for i, kind in enumerate(kinds) if kind == "fallback"]
  probed = [k for k, call in enumerate(calls) if call.probed]
  probes = [jnp.zeros(calls[k].output_shape, calls[k].output_dtype) for k in probed]
  probe_of = {k: j for j, k in enumerate(probed)}

  def forward(probe_values, fallback_values):
    values = list(leaves)
    for i, value in zip(fallback, fallback_values):
      values[i] = value
    inputs = {}
    count = [0]

    def interceptor(next_fun, call_args, call_kwargs, context):
      if not layer_calls.intercepts(context, False):
        return next_fun(*call_args, **call_kwargs)
      k = count[0]
      count[0] += 1
      if (
          k >= len(calls)
          or type(context.module) is not calls[k].module_type
          or context.method_name != calls[k].method
      ):
        raise ValueError(
            "loss_fn called its layers differently in two traces; the factored "
            "path needs a deterministic sequence of layer calls"
        )
      out = next_fun(*call_args, **call_kwargs)
      if k not in probe_of:
        return out
      inputs[k] = call_args[0]
      return out + probe_values[probe_of[k]]

    with nn.intercept_methods(interceptor):
      out = loss_fn(jax.tree.unflatten(treedef, values), *args)
    losses, aux = out if has_aux else (out, None)
    return losses, (inputs, aux)

  fallback_values = [leaves[i] for i in fallback]
  if not probes and not fallback:
    losses, (inputs, aux) = forward([], [])
    deltas, per_example_fallback = [], []
  else:
    losses, pull, (inputs, aux) = jax.vjp(forward, probes, fallback_values, has_aux=True)
    deltas = pull(jnp.ones_like(losses))[0]
    per_example_fallback = []
    if fallback:
      # Row i of the loss vector's Jacobian: exact, with the same forward pass (and masks).
      basis = jnp.eye(batch, dtype=losses.dtype)
      per_example_fallback = jax.vmap(pull)(basis)[1]

  grads: list[Any] = [None] * len(leaves)
  for i, value in zip(fallback, per_example_fallback):
    grads[i] = value
  _assemble(
      calls,
      kinds,
      leaves,
      inputs,
      {k: deltas[j] for k, j in probe_of.items()},
      batch,
      grads,
      kernel_combine,
      layer_factors.GramBlocking() if gram_blocking is None else gram_blocking,
  )
  for i, kind in enumerate(kinds):
    if kind == "unused":
      grads[i] = jnp.zeros((batch,) + tuple(leaves[i].shape), leaves[i].dtype)
  grads = jax.tree.unflatten(treedef, grads)
  if not has_aux:
    return losses, grads
  check_aux(aux, batch)
  return (losses, aux), grads


def _kernel_combine_methods(choice: str, shapes: list[tuple[int, int, int, int]]) -> list[str]:
  """Each dense kernel's ``combine_method`` from its factor shapes (B, T, d_in, d_out).

  "auto" keeps the per-example gradients (B·d_in·d_out numbers) of materializing layers,
  smallest first, while their total stays within the total size of all kernel factors
  (Σ B·T·(d_in + d_out)): every kept number saves T multiply-adds in the combine, and the
  peak memory grows by at most about what the factors already take.
  """
  if choice != "auto":
    return [choice] * len(shapes)
  budget = sum(b * t * (d_in + d_out) for b, t, d_in, d_out in shapes)
  methods, used = ["factored"] * len(shapes), 0
  for j in sorted(range(len(shapes)), key=lambda j: shapes[j][2] * shapes[j][3]):
    b, t, d_in, d_out = shapes[j]
    if layer_factors.dense_gram_method(b, t, b, t, d_in, d_out, True) != "materialize":
      continue
    if used + b * d_in * d_out <= budget:
      methods[j] = "materialized"
      used += b * d_in * d_out
  return methods


def _assemble(
    calls, kinds, leaves, inputs, deltas, batch, grads, kernel_combine, gram_blocking
) -> None:
  """Fills ``grads`` for the factored and materialized-small leaves from the captures."""
  parts: dict[int, list] = {}
  projections: dict[int, list] = {}  # tied tables: (logits cotangents, queries) of attend calls
  sums: dict[int, jax.Array] = {}

  def accumulate(leaf, value):
    value = value.astype(compute_dtype(value.dtype))
    sums[leaf] = value if leaf not in sums else sums[leaf] + value

  for k, call in enumerate(calls):
    if not call.probed:
      continue
    x, delta = inputs[k], deltas[k]
    if call.kind == "dense":
      a, d = _dense_factor_parts(call, x, delta, batch)
      for leaf in call.leaves.values():
        if kinds[leaf] == "kernel":
          parts.setdefault(leaf, []).append((a, d))
        elif kinds[leaf] == "bias":
          bias_shape = tuple(leaves[leaf].shape)
          accumulate(
              leaf,
              jnp.sum(
                  delta.astype(compute_dtype(delta.dtype)).reshape((batch, -1) + bias_shape), axis=1
              ),
          )
    elif call.kind == "embed":
      leaf = call.leaves["embedding"]
      num = call.module.num_embeddings
      ids = jnp.zeros_like(x) if num == 1 else jnp.where(x < 0, x + num, x)
      parts.setdefault(leaf, []).append(
          (ids.reshape(batch, -1), delta.reshape(batch, -1, delta.shape[-1]))
      )
    elif call.kind == "attend":
      leaf = call.leaves["embedding"]
      projections.setdefault(leaf, []).append(
          (delta.reshape(batch, -1, delta.shape[-1]), x.reshape(batch, -1, x.shape[-1]))
      )
    else:
      local = _local_per_example(call, leaves, x, delta)
      for name, leaf in call.leaves.items():
        if kinds[leaf] == "local":
          accumulate(leaf, local[name])

  for leaf, value in sums.items():
    grads[leaf] = value.astype(leaves[leaf].dtype)
  join = lambda pieces: tuple(
      jnp.concatenate(p, axis=1) if len(p) > 1 else p[0] for p in zip(*pieces)
  )
  joined = {leaf: join(pieces) for leaf, pieces in parts.items()}
  for leaf, pieces in projections.items():
    grads[leaf] = _tied_embed_factor(leaves[leaf], joined.pop(leaf, None), join(pieces), batch)
  kernels = [leaf for leaf in joined if kinds[leaf] == "kernel"]
  methods = _kernel_combine_methods(
      kernel_combine, [joined[leaf][0].shape + joined[leaf][1].shape[-1:] for leaf in kernels]
  )
  method_of = dict(zip(kernels, methods))
  for leaf, (first, second) in joined.items():
    param = leaves[leaf]
    if kinds[leaf] == "kernel":
      grads[leaf] = layer_factors.DenseFactor(
          first,
          second,
          tuple(param.shape),
          np.dtype(param.dtype),
          combine_method=method_of[leaf],
          gram_blocking=gram_blocking,
      )
    else:
      grads[leaf] = layer_factors.EmbedFactor(
          first, second, int(param.shape[0]), np.dtype(param.dtype)
      )


def _tied_embed_factor(table, lookups, projection, batch) -> tied_embed_factor.TiedEmbedFactor:
  """The :class:`~nearprox.tied_embed_factor.TiedEmbedFactor` of a table from its lookups' (ids,
  cotangents) (None: never looked up) and its ``attend`` calls' (logits cotangents, queries)."""
  num, features = (int(n) for n in table.shape)
  dtype = np.dtype(table.dtype)
  if lookups is None:
    cotangents = projection[1]
    lookups = (jnp.zeros((batch, 0), jnp.int32), jnp.zeros((batch, 0, features), cotangents.dtype))
  return tied_embed_factor.TiedEmbedFactor(
      layer_factors.EmbedFactor(*lookups, num, dtype),
      layer_factors.DenseFactor(*projection, (num, features), dtype),
  )


def leaf_kinds(loss_fn: Callable, params, *args) -> dict[str, str]:
  """How :func:`factored_value_and_grads` treats each leaf of ``params``, by path:
  "kernel" / "embed" / "tied_embed" (factored), "bias" / "local" (materialized from the captures),
  "fallback" (exact per-example Jacobian rows) or "unused". Traces only, computes nothing."""
  leaves, treedef = jax.tree.flatten(params)
  batch = layer_calls.loss_batch_size(loss_fn, params, args)
  plan = layer_calls.discover(loss_fn, treedef, leaves, args, batch)
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [jax.tree_util.keystr(path) for path, _ in with_path]
  return dict(zip(paths, plan.leaf_kinds))


def gathered_bytes_per_device(
    loss_fn: Callable, params, *args, sketch_dim: int | None = None, num_devices: int = 1
) -> int:
  """Bytes one device contributes to ``gram="global"``'s all-gather of the per-example
  gradients of ``loss_fn(params, *args)`` (shapes only, via ``jax.eval_shape``); each device
  receives (n − 1) times this. Without a sketch: the factored pytree. With ``sketch_dim``:
  the sketched features and the exact leaves' factors, with the choices made for the global
  batch of ``num_devices`` devices (docs/method.md §2.9)."""

  def gathered(p, *a):
    grads = factored_value_and_grads(loss_fn, p, *a)[1]
    if sketch_dim is None:
      return grads
    batch = layer_calls.loss_batch_size(loss_fn, p, a) * num_devices
    parts = sketch.sketch_per_example(grads, jnp.zeros((), jnp.int32), sketch_dim, batch)
    return parts.features, parts.exact

  return layer_factors.factor_nbytes(jax.eval_shape(gathered, params, *args))
