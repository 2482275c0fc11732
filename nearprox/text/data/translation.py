"""Parallel text for translation: a folder of ``{split}.{lang}`` files (gzip or plain).

    from nearprox.text import data

    train = data.load_translation("train", "../shared/data/multi30k", direction="en-de")
    train.sources[0], train.targets[0]   # line n of train.en and of train.de

Multi30k task 1 (Elliott et al. 2016; WMT16 multimodal task 1) ships ``train``, ``val`` and
``test_2016_flickr`` files for English and German; :data:`SPLIT_FILES` maps the project's
split names (train / dev / test) to those stems. Any parallel corpus in the same layout
(WMT, a user's own) loads the same way: line n of ``{split}.{source}`` translates line n
of ``{split}.{target}``; a file may be gzip-compressed (``{split}.{lang}.gz``).

Bad input: a missing file or folder, and files of one split with different line counts,
raise :class:`~nearprox.text.data.DataError` naming both files and both counts. Pairs with
an empty or whitespace-only side are dropped, counted (``ParallelSplit.dropped``) and
logged. Lines are stripped of surrounding whitespace; nothing else is changed (raw, cased
text: BLEU is computed on detokenized output against these references).

References:
  Elliott, Frank, Sima'an & Specia, "Multi30K: Multilingual English-German Image
  Descriptions", Workshop on Vision and Language 2016, arXiv 1605.00459.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nearprox.text.data.tasks import DataError

MULTI30K_DIR_ENV = "NEARPROX_MULTI30K_DIR"
DIRECTIONS = ("en-de", "de-en")
# The project's split names → Multi30k's file stems.
SPLIT_FILES = {"train": "train", "dev": "val", "test": "test_2016_flickr"}
_SPLIT_ALIASES = {"validation": "dev", "val": "dev", "test_2016_flickr": "test"}


@dataclasses.dataclass(frozen=True)
class ParallelSplit:
  """One split of a parallel corpus, in memory: ``targets[n]`` translates ``sources[n]``.

  Attributes:
    name: "train", "dev" or "test".
    sources: source sentences (stripped, none empty).
    targets: target sentences, aligned with ``sources``.
    source_path, target_path: the files read, for messages.
    dropped: pairs dropped because a side was empty or whitespace only.
  """

  name: str
  sources: list[str]
  targets: list[str]
  source_path: str = ""
  target_path: str = ""
  dropped: int = 0

  def __post_init__(self):
    if len(self.sources) != len(self.targets):
      raise ValueError(f"{len(self.sources)} sources but {len(self.targets)} targets")

  def __len__(self) -> int:
    return len(self.sources)

  def select(self, indices: Sequence[int] | np.ndarray) -> ParallelSplit:
    """The pairs at ``indices``, in that order."""
    return dataclasses.replace(
        self,
        sources=[self.sources[i] for i in indices],
        targets=[self.targets[i] for i in indices],
    )


def parse_direction(direction: str) -> tuple[str, str]:
  """``"en-de"`` → (``"en"``, ``"de"``); DataError for anything not ``src-tgt``."""
  parts = direction.split("-") if isinstance(direction, str) else []
  if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
    raise DataError(
        f"translation direction must be 'source-target' with two different language codes "
        f"(e.g. {', '.join(DIRECTIONS)}), got {direction!r}"
    )
  return parts[0], parts[1]


def read_lines(path: str | os.PathLike) -> list[str]:
  """The lines of a UTF-8 text file, gzip-compressed (``.gz``) or plain, without line ends."""
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rt", encoding="utf-8", newline="") as file:
      return [line.rstrip("\r\n") for line in file]
  except (OSError, EOFError, UnicodeDecodeError) as error:
    raise DataError(f"{path}: cannot read as UTF-8 text ({error})") from error


def find_split_file(folder: str | os.PathLike, stem: str, lang: str) -> Path:
  """``folder/{stem}.{lang}`` or ``folder/{stem}.{lang}.gz``; DataError listing what is there."""
  folder = Path(folder)
  if not folder.is_dir():
    raise DataError(f"{folder}: translation data folder not found")
  candidates = [folder / f"{stem}.{lang}", folder / f"{stem}.{lang}.gz"]
  for path in candidates:
    if path.is_file():
      return path
  present = sorted(p.name for p in folder.iterdir())
  raise DataError(
      f"{folder}: no {candidates[0].name} or {candidates[1].name} (files there: "
      f"{', '.join(present[:20]) or 'none'})"
  )


def read_parallel(
    source_path: str | os.PathLike, target_path: str | os.PathLike, name: str = "train"
) -> ParallelSplit:
  """The aligned lines of two files as a :class:`ParallelSplit`.

  DataError if the line counts differ (naming both files and counts) or no pair is left;
  pairs with an empty or whitespace-only side are dropped, counted and logged.
  """
  sources, targets = read_lines(source_path), read_lines(target_path)
  if len(sources) != len(targets):
    raise DataError(
        f"parallel files differ in length: {source_path} has {len(sources)} lines, "
        f"{target_path} has {len(targets)}"
    )
  kept_sources, kept_targets, empty_lines = [], [], []
  for line, (source, target) in enumerate(zip(sources, targets), start=1):
    source, target = source.strip(), target.strip()
    if source and target:
      kept_sources.append(source)
      kept_targets.append(target)
    else:
      empty_lines.append(line)
  if empty_lines:
    logging.warning(
        "%s / %s: dropped %d of %d pairs with an empty side (lines %s%s)",
        source_path,
        target_path,
        len(empty_lines),
        len(sources),
        ", ".join(map(str, empty_lines[:10])),
        ", ..." if len(empty_lines) > 10 else "",
    )
  if not kept_sources:
    raise DataError(f"{source_path} / {target_path}: no non-empty sentence pairs")
  return ParallelSplit(
      name, kept_sources, kept_targets, str(source_path), str(target_path), len(empty_lines)
  )


def translation_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """``data_dir``, else ``$NEARPROX_MULTI30K_DIR``; DataError if neither is set."""
  chosen = data_dir if data_dir is not None else os.environ.get(MULTI30K_DIR_ENV)
  if not chosen:
    raise DataError(
        f"translation data: pass data_dir (a folder of {{split}}.{{lang}}[.gz] files) or set "
        f"${MULTI30K_DIR_ENV}"
    )
  return Path(chosen)


def canonical_translation_split(split: str) -> str:
  """ "train", "dev" or "test" ("val"/"validation" → "dev", "test_2016_flickr" → "test")."""
  name = _SPLIT_ALIASES.get(split, split)
  if name not in SPLIT_FILES:
    raise DataError(
        f"unknown translation split {split!r}; expected one of {tuple(SPLIT_FILES)} "
        f"(or {', '.join(_SPLIT_ALIASES)})"
    )
  return name


def load_translation(
    split: str, data_dir: str | os.PathLike | None = None, direction: str = "en-de"
) -> ParallelSplit:
  """One split of the parallel corpus in ``data_dir`` (default ``$NEARPROX_MULTI30K_DIR``).

  ``split``: "train", "dev" (file stem ``val``) or "test" (``test_2016_flickr``);
  ``direction``: "en-de" reads ``{stem}.en`` as sources and ``{stem}.de`` as targets.
  """
  name = canonical_translation_split(split)
  source_lang, target_lang = parse_direction(direction)
  folder = translation_dir(data_dir)
  stem = SPLIT_FILES[name]
  return read_parallel(
      find_split_file(folder, stem, source_lang), find_split_file(folder, stem, target_lang), name
  )
