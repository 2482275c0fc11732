"""A joint subword vocabulary for translation, cached, and the pairs encoded as id arrays.

``subword_tokenizer(train, vocab_size)`` trains one byte-level BPE vocabulary (Sennrich et
al. 2016; byte-level as GPT-2, so every input has a tokenization and decoding inverts
encoding exactly) on the training split's source and target sentences together, with the
``tokenizers`` library. Special tokens take the first ids: pad 0, bos 1, eos 2, unk 3 (the
contract of :class:`nearprox.text.models.seq2seq.Seq2SeqConfig`; byte-level BPE never
emits unk). The trained tokenizer is stored as ``tokenizers`` JSON in
``<cache dir>/subwords/<key>.json``, the key a SHA-256 of everything the vocabulary depends
on: every training sentence (length-prefixed, both sides), the vocabulary size, the
training settings, the ``tokenizers`` version and a format number; a second call with the
same inputs loads it instead of retraining. The cache directory is the one of the encoded
classification data (:func:`nearprox.text.data.default_cache_dir`, ``$NEARPROX_CACHE_DIR``).
Training saves a copy beside the model (``save_tokenizer``), so decoding needs nothing else.

``encode_pairs`` makes the arrays a batch holds (ids int32, padded with 0):

| key | row | |
|---|---|---|
| ``source_ids`` [N, L] | x + [eos] | |
| ``target_input_ids`` [N, L] | [bos] + y | the decoder's input (teacher forcing) |
| ``target_output_ids`` [N, L] | y + [eos] | what the decoder predicts; 0 = no loss |

with L = ``max_length``. A longer sentence is cut to its first L − 1 subwords (the pair is
counted and the count logged).

References:
  Sennrich, Haddow & Birch, "Neural Machine Translation of Rare Words with Subword Units",
  ACL 2016, arXiv 1508.07909.
  Radford et al., "Language Models are Unsupervised Multitask Learners", 2019 (byte-level
  BPE).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nearprox.text.data.encoding import default_cache_dir
from nearprox.text.data.translation import ParallelSplit

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # in id order
TOKENIZER_FILENAME = "tokenizer.json"
ARRAY_KEYS = ("source_ids", "target_input_ids", "target_output_ids")
_CACHE_FORMAT = 1
_MIN_FREQUENCY = 2


def _new_tokenizer():
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers

  tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def train_subwords(texts: Sequence[str], vocab_size: int, *, min_frequency: int = _MIN_FREQUENCY):
  """A byte-level BPE ``tokenizers.Tokenizer`` of at most ``vocab_size`` entries on ``texts``."""
  from tokenizers import pre_tokenizers, trainers

  minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
  if not isinstance(vocab_size, (int, np.integer)) or vocab_size < minimum:
    raise ValueError(
        f"vocab_size must be an integer >= {minimum} (special tokens + the 256 byte symbols), "
        f"got {vocab_size!r}"
    )
  tokenizer = _new_tokenizer()
  trainer = trainers.BpeTrainer(
      vocab_size=int(vocab_size),
      min_frequency=min_frequency,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer, length=len(texts))
  for token_id, token in enumerate(SPECIAL_TOKENS):
    if tokenizer.token_to_id(token) != token_id:
      raise RuntimeError(f"special token {token} got id {tokenizer.token_to_id(token)}")
  return tokenizer


def subword_cache_key(texts: Sequence[str], vocab_size: int, min_frequency: int) -> str:
  """SHA-256 hex of everything :func:`train_subwords` on ``texts`` depends on."""
  try:
    version = importlib.metadata.version("tokenizers")
  except importlib.metadata.PackageNotFoundError:
    version = "absent"
  header = {
      "format": _CACHE_FORMAT,
      "model": "byte-level BPE",
      "special_tokens": SPECIAL_TOKENS,
      "vocab_size": int(vocab_size),
      "min_frequency": int(min_frequency),
      "tokenizers": version,
      "num_texts": len(texts),
  }
  digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
  for text in texts:
    data = text.encode("utf-8", "surrogatepass")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
  return digest.hexdigest()


def subword_tokenizer(
    train: ParallelSplit,
    vocab_size: int = 8000,
    *,
    min_frequency: int = _MIN_FREQUENCY,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
):
  """The joint vocabulary of ``train``'s sources and targets, from the cache or trained.

  ``cache_dir``: cache root (files in ``<cache_dir>/subwords/``), default
  :func:`nearprox.text.data.default_cache_dir`. An unreadable cache file is retrained and
  replaced.
  """
  texts = list(train.sources) + list(train.targets)
  path = None
  if use_cache:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = subword_cache_key(texts, vocab_size, min_frequency)
    path = root / "subwords" / f"{key}.json"
    if path.is_file():
      try:
        return load_tokenizer(path)
      except Exception as error:  # a damaged file: retrain and replace it
        logging.warning("subword cache %s unreadable (%s); retraining", path, error)
  tokenizer = train_subwords(texts, vocab_size, min_frequency=min_frequency)
  logging.info(
      "trained a %d-entry subword vocabulary on %d sentences",
      tokenizer.get_vocab_size(),
      len(texts),
  )
  if path is not None:
    save_tokenizer(tokenizer, path)
  return tokenizer


def save_tokenizer(tokenizer, path: str | os.PathLike) -> Path:
  """Writes ``tokenizer`` as ``tokenizers`` JSON (a folder gets ``tokenizer.json``), via a
  temporary file and a rename so a concurrent reader never sees a partial file."""
  path = Path(path)
  if path.is_dir():
    path = path / TOKENIZER_FILENAME
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(
      "w", dir=path.parent, prefix=path.stem, suffix=".tmp", delete=False, encoding="utf-8"
  ) as file:
    file.write(tokenizer.to_str())
  os.replace(file.name, path)
  return path


def load_tokenizer(path: str | os.PathLike):
  """A tokenizer saved by :func:`save_tokenizer` (a file, or a folder with tokenizer.json)."""
  from tokenizers import Tokenizer

  path = Path(path)
  if path.is_dir():
    path = path / TOKENIZER_FILENAME
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no saved subword tokenizer")
  tokenizer = Tokenizer.from_file(str(path))
  for token_id, token in enumerate(SPECIAL_TOKENS):
    if tokenizer.token_to_id(token) != token_id:
      raise ValueError(f"{path}: special token {token} must have id {token_id}")
  return tokenizer


def _pad_rows(rows: list[list[int]], max_length: int) -> np.ndarray:
  out = np.full((len(rows), max_length), PAD_ID, np.int32)
  for i, row in enumerate(rows):
    out[i, : len(row)] = row
  return out


def _subwords(tokenizer, sentences: Sequence[str]) -> list[list[int]]:
  return [e.ids for e in tokenizer.encode_batch(list(sentences), add_special_tokens=False)]


def _check_length(max_length) -> None:
  if not isinstance(max_length, (int, np.integer)) or max_length < 2:
    raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")


def encode_sources(tokenizer, sentences: Sequence[str], max_length: int) -> tuple[np.ndarray, int]:
  """(source ids [N, max_length]: x + [eos], x cut to max_length − 1 subwords, padded; the
  number of sentences cut). The caller says what was cut (the translate command logs it)."""
  _check_length(max_length)
  pieces = _subwords(tokenizer, sentences)
  cut = sum(len(p) > max_length - 1 for p in pieces)
  return _pad_rows([p[: max_length - 1] + [EOS_ID] for p in pieces], max_length), cut


def encode_pairs(
    tokenizer, split: ParallelSplit, max_length: int
) -> tuple[dict[str, np.ndarray], int]:
  """(the split's ``source_ids``, ``target_input_ids``, ``target_output_ids`` (module
  docstring), [N, max_length] int32 each; the number of pairs cut). A side longer than
  max_length − 1 subwords is cut to that many; the pairs cut are counted and logged."""
  _check_length(max_length)
  sources, targets = _subwords(tokenizer, split.sources), _subwords(tokenizer, split.targets)
  keep = max_length - 1
  cut = sum(len(s) > keep or len(t) > keep for s, t in zip(sources, targets))
  if cut:
    logging.warning(
        "%s split: cut %d of %d pairs to max_length = %d subwords (with eos/bos)",
        split.name,
        cut,
        len(split),
        max_length,
    )
  targets = [t[:keep] for t in targets]
  arrays = {
      "source_ids": _pad_rows([s[:keep] + [EOS_ID] for s in sources], max_length),
      "target_input_ids": _pad_rows([[BOS_ID] + t for t in targets], max_length),
      "target_output_ids": _pad_rows([t + [EOS_ID] for t in targets], max_length),
  }
  return arrays, cut


def decode_ids(tokenizer, ids) -> list[str]:
  """Detokenized sentences of id rows [N, L]: each row up to its first eos, without the
  special tokens (bos, pad)."""
  sentences = []
  for row in np.asarray(ids):
    row = [int(t) for t in row]
    if EOS_ID in row:
      row = row[: row.index(EOS_ID)]
    row = [t for t in row if t >= len(SPECIAL_TOKENS) or t == UNK_ID]
    sentences.append(tokenizer.decode(row, skip_special_tokens=False).strip())
  return sentences
