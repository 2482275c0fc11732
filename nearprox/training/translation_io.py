"""The translation branch of :mod:`nearprox.training.task_io`: model, splits, decoding, export.

| | translation (Multi30k) |
|---|---|
| model | :class:`~nearprox.text.models.seq2seq.Seq2SeqTransformer`, from scratch (``config.model``) |
| tokenizer | the joint subword vocabulary of the training split (:mod:`nearprox.text.data.subwords`) |
| a row | one sentence pair: ``source_ids``, ``target_input_ids``, ``target_output_ids`` |
| an evaluation split | :class:`TranslationEvalSplit` (id arrays + reference sentences) |
| evaluation | greedy (``config.dev_beam_size`` = 1) or beam decoding, BLEU and chrF (sacrebleu) |
| ``holdout_examples`` | training pairs |
| export | ``workdir/translation_model``: configs and tokenizer at the start, params at the end |

Evaluation during training decodes with ``config.dev_beam_size`` beams (greedy when 1); the
final evaluation with ``config.beam_size`` and ``config.length_penalty``, and when that is
another decoder the training loop also scores the last step with the training one
(``dev/bleu_greedy``: :func:`decoder_name`), so the curve ends with the decoder it began with.

A stopped training leaves orbax checkpoints and no params in ``workdir/translation_model``:
:func:`load_model` then takes the latest readable checkpoint, rebuilding its state's shape
from the training config written beside the model config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nearprox.text import data
from nearprox.text.data import subwords
from nearprox.text.models import seq2seq
from nearprox.training import orbax_checkpoints

INPUT_KEYS = ("source_ids", "target_input_ids", "target_output_ids")
MODEL_DIRNAME = "translation_model"
PARAMS_FILENAME = "params.msgpack"
CONFIG_FILENAME = "model_config.json"
TRAIN_CONFIG_FILENAME = "train_config.json"  # what restoring a checkpoint needs
# What experiments/configs/multi30k.py adds to default.py and a translation run reads.
CONFIG_FIELDS = (
    "direction",
    "vocab_size",
    "beam_size",
    "dev_beam_size",
    "length_penalty",
    "model.num_encoder_layers",
    "model.num_decoder_layers",
    "model.hidden_size",
    "model.num_heads",
    "model.intermediate_size",
    "model.dropout_rate",
)


@dataclasses.dataclass(frozen=True)
class TranslationEvalSplit:
  """An evaluation split: the encoded pairs (``arrays()``, what the eval step decodes from)
  and the raw target sentences the decoded output is scored against."""

  encoded: Mapping[str, np.ndarray]
  references: list[str]
  tokenizer: object

  def arrays(self) -> dict[str, np.ndarray]:
    return dict(self.encoded)


def model_config(config, vocab_size: int) -> seq2seq.Seq2SeqConfig:
  """The :class:`Seq2SeqConfig` of ``config.model`` for a vocabulary of ``vocab_size``."""
  m = config.model
  return seq2seq.Seq2SeqConfig(
      vocab_size=vocab_size,
      num_encoder_layers=m.num_encoder_layers,
      num_decoder_layers=m.num_decoder_layers,
      hidden_size=m.hidden_size,
      num_heads=m.num_heads,
      intermediate_size=m.intermediate_size,
      dropout_rate=m.dropout_rate,
      max_length=config.max_length,
      pad_id=subwords.PAD_ID,
      bos_id=subwords.BOS_ID,
      eos_id=subwords.EOS_ID,
  )


def _has(config, dotted: str) -> bool:
  *sections, name = dotted.split(".")
  for section in sections:
    config = config.get(section)
    if config is None:
      return False
  return name in config


def check_config(config) -> None:
  """ValueError for translation settings that cannot work (before any loading): first a
  config without the translation fields (a classification config with
  ``--config.task=multi30k``), naming the config that has them."""
  missing = [name for name in CONFIG_FIELDS if not _has(config, name)]
  if missing:
    raise ValueError(
        f"config.task = {config.task!r} trains a translation model, whose settings this "
        f"config lacks ({', '.join('config.' + m for m in missing)}): start from "
        "experiments/configs/multi30k.py (--config experiments/configs/multi30k.py), not a "
        "classification config"
    )
  data.translation.parse_direction(config.direction)
  for name in ("beam_size", "dev_beam_size", "vocab_size"):
    value = config[name]
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
  if config.model.name != "seq2seq":
    raise ValueError(
        f"translation trains config.model.name = 'seq2seq' from scratch, got {config.model.name!r}"
    )


def _load(config, split: str) -> data.ParallelSplit:
  return data.load_translation(split, config.data_dir, config.direction)


def create_model(config, rng):
  """(model, params, tokenizer): the subword vocabulary of the training split (cached) and a
  randomly initialised encoder–decoder sized by ``config.model``."""
  check_config(config)
  tokenizer = data.subword_tokenizer(_load(config, "train"), config.vocab_size)
  cfg = model_config(config, tokenizer.get_vocab_size())
  model = seq2seq.Seq2SeqTransformer(cfg, dtype=jnp.dtype(config.model.dtype))
  return model, seq2seq.init_seq2seq(cfg, rng), tokenizer


def load_splits(config, tokenizer, holdout_indices, reported=("dev", "test")) -> dict:
  """train arrays, and the ``reported`` splits (:func:`~nearprox.training.task_io.
  reported_splits`: dev and test; dev alone for a run tuned on dev; none when tuning with
  ``config.holdout_examples``, which scores ``holdout``) as :class:`TranslationEvalSplit`;
  a split not reported is neither read nor decoded. ``config.max_eval_examples`` > 0 scores
  a seeded subset of an evaluation split."""
  train = _load(config, "train")
  evaluated = {}
  if config.holdout_examples:
    rest, held = holdout_indices(len(train), config.holdout_examples)
    train, evaluated["holdout"] = train.select(rest), train.select(held)
  else:
    evaluated = {name: _load(config, name) for name in reported}
  splits = {"train": data.encode_pairs(tokenizer, train, config.max_length)[0]}
  for name, split in evaluated.items():
    keep = data.eval_subset(len(split), config.max_eval_examples, config.seed)
    if keep is not None:
      split = split.select(keep)
    arrays, _ = data.encode_pairs(tokenizer, split, config.max_length)
    splits[name] = TranslationEvalSplit(arrays, list(split.targets), tokenizer)
  return splits


def logits_fn(model, deterministic: bool):
  """:func:`~nearprox.text.models.seq2seq.seq2seq_logits_fn` (batch: source and target ids)."""
  return seq2seq.seq2seq_logits_fn(model, deterministic=deterministic)


def decode_fn(model, config, beam_size: int):
  """``fn(params, batch) -> ids [B, config.max_length]``: greedy decoding for
  ``beam_size`` = 1, else beam search with ``config.length_penalty``."""
  from nearprox.text import decoding

  if beam_size == 1:
    return lambda params, batch: decoding.greedy_decode(
        model, params, batch["source_ids"], max_length=config.max_length
    )
  return lambda params, batch: decoding.beam_search(
      model,
      params,
      batch["source_ids"],
      beam_size=beam_size,
      length_penalty=config.length_penalty,
      max_length=config.max_length,
  )


def decoder_name(beam_size: int) -> str:
  """ "greedy" (1 beam) or "beam<k>": the suffix of the metrics the training loop logs for the
  in-training decoder at the last step (``dev/bleu_greedy``)."""
  return "greedy" if beam_size == 1 else f"beam{beam_size}"


def scores(split: TranslationEvalSplit, ids: np.ndarray) -> dict[str, float]:
  """BLEU and chrF of the decoded rows ``ids`` [N, L] against the split's references."""
  return data.translation_scores(data.decode_ids(split.tokenizer, ids), split.references)


# ------------------------------------------------------------------------------ export


def export_model(model, params, tokenizer, path: str | os.PathLike, config=None) -> Path:
  """Writes the model config (JSON), the tokenizer and ``params`` (flax msgpack) to ``path``.

  ``params`` None (the start of a training): no params, and an earlier export's removed (a
  training resumed in the workdir changes them: until it ends, :func:`load_model` reads its
  checkpoints). ``config``: the training config, also written (``train_config.json``),
  which gives the shape of a checkpoint's optimizer state.
  """
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  description = {
      "config": dataclasses.asdict(model.config),
      "dtype": jnp.dtype(model.dtype).name,
  }
  (path / CONFIG_FILENAME).write_text(json.dumps(description, indent=2))
  data.save_tokenizer(tokenizer, path)
  if config is not None:
    (path / TRAIN_CONFIG_FILENAME).write_text(config.to_json(indent=2))
  if params is None:
    (path / PARAMS_FILENAME).unlink(missing_ok=True)
  else:
    host_params = jax.tree.map(np.asarray, params)
    (path / PARAMS_FILENAME).write_bytes(flax.serialization.msgpack_serialize(host_params))
  return path


def load_model(path: str | os.PathLike):
  """(model, params, tokenizer) of a training workdir (or its ``translation_model`` folder):
  the params exported at the end of training, else those of the workdir's latest readable
  orbax checkpoint (a training that stopped or is still running; for schedule-free AdamW its
  averaged iterate, as the export). FileNotFoundError when there is neither."""
  path = Path(path)
  folder = path / MODEL_DIRNAME if (path / MODEL_DIRNAME).is_dir() else path
  workdir = folder.parent if folder.name == MODEL_DIRNAME else folder
  train_hint = (
      "train one with python -m nearprox.training.train --config experiments/configs/multi30k.py"
  )
  if not (folder / CONFIG_FILENAME).is_file():
    raise FileNotFoundError(
        f"{path}: no trained translation model (no {MODEL_DIRNAME}/{CONFIG_FILENAME}, which "
        f"a translation training writes at its start); {train_hint}"
    )
  description = json.loads((folder / CONFIG_FILENAME).read_text())
  model = seq2seq.Seq2SeqTransformer(
      seq2seq.Seq2SeqConfig(**description["config"]), dtype=jnp.dtype(description["dtype"])
  )
  tokenizer = data.load_tokenizer(folder)
  if (folder / PARAMS_FILENAME).is_file():
    params = flax.serialization.msgpack_restore((folder / PARAMS_FILENAME).read_bytes())
    return model, params, tokenizer
  restored = _checkpoint_params(model, folder, workdir / orbax_checkpoints.DIRNAME)
  if restored is None:
    raise FileNotFoundError(
        f"{path}: no trained translation model: neither exported params "
        f"({folder / PARAMS_FILENAME}, written when a training ends) nor a readable orbax "
        f"checkpoint in {workdir / orbax_checkpoints.DIRNAME}; {train_hint}"
    )
  params, step = restored
  logging.warning(
      "%s: no exported params (the training has not ended); using its checkpoint at step %d",
      path,
      step,
  )
  return model, params, tokenizer


def _checkpoint_params(model, folder: Path, directory: Path):
  """(evaluated params, step) of the latest readable checkpoint in ``directory``; None when
  there is none. The state's shape comes from the training config in ``folder``: the model's
  params and the optimizer state ``optimizers.create_optimizer`` gives them."""
  from nearprox.training import optimizers, parallel, train

  if not (folder / TRAIN_CONFIG_FILENAME).is_file() or not directory.is_dir():
    return None
  config = ml_collections.ConfigDict(json.loads((folder / TRAIN_CONFIG_FILENAME).read_text()))
  axis_name = None if config.parallel == "jit" else parallel.AXIS
  tx, _ = optimizers.create_optimizer(config, config.num_train_steps, axis_name)
  params = jax.eval_shape(functools.partial(seq2seq.init_seq2seq, model.config), jax.random.key(0))
  template = train.TrainState(
      jax.ShapeDtypeStruct((), jnp.int32), params, jax.eval_shape(tx.init, params)
  )
  restored = orbax_checkpoints.restore_latest(directory, template)
  if restored is None:
    return None
  state, step = restored
  return optimizers.evaluation_params(state.opt_state, state.params), step
