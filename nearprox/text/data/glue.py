"""GLUE tasks (SST-2, CoLA, MRPC, RTE) from directories in the original GLUE TSV layout.

A GLUE directory holds one folder per task with ``train.tsv`` and ``dev.tsv`` (the GLUE
``test.tsv`` files are unlabeled and are not loaded here):

| task | folder | header (columns used in *italics*) | labels |
|---|---|---|---|
| sst2 | SST-2 | *sentence*, *label* | 0 / 1 |
| cola | CoLA | none; fields: source, *label*, original label, *sentence* | 0 / 1 |
| mrpc | MRPC | *Quality*, #1 ID, #2 ID, *#1 String*, *#2 String* (UTF-8 BOM first) | 0 / 1 |
| rte | RTE | index, *sentence1*, *sentence2*, *label* | entailment / not_entailment |

The files are tab-separated with **no quoting**: sentences contain ``"`` characters that a
CSV reader would take for quotes, so they are read with ``csv.QUOTE_NONE``; every line is
one example. Header columns are found by name (any order; extra columns are ignored), and
every line must have as many fields as the header. Any deviation raises
:class:`~nearprox.text.data.DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from pathlib import Path

import numpy as np

from nearprox.text.data.tasks import DataError, Split, canonical_split, get_task, located

GLUE_DIR_ENV = "NEARPROX_GLUE_DIR"


@dataclasses.dataclass(frozen=True)
class _Layout:
  folder: str
  columns: tuple[str, ...]  # the header (or, without one, the fields' names)
  has_header: bool
  text_a: str
  text_b: str | None
  label: str
  label_values: dict[str, int]


_BINARY = {"0": 0, "1": 1}

LAYOUTS = {
    "sst2": _Layout("SST-2", ("sentence", "label"), True, "sentence", None, "label", _BINARY),
    "cola": _Layout(
        "CoLA",
        ("source", "label", "original_label", "sentence"),
        False,
        "sentence",
        None,
        "label",
        _BINARY,
    ),
    "mrpc": _Layout(
        "MRPC",
        ("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"),
        True,
        "#1 String",
        "#2 String",
        "Quality",
        _BINARY,
    ),
    "rte": _Layout(
        "RTE",
        ("index", "sentence1", "sentence2", "label"),
        True,
        "sentence1",
        "sentence2",
        "label",
        {"entailment": 0, "not_entailment": 1},
    ),
}


def glue_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
  """``data_dir``, else ``$NEARPROX_GLUE_DIR``, else None."""
  if data_dir is not None:
    return Path(data_dir)
  from_env = os.environ.get(GLUE_DIR_ENV)
  return Path(from_env) if from_env else None


def glue_path(task: str, split: str, data_dir: str | os.PathLike | None = None) -> Path:
  """The TSV file of ``task``/``split``.

  ``data_dir`` may be the GLUE root (containing ``SST-2/``, ``CoLA/``, ...) or the task's
  own folder; default ``$NEARPROX_GLUE_DIR``.
  """
  layout = _layout(task)
  split = canonical_split(split)
  if split == "test":
    raise DataError(f"GLUE {task} test labels are not public; use split 'train' or 'dev'")
  root = glue_dir(data_dir)
  if root is None:
    raise DataError(
        f"no GLUE directory for task {task!r}: pass data_dir=, set "
        f"${GLUE_DIR_ENV}, or use source='tfds'"
    )
  for candidate in (root / layout.folder / f"{split}.tsv", root / f"{split}.tsv"):
    if candidate.is_file():
      return candidate
  raise DataError(f"{root}: no {layout.folder}/{split}.tsv (nor {split}.tsv) for task " f"{task!r}")


def load_glue_tsv(task: str, split: str, data_dir: str | os.PathLike | None = None) -> Split:
  """Loads ``task``'s ``split`` ("train" or "dev") from a GLUE directory."""
  return read_glue_tsv(glue_path(task, split, data_dir), task, canonical_split(split))


def read_glue_tsv(path: str | os.PathLike, task: str, split: str = "dev") -> Split:
  """Parses one GLUE TSV file of ``task`` (layout in the module docstring)."""
  path = Path(path)
  layout = _layout(task)
  rows = _read_tsv_rows(path)
  if not rows:
    raise located(path, 1, "empty file")
  if layout.has_header:
    header_line, header = rows[0]
    header = [name.strip() for name in header]
    missing = [
        name
        for name in (layout.text_a, layout.text_b, layout.label)
        if name is not None and name not in header
    ]
    if missing:
      raise located(
          path,
          header_line,
          f"missing column(s) {missing} for task {task!r}; "
          f"header is {header}, expected {list(layout.columns)}",
      )
    rows = rows[1:]
  else:
    header = list(layout.columns)
  index = {name: header.index(name) for name in header}

  text_a, text_b, labels = [], [], []
  for line, fields in rows:
    if len(fields) != len(header):
      raise located(
          path,
          line,
          f"expected {len(header)} tab-separated fields "
          f"({', '.join(header)}), found {len(fields)}",
      )
    raw_label = fields[index[layout.label]].strip()
    if raw_label not in layout.label_values:
      raise located(
          path,
          line,
          f"bad label {raw_label!r} for task {task!r}; expected one "
          f"of {sorted(layout.label_values)}",
      )
    labels.append(layout.label_values[raw_label])
    text_a.append(fields[index[layout.text_a]])
    if layout.text_b is not None:
      text_b.append(fields[index[layout.text_b]])
  if not labels:
    raise located(path, 2, "no examples after the header")
  return Split(
      task=get_task(task),
      name=split,
      text_a=text_a,
      text_b=text_b if layout.text_b is not None else None,
      labels=np.asarray(labels, np.int32),
      source=str(path),
  )


def _layout(task: str) -> _Layout:
  if task not in LAYOUTS:
    get_task(task)  # a DataError listing the known tasks if the name is unknown
    raise DataError(f"task {task!r} is not a GLUE task; GLUE tasks: {', '.join(LAYOUTS)}")
  return LAYOUTS[task]


def _read_tsv_rows(path: Path) -> list[tuple[int, list[str]]]:
  """(1-based line number, fields) of every non-empty line; strict UTF-8, BOM dropped."""
  try:
    raw = path.read_bytes()
  except OSError as error:
    raise DataError(f"{path}: cannot read: {error.strerror or error}") from error
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as error:
    line = raw[: error.start].count(b"\n") + 1
    raise located(path, line, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None
  reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
  rows = []
  try:
    for fields in reader:
      if fields:  # blank lines (e.g. a trailing empty line) carry no example
        rows.append((reader.line_num, fields))
  except csv.Error as error:
    raise located(path, reader.line_num, f"unreadable TSV line: {error}") from None
  return rows
