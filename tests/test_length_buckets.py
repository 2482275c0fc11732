"""Length-bucketed training batches (``data.bucketed_batches``, ``config.length_buckets``):
every example once per epoch, only padding cut, a pure function of (seed, epoch), resumable,
and a per-example translation loss that does not change when its padding is cut."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import default, multi30k
from nearprox.text import data, losses
from nearprox.text.models import seq2seq
from nearprox.training import task_io, train

KEYS = ("source_ids", "target_ids")
BOUNDARIES = (4, 6, 10)


def _arrays(n=53, width=10, seed=0):
  """Rows of random length 1..width in two keys (zero padding trails), and labels."""
  rng = np.random.default_rng(seed)
  arrays = {key: np.zeros((n, width), np.int32) for key in KEYS}
  for key in KEYS:
    for row, length in enumerate(rng.integers(1, width + 1, n)):
      arrays[key][row, :length] = rng.integers(1, 50, length)
  arrays["labels"] = np.arange(n, dtype=np.int32)
  return arrays


def _bucketed(arrays, batch_size=8, **kw):
  return list(
      data.bucketed_batches(
          arrays, batch_size, sequence_keys=KEYS, boundaries=BOUNDARIES, **{"seed": 3, **kw}
      )
  )


def test_row_lengths_take_the_last_token_of_any_key():
  arrays = {
      "a": np.array([[5, 6, 0, 0], [0, 0, 0, 0], [1, 0, 2, 0]]),
      "b": np.array([[1, 0, 0, 0], [7, 0, 0, 0], [1, 1, 1, 1]]),
  }
  np.testing.assert_array_equal(data.row_lengths(arrays, ["a"]), [2, 0, 3])
  np.testing.assert_array_equal(data.row_lengths(arrays, ["a", "b"]), [2, 1, 4])


def test_every_example_once_per_epoch_in_batches_cut_to_its_bucket():
  arrays = _arrays()
  lengths = data.row_lengths(arrays, KEYS)
  batches = _bucketed(arrays, epoch=0)
  assert len(batches) == data.num_bucketed_batches(lengths, BOUNDARIES, 8)
  seen = np.concatenate([b["index"][b["mask"] > 0] for b in batches])
  np.testing.assert_array_equal(np.sort(seen), np.arange(53))
  widths = set()
  for batch in batches:
    width = batch["source_ids"].shape[1]
    widths.add(width)
    assert batch["target_ids"].shape[1] == width and batch["labels"].shape == (8,)
    rows = batch["index"]
    # All rows fit the width, and belong to this bucket (longer than the one below).
    assert np.all(lengths[rows] <= width)
    below = ([0] + list(BOUNDARIES))[BOUNDARIES.index(width)]
    assert np.all(lengths[rows] > below)
    for key in KEYS:  # only padding was cut
      np.testing.assert_array_equal(batch[key], arrays[key][rows, :width])
      assert not arrays[key][rows, width:].any()
    np.testing.assert_array_equal(batch["labels"], arrays["labels"][rows])
    real = int(batch["mask"].sum())  # a bucket's last batch repeats its own rows, masked
    assert np.all(batch["mask"][:real] == 1) and np.all(batch["mask"][real:] == 0)
  assert widths == set(BOUNDARIES)


def test_bucketed_order_is_a_function_of_seed_and_epoch():
  arrays = _arrays()
  order = lambda batches: np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(
      order(_bucketed(arrays, epoch=1)), order(_bucketed(arrays, epoch=1))
  )
  assert not np.array_equal(order(_bucketed(arrays, epoch=1)), order(_bucketed(arrays, epoch=2)))
  assert not np.array_equal(
      order(_bucketed(arrays, epoch=1)), order(_bucketed(arrays, epoch=1, seed=4))
  )
  # Buckets are interleaved, not visited one after the other.
  widths = [b["source_ids"].shape[1] for b in _bucketed(arrays, epoch=0)]
  assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_host_blocks_concatenate_to_the_global_batch():
  arrays = _arrays()
  whole = _bucketed(arrays, epoch=0)
  blocks = [_bucketed(arrays, epoch=0, process_index=p, process_count=2) for p in range(2)]
  for batch, first, second in zip(whole, *blocks, strict=True):
    for key in batch:
      np.testing.assert_array_equal(batch[key], np.concatenate([first[key], second[key]]))


@pytest.mark.parametrize(
    "boundaries, message",
    [
        ((), "positive integers"),
        ((4, 4, 10), "must increase"),
        ((4, 0, 10), "positive integers"),
        ((4, 6, 12), "padded length"),
    ],
)
def test_bad_boundaries_are_named(boundaries, message):
  with pytest.raises(ValueError, match=message):
    next(data.bucketed_batches(_arrays(), 8, sequence_keys=KEYS, boundaries=boundaries, seed=0))


def test_rows_longer_than_the_last_bucket_are_an_error():
  with pytest.raises(ValueError, match="longer than the last length bucket 6"):
    data.num_bucketed_batches(np.array([3, 7, 9]), (4, 6), 8)


def test_train_batches_resume_at_any_step_across_epochs():
  arrays = _arrays()
  config = default.get_config()
  config.batch_size = 8
  config.max_length = 10
  config.length_buckets = BOUNDARIES
  task = data.get_task("multi30k")
  config.task = "multi30k"
  keys = task_io.sequence_keys(task)
  arrays = {
      keys[0]: arrays["source_ids"],
      keys[1]: arrays["target_ids"],
      keys[2]: arrays["target_ids"],
  }
  per_epoch = data.num_bucketed_batches(data.row_lengths(arrays, keys), BOUNDARIES, 8)
  from_start = train.train_batches(arrays, config, task, 0)
  run = [next(from_start) for _ in range(per_epoch + 3)]
  resumed = train.train_batches(arrays, config, task, per_epoch - 2)
  for expected in run[per_epoch - 2 :]:
    got = next(resumed)
    np.testing.assert_array_equal(got["index"], expected["index"])
    assert got[keys[0]].shape == expected[keys[0]].shape
  assert {b[keys[0]].shape[1] for b in run} == set(BOUNDARIES)


def test_config_buckets_below_max_length_then_max_length():
  config = multi30k.get_config()
  assert task_io.length_boundaries(config) == (16, 24, 32, 48)
  config.max_length = 40
  assert task_io.length_boundaries(config) == (16, 24, 32, 40)
  config.max_length = 12
  assert task_io.length_boundaries(config) == (12,)
  config.length_buckets = ()
  assert task_io.length_boundaries(config) == ()
  config.length_buckets = (32, 16, 48)
  with pytest.raises(ValueError, match="must increase"):
    task_io.check_config(config, data.get_task("multi30k"))


def test_cutting_padding_leaves_each_pair_s_loss_unchanged():
  cfg = seq2seq.Seq2SeqConfig(
      vocab_size=50,
      num_encoder_layers=1,
      num_decoder_layers=1,
      hidden_size=16,
      num_heads=2,
      intermediate_size=32,
      dropout_rate=0.0,
      max_length=12,
  )
  model = seq2seq.Seq2SeqTransformer(cfg)
  params = seq2seq.init_seq2seq(cfg, jax.random.key(0))
  logits_fn = seq2seq.seq2seq_logits_fn(model)
  rng = np.random.default_rng(1)
  batch = {
      key: np.zeros((4, 12), np.int32) for key in task_io.sequence_keys(data.get_task("multi30k"))
  }
  for row, length in enumerate([3, 5, 6, 2]):
    batch["source_ids"][row, :length] = rng.integers(4, 50, length)
    target = rng.integers(4, 50, length)
    batch["target_output_ids"][row, :length] = target
    batch["target_input_ids"][row, :length] = np.concatenate([[1], target[:-1]])

  def per_example(batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    return losses.task_loss("translation", logits_fn(params, batch), batch, label_smoothing=0.1)

  cut = {key: value[:, :6] for key, value in batch.items()}
  np.testing.assert_allclose(per_example(cut), per_example(batch), rtol=1e-5, atol=1e-6)
