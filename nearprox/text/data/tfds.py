"""GLUE tasks from TensorFlow Datasets (``glue/sst2``, ``glue/cola``, ``glue/mrpc``, ``glue/rte``).

An optional path: TensorFlow and TFDS are not dependencies of nearprox (they are the
``tfds`` extra, ``pip install 'nearprox[tfds]'``) and are imported only when this loader
runs. TFDS downloads and prepares the data on first use (network needed), into
``data_dir`` or TFDS's default (``~/tensorflow_datasets``).

TFDS's ``glue/*`` features are ``idx``, ``label`` and ``sentence`` (single-sentence tasks)
or ``sentence1``/``sentence2`` (pair tasks); its class order matches
:data:`nearprox.text.data.TASKS` (RTE: entailment 0). The ``validation`` split is our ``dev``;
TFDS's GLUE ``test`` splits carry label -1 (unlabeled) and are refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from nearprox.text.data.tasks import DataError, Split, canonical_split, get_task

TFDS_NAMES = {"sst2": "glue/sst2", "cola": "glue/cola", "mrpc": "glue/mrpc", "rte": "glue/rte"}
_TEXT_FEATURES = {
    "sst2": ("sentence", None),
    "cola": ("sentence", None),
    "mrpc": ("sentence1", "sentence2"),
    "rte": ("sentence1", "sentence2"),
}
_TFDS_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def import_tfds():
  """``tensorflow_datasets``, or an ImportError that says which extra to install."""
  try:
    import tensorflow_datasets  # lazy: the optional extra
  except ImportError as error:
    raise ImportError(
        "loading GLUE from TFDS needs the optional extra 'tfds' (tensorflow and "
        "tensorflow-datasets): pip install 'nearprox[tfds]'. Without network access use "
        "GLUE TSV files (source='tsv') or the offline task 'tweets'."
    ) from error
  return tensorflow_datasets


def load_glue_tfds(
    task: str, split: str, data_dir: str | os.PathLike | None = None, download: bool = True
) -> Split:
  """Loads ``task``'s ``split`` ("train" or "dev") through TFDS."""
  if task not in TFDS_NAMES:
    get_task(task)  # a DataError listing the known tasks if the name is unknown
    raise DataError(f"task {task!r} has no TFDS source; TFDS tasks: {', '.join(TFDS_NAMES)}")
  split = canonical_split(split)
  tfds = import_tfds()
  name, tfds_split = TFDS_NAMES[task], _TFDS_SPLITS[split]
  # batch_size=-1: the whole split as one batch of tensors, converted to NumPy.
  examples = tfds.as_numpy(
      tfds.load(
          name,
          split=tfds_split,
          data_dir=None if data_dir is None else os.fspath(data_dir),
          batch_size=-1,
          download=download,
      )
  )
  return split_from_tfds_arrays(task, split, examples, source=f"tfds:{name}[{tfds_split}]")


def split_from_tfds_arrays(
    task: str, split: str, examples: Mapping[str, np.ndarray], source: str = "tfds"
) -> Split:
  """A :class:`Split` from TFDS's NumPy feature arrays (text as bytes, labels as ints)."""
  first, second = _TEXT_FEATURES[task]
  needed = [key for key in (first, second, "label") if key is not None]
  missing = [key for key in needed if key not in examples]
  if missing:
    raise DataError(f"{source}: missing feature(s) {missing}; found {sorted(examples)}")
  labels = np.asarray(examples["label"]).astype(np.int64)
  num_labels = get_task(task).num_labels
  if labels.size and labels.min() < 0:
    raise DataError(f"{source}: labels are -1 (an unlabeled split); use 'train' or 'dev'")
  if labels.size and labels.max() >= num_labels:
    raise DataError(f"{source}: label {labels.max()} outside [0, {num_labels})")
  return Split(
      task=get_task(task),
      name=canonical_split(split),
      text_a=_decode(examples[first]),
      text_b=_decode(examples[second]) if second is not None else None,
      labels=labels.astype(np.int32),
      source=source,
  )


def _decode(values) -> list[str]:
  return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values)]
