"""The translation branch of :mod:`nearprox.training.task_io`: model, splits, decoding, export.

| | translation (Multi30k) |
|---|---|
| model | :class:`~nearprox.text.models.seq2seq.Seq2SeqTransformer`, from scratch (``config.model``) |
| tokenizer | the joint subword vocabulary of the training split (:mod:`nearprox.text.data.subwords`) |
| a row | one sentence pair: ``source_ids``, ``target_input_ids``, ``target_output_ids`` |
| an evaluation split | :class:`TranslationEvalSplit` (id arrays + reference sentences) |
| evaluation | greedy (``config.dev_beam_size`` = 1) or beam decoding, BLEU and chrF (sacrebleu) |
| ``holdout_examples`` | training pairs |
| export | ``workdir/translation_model``: params, model config, tokenizer (:func:`load_model`) |

Evaluation during training decodes with ``config.dev_beam_size`` beams (greedy when 1); the
final evaluation with ``config.beam_size`` and ``config.length_penalty``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from nearprox.text import data
from nearprox.text.data import subwords
from nearprox.text.models import seq2seq

INPUT_KEYS = ("source_ids", "target_input_ids", "target_output_ids")
MODEL_DIRNAME = "translation_model"
PARAMS_FILENAME = "params.msgpack"
CONFIG_FILENAME = "model_config.json"
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


def scores(split: TranslationEvalSplit, ids: np.ndarray) -> dict[str, float]:
  """BLEU and chrF of the decoded rows ``ids`` [N, L] against the split's references."""
  return data.translation_scores(data.decode_ids(split.tokenizer, ids), split.references)


# ------------------------------------------------------------------------------ export


def export_model(model, params, tokenizer, path: str | os.PathLike) -> Path:
  """Writes params (flax msgpack), the model config (JSON) and the tokenizer to ``path``."""
  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  host_params = jax.tree.map(np.asarray, params)
  (path / PARAMS_FILENAME).write_bytes(flax.serialization.msgpack_serialize(host_params))
  description = {
      "config": dataclasses.asdict(model.config),
      "dtype": jnp.dtype(model.dtype).name,
  }
  (path / CONFIG_FILENAME).write_text(json.dumps(description, indent=2))
  data.save_tokenizer(tokenizer, path)
  return path


def load_model(path: str | os.PathLike):
  """(model, params, tokenizer) written by :func:`export_model` (``path``: the folder, or a
  training workdir holding it)."""
  path = Path(path)
  if (path / MODEL_DIRNAME).is_dir():
    path = path / MODEL_DIRNAME
  missing = [n for n in (PARAMS_FILENAME, CONFIG_FILENAME) if not (path / n).is_file()]
  if missing:
    raise FileNotFoundError(
        f"{path}: no trained translation model ({', '.join(missing)} missing); train one with "
        "python -m nearprox.training.train --config experiments/configs/multi30k.py"
    )
  description = json.loads((path / CONFIG_FILENAME).read_text())
  model = seq2seq.Seq2SeqTransformer(
      seq2seq.Seq2SeqConfig(**description["config"]), dtype=jnp.dtype(description["dtype"])
  )
  params = flax.serialization.msgpack_restore((path / PARAMS_FILENAME).read_bytes())
  return model, params, data.load_tokenizer(path)
