"""Fixed-shape batches for ``jit``: seeded per-epoch shuffling, a masked last batch, shards.

Every batch is a dict of NumPy arrays with the same shapes, so a jitted step compiles
once:

| key | shape | dtype | meaning |
|---|---|---|---|
| ``input_ids``, ``attention_mask``, ``token_type_ids`` | [B, T] | int32 | tokens |
| ``labels`` | [B] | int32 | class indices |
| ``mask`` | [B] | float32 | 1 for real examples, 0 for padding rows |
| ``index`` | [B] | int32 | row of each example in the encoded split |

**The last batch.** When N is not a multiple of B the final batch is kept and filled up to
B rows with *copies of its own real rows* carrying ``mask = 0`` (copies, not zeros: a row
of all-padding tokens can make an attention softmax 0/0, and NaN·0 is still NaN). Every
example is therefore seen exactly once per epoch with weight 1, and a loss or metric
weighted by ``mask`` (``Σ mask·ℓ / Σ mask``; the ``mask=`` argument of
:mod:`nearprox.text.data.metrics` and of ``nearprox.scale_by_proximal``) equals the one on the
unpadded data. ``drop_remainder=True`` drops it instead (e.g. for training).

**Shuffling.** Epoch e's order is ``np.random.default_rng([seed, e]).permutation(N)``: a
pure function of (seed, epoch), the same on every host and after a restart, so resuming
at (epoch, step) replays exactly the batches a crashed run would have seen.

**Several devices / hosts.** :func:`shard_batch` reshapes the leading axis [B] to
[num_shards, B / num_shards] for ``pmap``. On a multi-host pod every process iterates the
same global batches (same seed) and keeps its own contiguous block with
:func:`host_slice` (or ``batches(..., process_index=, process_count=)``); the blocks of
processes 0, 1, ... concatenated are the global batch, which is the layout
``jax.make_array_from_process_local_data`` expects for a batch axis sharded over the
devices in process order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from nearprox.text.data.encoding import Encoded

RESERVED_KEYS = ("mask", "index")


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = False) -> int:
  """Batches per epoch: ceil(N / B), or floor(N / B) with ``drop_remainder``."""
  _check_positive(batch_size=batch_size)
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def epoch_order(
    num_examples: int, seed: int = 0, epoch: int = 0, shuffle: bool = True
) -> np.ndarray:
  """The example order of one epoch: a permutation seeded by (seed, epoch), or arange."""
  if not shuffle:
    return np.arange(num_examples)
  if seed < 0 or epoch < 0:
    raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
  return np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)


def batches(
    data: Encoded | Mapping[str, np.ndarray],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    *,
    drop_remainder: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Yields one epoch of fixed-shape batches (keys and padding: module docstring).

  Args:
    data: an :class:`~nearprox.text.data.Encoded` split, or any mapping of arrays with a common
      leading axis N (``mask`` and ``index`` are added here and may not be in it).
    batch_size: the global batch size B.
    seed: shuffling seed (same on every host).
    epoch: epoch number; each epoch has its own order.
    shuffle: False for evaluation (file order).
    drop_remainder: drop the last partial batch instead of padding it.
    process_index, process_count: yield only this process's block of B / process_count
      rows of every global batch (see :func:`host_slice`).
  """
  arrays = data.arrays() if isinstance(data, Encoded) else dict(data)
  _check_positive(batch_size=batch_size, process_count=process_count)
  clash = [key for key in RESERVED_KEYS if key in arrays]
  if clash:
    raise ValueError(f"data must not contain the keys {clash}; batches() adds them")
  sizes = {key: np.shape(value)[0] for key, value in arrays.items()}
  if not sizes or len(set(sizes.values())) != 1:
    raise ValueError(f"data arrays must share a leading axis, got sizes {sizes}")
  num_examples = next(iter(sizes.values()))
  if num_examples == 0:
    raise ValueError("data has no examples")
  if batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} is not divisible by process_count " f"{process_count}"
    )

  order = epoch_order(num_examples, seed, epoch, shuffle)
  for start in range(
      0, num_batches(num_examples, batch_size, drop_remainder) * batch_size, batch_size
  ):
    rows = order[start : start + batch_size]
    num_real = len(rows)
    if num_real < batch_size:  # the last batch: pad with copies of its own rows
      rows = rows[np.arange(batch_size) % num_real]
    batch = {key: np.asarray(value)[rows] for key, value in arrays.items()}
    batch["mask"] = (np.arange(batch_size) < num_real).astype(np.float32)
    batch["index"] = rows.astype(np.int32)
    if process_count > 1:
      batch = host_slice(batch, process_index, process_count)
    yield batch


def host_slice(
    batch: Mapping[str, np.ndarray], process_index: int, process_count: int
) -> dict[str, np.ndarray]:
  """Process ``process_index``'s contiguous block of B / process_count rows of each array.

  The blocks of processes 0 .. process_count-1, concatenated, are ``batch``.
  """
  _check_positive(process_count=process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")

  def take(value):
    size = np.shape(value)[0]
    if size % process_count:
      raise ValueError(f"batch axis {size} is not divisible by process_count {process_count}")
    block = size // process_count
    return value[process_index * block : (process_index + 1) * block]

  return _map_leaves(take, batch)


def shard_batch(batch: Mapping[str, np.ndarray], num_shards: int) -> dict[str, np.ndarray]:
  """Reshapes every array's leading axis [B, ...] to [num_shards, B / num_shards, ...]."""
  _check_positive(num_shards=num_shards)

  def reshape(value):
    value = np.asarray(value)
    if value.shape[0] % num_shards:
      raise ValueError(
          f"batch axis {value.shape[0]} is not divisible by num_shards " f"{num_shards}"
      )
    return value.reshape((num_shards, value.shape[0] // num_shards) + value.shape[1:])

  return _map_leaves(reshape, batch)


def _map_leaves(fn, tree):
  if isinstance(tree, Mapping):
    return {key: _map_leaves(fn, value) for key, value in tree.items()}
  return fn(tree)


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")


def eval_subset(num_examples: int, max_examples: int, seed: int) -> np.ndarray | None:
  """Sorted indices of the seeded random subset of an evaluation split (None: all of it).

  Random, not the first ``max_examples``: the files are often sorted by label or source.
  """
  if not 0 < max_examples < num_examples:
    return None
  return np.sort(np.random.default_rng(seed).permutation(num_examples)[:max_examples])
