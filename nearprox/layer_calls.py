"""Which Flax layer call reads which parameter leaf: the discovery trace of the factored path.

:func:`discover` runs ``loss_fn`` abstractly (``jax.make_jaxpr``, no FLOPs) with
``flax.linen.intercept_methods`` around ``__call__`` of Dense, DenseGeneral, Embed, LayerNorm
and RMSNorm and around ``Embed.attend`` (the tied output projection), and returns a
:class:`Plan`: each intercepted call (:class:`LayerCall`) and each leaf's path through
:func:`nearprox.factored_grads.factored_value_and_grads` ("kernel", "bias", "embed",
"tied_embed", "local", "fallback" or "unused"). The rules are in that module's docstring.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta, tracers
from jax.extend import core as jex_core

DENSE_TYPES = (nn.Dense, nn.DenseGeneral)
EMBED_TYPES = (nn.Embed,)
LOCAL_TYPES = (nn.LayerNorm, nn.RMSNorm)
INTERCEPTED = DENSE_TYPES + EMBED_TYPES + LOCAL_TYPES


@dataclasses.dataclass
class LayerCall:
  """One intercepted layer call, as seen by the discovery trace."""

  kind: str | None  # "dense", "embed", "attend", "local", or None when not factorable
  reason: str  # why not factorable (for debugging), "" otherwise
  module_type: type
  input_shape: tuple
  module: nn.Module | None = None  # unbound clone, for the local per-example vjp
  leaves: dict[str, int] = dataclasses.field(default_factory=dict)  # param name -> leaf
  contract_axes: tuple[int, ...] = ()  # dense: input axes contracted with the kernel
  output_shape: tuple = ()
  output_dtype: Any = None
  probed: bool = False
  method: str = "__call__"  # the intercepted method: "__call__", or "attend" of an Embed


@dataclasses.dataclass
class Plan:
  calls: list[LayerCall]
  leaf_kinds: list[str]  # per params leaf: "kernel", "bias", "embed", "tied_embed", "local",
  # "fallback" or "unused"


def _normalize(axes, ndim: int) -> tuple[int, ...]:
  axes = axes if isinstance(axes, (tuple, list)) else (axes,)
  return tuple(sorted(a % ndim for a in axes))


def _layer_check(module: nn.Module, method: str, x, args, kwargs) -> tuple[str | None, str, tuple]:
  """(kind or None, reason, contract_axes) from the module's config and its input."""
  if len(args) != 1 or any(v is not None for v in kwargs.values()):
    return None, "called with extra arguments", ()
  if method == "attend":
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return None, "attend on a non-floating query", ()
    if x.ndim < 2:
      return None, "the input has no axis besides the batch axis", ()
    return "attend", "", ()
  if isinstance(module, DENSE_TYPES):
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
  if isinstance(module, EMBED_TYPES):
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


def intercepts(context, busy: bool) -> bool:
  if busy:
    return False
  if context.method_name == "attend":
    return type(context.module) in EMBED_TYPES
  return context.method_name == "__call__" and type(context.module) in INTERCEPTED


def discover(loss_fn: Callable, treedef, leaves: list, args: tuple, batch: int) -> Plan:
  """Abstract trace: which call reads which leaf, and which leaves are used elsewhere.

  Inside factorable calls the layer runs on constant zero parameters (a clone applied with
  explicit variables), so any remaining use of a leaf in the traced program is a use the
  factored path cannot see; such leaves take the exact fallback.
  """
  calls: list[LayerCall] = []

  def traced(leaf_values, args):
    leaf_of = {id(v): i for i, v in enumerate(leaf_values)}
    outer = tracers.current_trace()
    busy = [False]

    def interceptor(next_fun, call_args, call_kwargs, context):
      if not intercepts(context, busy[0]):
        return next_fun(*call_args, **call_kwargs)
      module = context.module
      x = call_args[0] if call_args else None
      call = LayerCall(
          None, "", type(module), tuple(getattr(x, "shape", ())), method=context.method_name
      )
      calls.append(call)
      params = {name: meta.unbox(v) for name, v in module.variables.get("params", {}).items()}
      if tracers.current_trace() != outer:
        call.reason = "inside a nested transform (scan, remat, vmap ...)"
      elif not hasattr(x, "shape") or x.ndim == 0 or x.shape[0] != batch:
        call.reason = f"the input's leading axis is not the batch axis of size {batch}"
      elif not params or any(id(v) not in leaf_of for v in params.values()):
        call.reason = "its parameters are not leaves of params passed through unchanged"
      else:
        call.kind, call.reason, call.contract_axes = _layer_check(
            module, call.method, x, call_args, call_kwargs
        )
      if call.kind is None:
        return next_fun(*call_args, **call_kwargs)
      call.leaves = {name: leaf_of[id(v)] for name, v in params.items()}
      call.module = module.clone(parent=None)
      zeros = {name: jnp.zeros(v.shape, v.dtype) for name, v in params.items()}
      busy[0] = True
      try:
        out = call.module.apply({"params": zeros}, x, method=call.method)
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
  return Plan(calls, _leaf_kinds(calls, used_elsewhere))


def _leaf_kinds(calls: list[LayerCall], used_elsewhere: list[bool]) -> list[str]:
  """Assigns each leaf its path; a leaf read by calls of different kinds falls back, except a
  table read by lookups and ``attend`` calls (weight tying): "tied_embed"."""
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
      elif call.kind == "attend":
        role = ("tied_embed" if name == "embedding" else None,)
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
    elif roles == {("embed",), ("tied_embed",)}:
      kinds.append("tied_embed")
    else:
      kinds.append("fallback")
  # A module's call is probed when any of its leaves is taken from the captured cotangents.
  for call in calls:
    call.probed = call.kind is not None and any(
        kinds[leaf] not in ("fallback", "unused") for leaf in call.leaves.values()
    )
  return kinds


def loss_batch_size(loss_fn: Callable, params, args: tuple) -> int:
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
