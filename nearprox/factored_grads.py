"""Per-example gradients of a Flax model in factored form, from one forward and one backward pass.

``factored_value_and_grads(loss_fn, params, *args)`` returns the per-example losses [B] and
the per-example gradients g_i = ∇θ ℓ_i as a pytree with the structure of ``params`` whose
leaves are (docs/method.md §2):

* ``nn.Dense`` / ``nn.DenseGeneral`` kernels (attention projections with multi-head outputs
  included): :class:`nearprox.layer_factors.DenseFactor` (a, δ), the layer's inputs and output
  cotangents, g_i = a_iᵀ δ_i;
* ``nn.Embed`` tables (looked up with ``__call__``): :class:`nearprox.layer_factors.EmbedFactor`
  (token ids, cotangents of the looked-up vectors);
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
* a table or kernel also used outside its layer's ``__call__`` (weight tying via
  ``Embed.attend``, a kernel read through ``self.variables``), and leaves that ``loss_fn``
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
  Σ_j ℓ_j at example i's activations equals that of ℓ_i. Dropout is fine: the whole batch
  runs once with one rng, and the gradients are those of that one evaluation (the vmap
  oracle evaluates examples one at a time, which draws different masks).
* Every intercepted layer input has the batch axis first (the check catches most
  violations by shape, not a transposed [T, B, ...] with T = B).
* Out-of-range embedding ids (which ``Embed`` turns into NaN vectors) are not supported;
  negative ids index from the end, as in ``Embed``.

Cost: for the dense kernels the step does between (3T + B)/(3T) and (4T + B)/(3T) times the
multiply-adds of an SGD step (``kernel_combine="materialized"`` and ``"factored"``;
docs/method.md §2.7). Communication of ``gram="global"``: every device all-gathers the
factored pytree (with ``sketch_dim``, the sketched kernels' features in place of their
factors); :func:`encoder_gathered_numbers` is the formula for a BERT classifier and
:func:`gathered_bytes_per_device` measures any model from shapes (docs/method.md §2.8, §2.9).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta, tracers
from jax.extend import core as jex_core

from nearprox import layer_factors, per_example, sketch
from nearprox.spectral_filter import compute_dtype

_DENSE_TYPES = (nn.Dense, nn.DenseGeneral)
_EMBED_TYPES = (nn.Embed,)
_LOCAL_TYPES = (nn.LayerNorm, nn.RMSNorm)
_INTERCEPTED = _DENSE_TYPES + _EMBED_TYPES + _LOCAL_TYPES


@dataclasses.dataclass
class _Call:
  """One intercepted layer call, as seen by the discovery trace."""

  kind: str | None  # "dense", "embed", "local", or None when not factorable
  reason: str  # why not factorable (for debugging), "" otherwise
  module_type: type
  input_shape: tuple
  module: nn.Module | None = None  # unbound clone, for the local per-example vjp
  leaves: dict[str, int] = dataclasses.field(default_factory=dict)  # param name -> leaf
  contract_axes: tuple[int, ...] = ()  # dense: input axes contracted with the kernel
  output_shape: tuple = ()
  output_dtype: Any = None
  probed: bool = False


@dataclasses.dataclass
class _Plan:
  calls: list[_Call]
  leaf_kinds: list[str]  # per params leaf: "kernel", "bias", "embed", "local",
  # "fallback" or "unused"


def _normalize(axes, ndim: int) -> tuple[int, ...]:
  axes = axes if isinstance(axes, (tuple, list)) else (axes,)
  return tuple(sorted(a % ndim for a in axes))


def _layer_check(module: nn.Module, x, args, kwargs) -> tuple[str | None, str, tuple]:
  """(kind or None, reason, contract_axes) from the module's config and its input."""
  if len(args) != 1 or any(v is not None for v in kwargs.values()):
    return None, "called with extra arguments", ()
  if isinstance(module, _DENSE_TYPES):
    if module.dot_general is not None or module.dot_general_cls is not None:
      return None, "custom dot_general", ()
    if x.ndim < 2:
      return None, "the input has no axis besides the batch axis", ()
    if isinstance(module, nn.DenseGeneral):
      if module.batch_dims:
        return None, "DenseGeneral with batch_dims", ()
      axes = _normalize(module.axis, x.ndim)
    else:
      axes = (x.ndim - 1,)
    if 0 in axes:
      return None, "the layer contracts the batch axis", ()
    return "dense", "", axes
  if isinstance(module, _EMBED_TYPES):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      return None, "non-integer ids", ()
    return "embed", "", ()
  if getattr(module, "axis_name", None) is not None:
    return None, "normalization across devices (axis_name)", ()
  if x.ndim < 2:
    return None, "the input has no axis besides the batch axis", ()
  for name in ("reduction_axes", "feature_axes"):
    if 0 in _normalize(getattr(module, name), x.ndim):
      return None, f"{name} includes the batch axis", ()
  return "local", "", ()


def _intercepts(context, busy: bool) -> bool:
  return not busy and context.method_name == "__call__" and type(context.module) in _INTERCEPTED


def _discover(loss_fn: Callable, treedef, leaves: list, args: tuple, batch: int) -> _Plan:
  """Abstract trace: which call reads which leaf, and which leaves are used elsewhere.

  Inside factorable calls the layer runs on constant zero parameters (a clone applied with
  explicit variables), so any remaining use of a leaf in the traced program is a use the
  factored path cannot see; such leaves take the exact fallback.
  """
  calls: list[_Call] = []

  def traced(leaf_values, args):
    leaf_of = {id(v): i for i, v in enumerate(leaf_values)}
    outer = tracers.current_trace()
    busy = [False]

    def interceptor(next_fun, call_args, call_kwargs, context):
      if not _intercepts(context, busy[0]):
        return next_fun(*call_args, **call_kwargs)
      module = context.module
      x = call_args[0] if call_args else None
      call = _Call(None, "", type(module), tuple(getattr(x, "shape", ())))
      calls.append(call)
      params = {name: meta.unbox(v) for name, v in module.variables.get("params", {}).items()}
      if tracers.current_trace() != outer:
        call.reason = "inside a nested transform (scan, remat, vmap ...)"
      elif not hasattr(x, "shape") or x.ndim == 0 or x.shape[0] != batch:
        call.reason = f"the input's leading axis is not the batch axis of size {batch}"
      elif not params or any(id(v) not in leaf_of for v in params.values()):
        call.reason = "its parameters are not leaves of params passed through unchanged"
      else:
        call.kind, call.reason, call.contract_axes = _layer_check(module, x, call_args, call_kwargs)
      if call.kind is None:
        return next_fun(*call_args, **call_kwargs)
      call.leaves = {name: leaf_of[id(v)] for name, v in params.items()}
      call.module = module.clone(parent=None)
      zeros = {name: jnp.zeros(v.shape, v.dtype) for name, v in params.items()}
      busy[0] = True
      try:
        out = call.module.apply({"params": zeros}, x)
      finally:
        busy[0] = False
      call.output_shape, call.output_dtype = tuple(out.shape), out.dtype
      return out

    with nn.intercept_methods(interceptor):
      return loss_fn(jax.tree.unflatten(treedef, leaf_values), *args)

  closed = jax.make_jaxpr(traced)(leaves, args)
  num_leaves = len(leaves)
  leaf_vars = closed.jaxpr.invars[:num_leaves]
  used = set()
  for eqn in closed.jaxpr.eqns:
    used.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
  used.update(v for v in closed.jaxpr.outvars if not isinstance(v, jex_core.Literal))
  used_elsewhere = [v in used for v in leaf_vars]
  out_shape = closed.out_avals[0].shape if closed.out_avals else None
  if len(closed.out_avals) != 1 or out_shape != (batch,):
    raise ValueError(
        "loss_fn must return the vector of per-example losses, shape "
        f"({batch},); got {[a.shape for a in closed.out_avals]}"
    )
  return _Plan(calls, _leaf_kinds(calls, used_elsewhere))


def _leaf_kinds(calls: list[_Call], used_elsewhere: list[bool]) -> list[str]:
  """Assigns each leaf its path; a leaf read by calls of different kinds falls back."""
  readers: dict[int, set] = {}
  for call in calls:
    for name, leaf in call.leaves.items():
      if call.kind == "dense":
        role = (
            "kernel" if name == "kernel" else "bias" if name == "bias" else None,
            call.module_type,
            len(call.contract_axes),
        )
      elif call.kind == "embed":
        role = ("embed" if name == "embedding" else None,)
      else:
        role = ("local", call.module_type, name)
      readers.setdefault(leaf, set()).add(role)
  kinds = []
  for leaf, elsewhere in enumerate(used_elsewhere):
    roles = readers.get(leaf)
    if elsewhere:
      kinds.append("fallback")
    elif not roles:
      kinds.append("unused")
    elif len(roles) == 1 and next(iter(roles))[0] is not None:
      kinds.append(next(iter(roles))[0])
    else:
      kinds.append("fallback")
  # A module's call is probed when any of its leaves is taken from the captured cotangents.
  for call in calls:
    call.probed = call.kind is not None and any(
        kinds[leaf] not in ("fallback", "unused") for leaf in call.leaves.values()
    )
  return kinds


def _batch_size(loss_fn: Callable, params, args: tuple) -> int:
  for leaf in jax.tree.leaves(args):
    if getattr(leaf, "ndim", 0) > 0:
      return int(leaf.shape[0])
  out = jax.eval_shape(loss_fn, params, *args)
  if getattr(out, "ndim", 0) != 1:
    raise ValueError(
        "loss_fn must return the vector of per-example losses, shape [B]; got "
        f"{getattr(out, 'shape', type(out))}"
    )
  return int(out.shape[0])


def _dense_factor_parts(call: _Call, x: jax.Array, delta: jax.Array, batch: int):
  """(a [B, T', d_in], δ [B, T', d_out]) of one dense call."""
  keep = [ax for ax in range(x.ndim) if ax not in call.contract_axes]
  d_in = int(np.prod([x.shape[ax] for ax in call.contract_axes]))
  inputs = jnp.transpose(x, keep + list(call.contract_axes)).reshape(batch, -1, d_in)
  out_features = call.output_shape[len(keep) :]
  return inputs, delta.reshape(batch, inputs.shape[1], int(np.prod(out_features)))


def _local_per_example(call: _Call, leaves: list, x: jax.Array, delta: jax.Array) -> dict:
  """Per-example gradients of a norm layer's params: vmap of that layer's own vjp."""
  params = {name: leaves[leaf] for name, leaf in call.leaves.items()}

  def one(x_i, delta_i):
    _, pull = jax.vjp(lambda p: call.module.apply({"params": p}, x_i[None]), params)
    return pull(delta_i[None].astype(call.output_dtype))[0]

  return jax.vmap(one)(x, delta)


def factored_value_and_grads(
    loss_fn: Callable, params, *args, kernel_combine: str = "auto", has_aux: bool = False
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
    has_aux: ``loss_fn`` returns ``(losses, aux)``, aux arrays with the batch axis first;
      they come from the same forward pass (:func:`nearprox.per_example_value_and_grads`).

  Returns:
    ``(losses, grads)`` (``((losses, aux), grads)`` with ``has_aux``) where ``grads`` has
    the structure of ``params`` and each leaf is a
    :class:`~nearprox.layer_factors.DenseFactor`, an :class:`~nearprox.layer_factors.EmbedFactor` or a
    dense [B, *leaf.shape] array; feed it to :func:`nearprox.scale_by_proximal`.
  """
  if kernel_combine not in ("auto",) + layer_factors.COMBINE_METHODS:
    raise ValueError(
        f"kernel_combine must be 'auto' or one of {layer_factors.COMBINE_METHODS}, "
        f"got {kernel_combine!r}"
    )
  leaves, treedef = jax.tree.flatten(params)
  losses_fn = (lambda *a: loss_fn(*a)[0]) if has_aux else loss_fn
  batch = _batch_size(losses_fn, params, args)
  plan = _discover(losses_fn, treedef, leaves, args, batch)
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
      if not _intercepts(context, False):
        return next_fun(*call_args, **call_kwargs)
      k = count[0]
      count[0] += 1
      if k >= len(calls) or type(context.module) is not calls[k].module_type:
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
  )
  for i, kind in enumerate(kinds):
    if kind == "unused":
      grads[i] = jnp.zeros((batch,) + tuple(leaves[i].shape), leaves[i].dtype)
  grads = jax.tree.unflatten(treedef, grads)
  if not has_aux:
    return losses, grads
  per_example.check_aux(aux, batch)
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


def _assemble(calls, kinds, leaves, inputs, deltas, batch, grads, kernel_combine) -> None:
  """Fills ``grads`` for the factored and materialized-small leaves from the captures."""
  parts: dict[int, list] = {}
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
    else:
      local = _local_per_example(call, leaves, x, delta)
      for name, leaf in call.leaves.items():
        if kinds[leaf] == "local":
          accumulate(leaf, local[name])

  for leaf, value in sums.items():
    grads[leaf] = value.astype(leaves[leaf].dtype)
  joined = {
      leaf: tuple(jnp.concatenate(p, axis=1) if len(p) > 1 else p[0] for p in zip(*pieces))
      for leaf, pieces in parts.items()
  }
  kernels = [leaf for leaf in joined if kinds[leaf] == "kernel"]
  methods = _kernel_combine_methods(
      kernel_combine, [joined[leaf][0].shape + joined[leaf][1].shape[-1:] for leaf in kernels]
  )
  method_of = dict(zip(kernels, methods))
  for leaf, (first, second) in joined.items():
    param = leaves[leaf]
    if kinds[leaf] == "kernel":
      grads[leaf] = layer_factors.DenseFactor(
          first, second, tuple(param.shape), np.dtype(param.dtype), combine_method=method_of[leaf]
      )
    else:
      grads[leaf] = layer_factors.EmbedFactor(
          first, second, int(param.shape[0]), np.dtype(param.dtype)
      )


def leaf_kinds(loss_fn: Callable, params, *args) -> dict[str, str]:
  """How :func:`factored_value_and_grads` treats each leaf of ``params``, by path:
  "kernel" / "embed" (factored), "bias" / "local" (materialized from the captures),
  "fallback" (exact per-example Jacobian rows) or "unused". Traces only, computes nothing."""
  leaves, treedef = jax.tree.flatten(params)
  plan = _discover(loss_fn, treedef, leaves, args, _batch_size(loss_fn, params, args))
  with_path = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [jax.tree_util.keystr(path) for path, _ in with_path]
  return dict(zip(paths, plan.leaf_kinds))


def encoder_gathered_numbers(
    num_layers: int,
    hidden: int,
    ffn: int,
    length: int,
    num_labels: int,
    sketch_features: int | None = None,
) -> int:
  """Numbers per example that ``gram="global"`` gathers for a BERT sequence classifier
  (the formula of docs/method.md §2.8).

  ``sketch_features``: with ``scale_by_proximal(sketch_dim=k)``, the k₁·k₂ features of each
  attention and FFN kernel (``nearprox.sketch.side_dims``; 4096 for k = 4096 at BERT's
  shapes), gathered instead of those kernels' factors, when all of them are sketched
  (docs/method.md §2.9).
  """
  h, f, t = hidden, ffn, length
  kernels = t * (4 * 2 * h + 2 * (h + f)) if sketch_features is None else 6 * sketch_features
  return (
      num_layers * kernels
      + t * 3 * (h + 1)
      + num_layers * (5 * h + f + 4 * h)
      + 3 * h
      + (h + 2 * num_labels)
      + 2 * h
  )


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
    batch = _batch_size(loss_fn, p, a) * num_devices
    parts = sketch.sketch_per_example(grads, jnp.zeros((), jnp.int32), sketch_dim, batch)
    return parts.features, parts.exact

  return layer_factors.factor_nbytes(jax.eval_shape(gathered, params, *args))
