"""Fixed-shape batches for ``jit``: seeded per-epoch shuffling, a masked last batch, shards,
length buckets.

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

**Length buckets.** :func:`bucketed_batches` groups rows of similar length (a few fixed
lengths, so the step compiles once per bucket) and cuts the padding beyond each bucket's
length: for Multi30k, whose pairs have 15–16 subwords on average but are padded to 48, a
step then costs about a third. Same masking, same (seed, epoch) purity.

**Several devices / hosts.** :func:`shard_batch` reshapes the leading axis [B] to
[num_shards, B / num_shards] for ``pmap``. On a multi-host pod every process iterates the
same global batches (same seed) and keeps its own contiguous block with
:func:`host_slice` (or ``batches(..., process_index=, process_count=)``); the blocks of
processes 0, 1, ... concatenated are the global batch, which is the layout
``jax.make_array_from_process_local_data`` expects for a batch axis sharded over the
devices in process order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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
  arrays, num_examples = _check_arrays(data, batch_size, process_count)
  order = epoch_order(num_examples, seed, epoch, shuffle)
  for start in range(
      0, num_batches(num_examples, batch_size, drop_remainder) * batch_size, batch_size
  ):
    yield _batch_of(
        arrays, order[start : start + batch_size], batch_size, process_index, process_count
    )


def _check_arrays(data, batch_size: int, process_count: int) -> tuple[dict, int]:
  """(arrays, N) of ``data`` after the checks every batch iterator makes."""
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
  return arrays, num_examples


def _batch_of(arrays, rows, batch_size, process_index, process_count, length=None):
  """The batch of ``rows`` (fewer than B: padded with copies of its own rows, mask 0); the
  arrays named in ``length`` (a (keys, T) pair) cut to their first T positions."""
  num_real = len(rows)
  if num_real < batch_size:  # the last batch: pad with copies of its own rows
    rows = rows[np.arange(batch_size) % num_real]
  batch = {key: np.asarray(value)[rows] for key, value in arrays.items()}
  if length is not None:
    keys, width = length
    batch.update({key: batch[key][:, :width] for key in keys})
  batch["mask"] = (np.arange(batch_size) < num_real).astype(np.float32)
  batch["index"] = rows.astype(np.int32)
  if process_count > 1:
    batch = host_slice(batch, process_index, process_count)
  return batch


# ------------------------------------------------------------------------ length buckets


def row_lengths(arrays: Mapping[str, np.ndarray], keys: Sequence[str]) -> np.ndarray:
  """[N] int: for each row, 1 + the last position holding a non-zero id in any of ``keys``
  (padding is id 0 in every tokenizer here, and trails the real tokens)."""
  lengths = np.zeros(np.shape(arrays[keys[0]])[0], np.int64)
  for key in keys:
    nonzero = np.asarray(arrays[key]) != 0
    width = nonzero.shape[1]
    last = width - np.argmax(nonzero[:, ::-1], axis=1)
    lengths = np.maximum(lengths, np.where(nonzero.any(axis=1), last, 0))
  return lengths


def bucket_ids(lengths: np.ndarray, boundaries: Sequence[int]) -> np.ndarray:
  """[N] int: the index of the first boundary ≥ each length (ValueError above the last)."""
  boundaries = check_boundaries(boundaries)
  too_long = np.asarray(lengths) > boundaries[-1]
  if too_long.any():
    raise ValueError(
        f"{int(too_long.sum())} rows are longer than the last length bucket {boundaries[-1]} "
        f"(the longest has {int(np.max(lengths))} positions)"
    )
  return np.searchsorted(np.asarray(boundaries), lengths, side="left")


def check_boundaries(boundaries: Sequence[int]) -> tuple[int, ...]:
  """``boundaries`` as a tuple, after checking they are increasing positive integers."""
  boundaries = tuple(boundaries)
  if not boundaries or any(not isinstance(b, (int, np.integer)) or b < 1 for b in boundaries):
    raise ValueError(f"length buckets must be positive integers, got {boundaries!r}")
  if any(a >= b for a, b in zip(boundaries, boundaries[1:])):
    raise ValueError(f"length buckets must increase, got {boundaries!r}")
  return boundaries


def num_bucketed_batches(lengths: np.ndarray, boundaries: Sequence[int], batch_size: int) -> int:
  """Batches per epoch of :func:`bucketed_batches`: Σ over buckets of ceil(n_b / B)."""
  _check_positive(batch_size=batch_size)
  counts = np.bincount(bucket_ids(lengths, boundaries), minlength=len(boundaries))
  return int(sum(-(-int(n) // batch_size) for n in counts))


def bucketed_batches(
    data: Encoded | Mapping[str, np.ndarray],
    batch_size: int,
    *,
    sequence_keys: Sequence[str],
    boundaries: Sequence[int],
    seed: int = 0,
    epoch: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """One shuffled epoch of batches of similar lengths, each cut to its bucket's length.

  Row n falls in bucket b, the first boundary ≥ its length (:func:`row_lengths` over
  ``sequence_keys``). Epoch e takes the order of :func:`epoch_order` (seed, e), splits it
  by bucket (keeping that order), cuts each bucket into batches of B (its last one padded
  and masked as in :func:`batches`), and visits the batches of all buckets in the order of
  ``default_rng([seed, e, 1]).permutation``. A batch of bucket b has its ``sequence_keys``
  cut to ``boundaries[b]`` positions: only padding is removed (every row of the batch is at
  most that long), so each example's loss is unchanged and a step costs about its real
  length instead of the longest row's. The jitted step compiles once per bucket. Every
  example is seen once per epoch; a pure function of (seed, epoch), like :func:`batches`.
  """
  arrays, num_examples = _check_arrays(data, batch_size, process_count)
  boundaries = check_boundaries(boundaries)
  widths = {np.shape(arrays[key])[1] for key in sequence_keys}
  if widths != {boundaries[-1]}:
    raise ValueError(
        f"the last length bucket ({boundaries[-1]}) must equal the padded length of "
        f"{list(sequence_keys)} ({sorted(widths)})"
    )
  buckets = bucket_ids(row_lengths(arrays, sequence_keys), boundaries)
  order = epoch_order(num_examples, seed, epoch)
  planned = []  # (bucket, rows)
  for bucket in range(len(boundaries)):
    rows = order[buckets[order] == bucket]
    planned += [(bucket, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
  visit = np.random.default_rng([int(seed), int(epoch), 1]).permutation(len(planned))
  for i in visit:
    bucket, rows = planned[i]
    length = (tuple(sequence_keys), boundaries[bucket])
    yield _batch_of(arrays, rows, batch_size, process_index, process_count, length)


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
