"""Running one per-device step function on one device, several devices, or several hosts.

The train and eval steps are written once, for one device's block of the batch, with
collectives over the axis named ``"batch"``. :class:`Runner` wraps them in one of

* ``"shard_map"``: ``jax.jit(jax.shard_map(...))`` over a 1-D mesh of every device of every
  host (today's recommended path); the state is replicated, batches are sharded;
* ``"pmap"``: ``jax.pmap`` over this host's devices (collectives still span all hosts);
* ``"jit"``: plain ``jax.jit`` on one device, no axis (collectives are skipped).

Several hosts: :func:`initialize` joins them with ``jax.distributed.initialize()``. Each host
feeds its block of every global batch (:func:`host_shard`); evaluation gathers the hosts'
predictions (:func:`gather_from_hosts`).
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nearprox.text import data

AXIS = "batch"
MODES = ("shard_map", "pmap", "jit")


def initialize() -> None:
  """Joins the other processes of a multi-host run; a no-op for a single process.

  * ``NEARPROX_DISTRIBUTED=auto`` (set by ``tpu_scripts/launch.sh``): TPU pods and clusters
    that ``jax.distributed.initialize()`` detects by itself.
  * ``NEARPROX_COORDINATOR=host:port``, ``NEARPROX_NUM_PROCESSES=N``,
    ``NEARPROX_PROCESS_ID=i``: explicit, e.g. several CPU processes on one machine (which
    then use gloo collectives).
  """
  if jax.distributed.is_initialized():
    return
  if os.environ.get("NEARPROX_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  elif int(os.environ.get("NEARPROX_NUM_PROCESSES", "1")) > 1:
    if jax.config.jax_platforms in (None, "", "cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["NEARPROX_COORDINATOR"],
        num_processes=int(os.environ["NEARPROX_NUM_PROCESSES"]),
        process_id=int(os.environ["NEARPROX_PROCESS_ID"]),
    )
  else:
    return
  logging.info(
      "process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


def is_main_process() -> bool:
  return jax.process_index() == 0


def host_shard() -> dict[str, int]:
  """Keyword arguments of :func:`nearprox.text.data.batches` selecting this host's rows."""
  return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def gather_from_hosts(tree):
  """Concatenates every host's arrays along the first axis (identity for one process)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def _host_local(array) -> np.ndarray:
  """This host's rows of a batch-sharded global array, in order."""
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicas along other mesh axes hold the same rows
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


class Runner:
  """Compiles and runs a (train, eval) pair of per-device step functions in one mode."""

  def __init__(self, mode: str = "shard_map"):
    if mode not in MODES:
      raise ValueError(f"config.parallel must be one of {MODES}, got {mode!r}")
    if mode == "jit" and jax.process_count() > 1:
      raise ValueError(
          'parallel="jit" runs on one device; use "shard_map" or "pmap" on ' "several hosts"
      )
    self.mode = mode
    self.axis_name = None if mode == "jit" else AXIS
    if mode == "shard_map":
      self.mesh = jax.make_mesh((jax.device_count(),), (AXIS,))
      self.replicated = NamedSharding(self.mesh, P())
      self.sharded = NamedSharding(self.mesh, P(AXIS))

  def compile(self, train_fn, eval_fn) -> None:
    """train_fn(state, batch, rng) -> (state, metrics); eval_fn(state, batch) -> logits (it
    picks the params it evaluates from the state)."""
    if self.mode == "jit":
      self._train = jax.jit(train_fn, donate_argnums=0)
      self._eval = jax.jit(eval_fn)
    elif self.mode == "pmap":
      self._train = jax.pmap(train_fn, AXIS, in_axes=(0, 0, None), donate_argnums=0)
      self._eval = jax.pmap(eval_fn, AXIS)
    else:
      # check_vma=False: the step sums gradients itself (psum inside the proximal transform
      # or train_step); automatic psums on replicated params would double-count.
      self._train = jax.jit(
          jax.shard_map(
              train_fn,
              mesh=self.mesh,
              in_specs=(P(), P(AXIS), P()),
              out_specs=(P(), P()),
              check_vma=False,
          ),
          donate_argnums=0,
      )
      self._eval = jax.jit(
          jax.shard_map(
              eval_fn, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False
          )
      )

  def _put_batch(self, batch):
    if self.mode == "pmap":
      return data.shard_batch(batch, jax.local_device_count())
    if self.mode == "shard_map":
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(self.sharded, np.asarray(x)), batch
      )
    return batch

  def put_state(self, state):
    """Places a host pytree (identical on every host) on the devices."""
    if self.mode == "pmap":
      copies = jax.local_device_count()
      return jax.tree.map(lambda x: np.stack([np.asarray(x)] * copies), state)
    if self.mode == "shard_map":
      return jax.tree.map(
          lambda x: jax.make_array_from_callback(
              np.shape(x), self.replicated, lambda index: np.asarray(x)[index]
          ),
          state,
      )
    return jax.device_put(state)

  def get_state(self, device_state):
    """A host copy (NumPy) of the state: the same on every host."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: np.asarray(x[0]), device_state)
    if self.mode == "shard_map":
      return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), device_state)
    return jax.device_get(device_state)

  def train(self, device_state, batch, rng):
    """One step on this host's block of the global batch; metrics as host scalars."""
    device_state, metrics = self._train(device_state, self._put_batch(batch), rng)
    if self.mode == "pmap":
      metrics = jax.tree.map(lambda x: x[0], metrics)
    elif self.mode == "shard_map":
      metrics = jax.tree.map(lambda x: x.addressable_data(0), metrics)
    return device_state, metrics

  def eval(self, device_state, batch) -> np.ndarray:
    """Logits of this host's rows of ``batch``."""
    logits = self._eval(device_state, self._put_batch(batch))
    if self.mode == "pmap":
      return np.asarray(logits).reshape((-1,) + logits.shape[2:])
    if self.mode == "shard_map":
      return _host_local(logits)
    return np.asarray(logits)
