"""What the training loop does differently per kind of task: model head, splits, evaluation.

:mod:`nearprox.training.train` is task-agnostic; everything that depends on
``data.get_task(config.task).kind`` lives here:

| | classification (GLUE, tweets) | qa (SQuAD) |
|---|---|---|
| model | ``BertForSequenceClassification`` | ``BertForQuestionAnswering`` |
| labels in a batch | ``labels`` | ``start_positions``, ``end_positions`` |
| a row | one example | one window of a question (``data.encode_squad``) |
| an evaluation split | its encoded arrays | :class:`QAEvalSplit` (questions + windows) |
| ``max_eval_examples`` | examples | questions, with all their windows |
| ``holdout_examples`` | training examples | training questions |
| ``label_noise`` | flips labels | rejected (no classes) |
| metrics | ``task.metrics`` of the logits | SQuAD F1 / exact match of the answer texts |

Translation (task kind "translation": Multi30k): :mod:`nearprox.training.translation_io`
(an encoder–decoder trained from scratch, sentence pairs as rows, BLEU/chrF of decoded
output). Several classification tasks on one encoder (``config.task = "multitask"``, a
:class:`~nearprox.text.data.MultiTask`): :mod:`nearprox.training.multitask_io` (a head per
task, mixed batches with ``task_ids``, per-task scores and their mean).

Evaluation puts every row's logits back at its row (``batch["index"]``), so the padded rows
of the last batch and the split of a batch over devices and hosts never change the scores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from nearprox.text import data, models, qa
from nearprox.text.data.encoding import TOKEN_KEYS
from nearprox.training import multitask_io, parallel, translation_io

INPUT_KEYS = TOKEN_KEYS + ("labels",)  # classification
QA_INPUT_KEYS = TOKEN_KEYS + ("start_positions", "end_positions")
HOLDOUT_SEED = 20261129  # fixed: every tuning run holds out the same training examples


@dataclasses.dataclass(frozen=True)
class QAEvalSplit:
  """An evaluation split of a QA task: the questions and their windows (F rows).

  ``arrays()`` are what :func:`nearprox.text.data.batches` iterates; the questions (answer
  texts) and the windows' offsets stay on the host for
  :func:`nearprox.text.qa.postprocess_predictions`.
  """

  questions: data.SquadSplit
  features: data.SquadFeatures

  def arrays(self) -> dict[str, np.ndarray]:
    return self.features.arrays()


def get_task(config) -> data.Task | data.MultiTask:
  """``config.task``'s :class:`~nearprox.text.data.Task`, or for "multitask" the
  :class:`~nearprox.text.data.MultiTask` of ``config.tasks`` (DataError for unknown names)."""
  if config.task == data.MULTITASK:
    return multitask_io.get_task(config)
  return data.get_task(config.task)


def input_keys(task: data.Task | data.MultiTask) -> tuple[str, ...]:
  """The batch entries the loss reads: tokens and the task's labels (and task ids)."""
  if isinstance(task, data.MultiTask):
    return multitask_io.INPUT_KEYS
  if task.kind == "translation":
    return translation_io.INPUT_KEYS
  return QA_INPUT_KEYS if task.kind == "qa" else INPUT_KEYS


def sequence_keys(task: data.Task) -> tuple[str, ...]:
  """The batch entries with a token axis (what length buckets cut)."""
  return translation_io.INPUT_KEYS if task.kind == "translation" else TOKEN_KEYS


def length_boundaries(config) -> tuple[int, ...]:
  """The training batches' lengths: ``config.length_buckets`` below ``config.max_length``,
  then ``config.max_length`` (the padded length of every row); () without buckets."""
  if not config.length_buckets:
    return ()
  below = [int(b) for b in config.length_buckets if b < config.max_length]
  return tuple(below) + (config.max_length,)


def eval_keys(task: data.Task | data.MultiTask) -> tuple[str, ...]:
  """The batch entries the classification / QA eval step reads (no labels)."""
  return multitask_io.EVAL_KEYS if isinstance(task, data.MultiTask) else TOKEN_KEYS


def logits_fn(task: data.Task | data.MultiTask, model, deterministic: bool):
  """The model's ``logits_fn(params, batch, delta, rng)`` (:mod:`nearprox.text.objectives`)."""
  if task.kind == "translation":
    return translation_io.logits_fn(model, deterministic)
  return models.bert_logits_fn(model, deterministic=deterministic)


def num_rows(arrays: Mapping[str, np.ndarray]) -> int:
  """Rows of a split's arrays (examples; windows for QA; sentence pairs)."""
  return len(next(iter(arrays.values())))


def task_splits(task: data.Task | data.MultiTask) -> tuple[str, ...]:
  """The reported splits ``task`` has: dev, and test where it is labelled (multi-task: where
  any of its tasks' is)."""
  tasks = task.tasks if isinstance(task, data.MultiTask) else (task,)
  return ("dev", "test") if any(t.has_test for t in tasks) else ("dev",)


def reported_splits(config, task: data.Task | data.MultiTask) -> tuple[str, ...]:
  """The reported splits a run loads and scores (:func:`task_splits` order): all the task
  has, or only those of ``config.eval_splits`` when it names some (a tuning run scored on
  dev loads no test split, so no test number is computed, let alone kept, while tuning);
  none with ``config.holdout_examples`` (the run scores held-out training examples)."""
  if config.holdout_examples:
    return ()
  chosen = config.get("eval_splits") or ()
  return tuple(name for name in task_splits(task) if not chosen or name in chosen)


def check_config(config, task: data.Task) -> None:
  """ValueError for settings the task cannot use (cheap: before any model or data loading)."""
  if task.kind == "translation":  # first: a config without its fields fails here, clearly
    translation_io.check_config(config)
  if isinstance(task, data.MultiTask):
    multitask_io.check_config(config)
  chosen = tuple(config.get("eval_splits") or ())
  if chosen:
    available = task_splits(task)
    if "dev" not in chosen or not set(chosen) <= set(available):
      raise ValueError(
          f"config.eval_splits names the reported splits to load: 'dev' (evaluated during "
          f"training) and optionally others of {available} (task {task.name!r}), got {chosen}"
      )
    if config.holdout_examples:
      raise ValueError(
          "config.eval_splits chooses among the reported splits, which a run with "
          f"config.holdout_examples = {config.holdout_examples} does not load (it scores "
          "held-out training examples): leave it empty"
      )
  if not 0.0 <= config.label_noise <= 1.0:
    raise ValueError(f"config.label_noise must lie in [0, 1], got {config.label_noise}")
  if config.length_buckets:
    data.batching.check_boundaries(config.length_buckets)
  if task.kind in ("qa", "translation") and config.label_noise:
    raise ValueError(
        f"config.label_noise flips class labels; task {task.name!r} is extractive QA (answer "
        f"spans, no classes): set it to 0, got {config.label_noise}"
    )


# ------------------------------------------------------------------------------ model


def create_model(config, num_labels: int, rng):
  """(model, params, tokenizer) for ``config.task``: a sequence classifier with
  ``num_labels`` outputs, or for QA tasks a span-QA head (``num_labels`` unused).

  ``config.model.name == "tiny"``: a random 2-layer BERT with MiniLM's tokenizer; otherwise
  :func:`nearprox.text.models.load_pretrained` (a new head is initialized from ``rng``).
  """
  if config.task == data.MULTITASK:
    return multitask_io.create_model(config, rng)
  kind = data.get_task(config.task).kind
  if kind == "translation":
    return translation_io.create_model(config, rng)
  is_qa = kind == "qa"
  dtype = jnp.dtype(config.model.dtype)
  if config.model.name == "tiny":
    tokenizer = models.load_tokenizer(models.minilm_dir())
    bert_config = models.tiny_config(
        vocab_size=tokenizer.vocab_size,
        num_labels=2 if is_qa else num_labels,  # HF sizes the QA head by num_labels = 2
        max_position_embeddings=max(32, config.max_length),
    )
    head = models.BertForQuestionAnswering if is_qa else models.BertForSequenceClassification
    model = head(bert_config, dtype=dtype)
    return model, models.init_params(model, rng, 2, config.max_length), tokenizer
  if is_qa:
    return models.load_pretrained(
        config.model.name, head="question_answering", dtype=dtype, rng=rng
    )
  return models.load_pretrained(config.model.name, num_labels=num_labels, dtype=dtype, rng=rng)


# ------------------------------------------------------------------------------ splits


def load_splits(config, tokenizer) -> dict[str, Mapping[str, np.ndarray] | QAEvalSplit]:
  """The task's splits, "train" first: encoded arrays, and for QA evaluation splits a
  :class:`QAEvalSplit`.

  Classification: train, dev and (tasks with a labelled test split) test, and for tweets
  also ``test_low_confidence``: test examples whose annotator confidence is below
  ``config.low_confidence_below`` (when > 0). QA: train and dev windows of
  ``config.max_length`` tokens with ``config.doc_stride`` shared context tokens, questions cut
  to ``config.max_question_length`` tokens.
  ``config.max_eval_examples > 0`` evaluates a seeded subset of that many examples
  (questions for QA).

  With ``config.holdout_examples = N > 0`` (tuning runs) the only evaluation split is
  ``holdout``: N training examples (QA: questions, which may share a paragraph with
  training questions) drawn with a fixed seed (the same for every run seed, so tuning
  trials are compared on the same examples), removed from train before any label noise;
  dev and test are not loaded, so tuning never sees a reported split. ``config.eval_splits``
  (a run tuned on dev, :func:`reported_splits`): only those reported splits are loaded.
  """
  task = get_task(config)
  check_config(config, task)
  reported = reported_splits(config, task)
  if config.task == data.MULTITASK:
    return multitask_io.load_splits(config, tokenizer, reported)
  if task.kind == "qa":
    return _qa_splits(config, tokenizer)
  if task.kind == "translation":
    return translation_io.load_splits(config, tokenizer, holdout_indices, reported)
  names = ("train", *reported)
  encoded = {}
  for name in names:
    split = data.load_task(
        config.task, name, config.data_dir, source=config.source, seed=config.seed
    )
    arrays = data.encode(split, tokenizer, config.max_length).arrays()
    if name == "test" and config.low_confidence_below > 0 and "confidence" in split.extra:
      low = split.extra["confidence"] < config.low_confidence_below  # NaN (unknown) excluded
      encoded["test_low_confidence"] = {k: v[low] for k, v in arrays.items()}
    if name == "train" and config.holdout_examples:
      arrays, encoded["holdout"] = split_holdout(arrays, config.holdout_examples)
    if name == "train" and config.label_noise:
      arrays["labels"] = flip_labels(
          arrays["labels"], config.label_noise, task.num_labels, config.seed
      )
    keep = (
        None
        if name == "train"
        else data.eval_subset(len(arrays["labels"]), config.max_eval_examples, config.seed)
    )
    if keep is not None:
      arrays = {k: v[keep] for k, v in arrays.items()}
    encoded[name] = arrays
  return encoded


def _qa_splits(config, tokenizer) -> dict[str, Mapping[str, np.ndarray] | QAEvalSplit]:
  def windows(questions):
    return data.encode_squad(
        questions,
        tokenizer,
        config.max_length,
        config.doc_stride,
        max_question_length=config.max_question_length,
    )

  train = data.load_task(config.task, "train", config.data_dir, source=config.source)
  evaluated = {}
  if config.holdout_examples:
    rest, held = holdout_indices(len(train), config.holdout_examples)
    train, held = train.select(rest), train.select(held)
    evaluated["holdout"] = QAEvalSplit(held, windows(held))
  else:
    dev = data.load_task(config.task, "dev", config.data_dir, source=config.source)
    keep = data.eval_subset(len(dev), config.max_eval_examples, config.seed)
    if keep is not None:
      dev = dev.select(keep)
    evaluated["dev"] = QAEvalSplit(dev, windows(dev))
  return {"train": windows(train).arrays(), **evaluated}


def flip_labels(labels: np.ndarray, fraction: float, num_labels: int, seed: int) -> np.ndarray:
  """Gives round(fraction·N) seeded examples a different, uniformly drawn label."""
  rng = np.random.default_rng([seed, 7919])
  flipped = rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)
  labels = labels.copy()
  labels[flipped] = (labels[flipped] + rng.integers(1, num_labels, len(flipped))) % num_labels
  return labels


def holdout_indices(total: int, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """(rest, held out): sorted indices, ``num_examples`` of ``total`` drawn with HOLDOUT_SEED."""
  if not 0 < num_examples < total:
    raise ValueError(
        f"config.holdout_examples must lie in (0, {total}) for this training split, "
        f"got {num_examples}"
    )
  order = np.random.default_rng(HOLDOUT_SEED).permutation(total)
  return np.sort(order[num_examples:]), np.sort(order[:num_examples])


def split_holdout(arrays: dict[str, np.ndarray], num_examples: int):
  """(rest of train, held-out examples): ``num_examples`` rows drawn with HOLDOUT_SEED."""
  rest, held = holdout_indices(num_rows(arrays), num_examples)
  return {k: v[rest] for k, v in arrays.items()}, {k: v[held] for k, v in arrays.items()}


# ------------------------------------------------------------------------------ evaluation


def predict(runner, device_state, arrays: Mapping[str, np.ndarray], batch_size: int) -> np.ndarray:
  """The eval step's output for every row of ``arrays``, in row order ([N, ...]).

  Each host evaluates its block of every batch; the rows come back by ``batch["index"]``,
  the padded copies of the last batch (``mask == 0``) dropped.
  """
  outputs, indices, masks = [], [], []
  for batch in data.batches(arrays, batch_size, shuffle=False, **parallel.host_shard()):
    outputs.append(runner.eval(device_state, batch))
    indices.append(batch["index"])
    masks.append(batch["mask"])
  outputs, indices, masks = parallel.gather_from_hosts(
      (np.concatenate(outputs), np.concatenate(indices), np.concatenate(masks))
  )
  real = masks > 0
  rows = np.empty((num_rows(arrays),) + outputs.shape[1:], outputs.dtype)
  seen = np.zeros(len(rows), bool)
  rows[indices[real]] = outputs[real]
  seen[indices[real]] = True
  if not seen.all():
    raise RuntimeError(f"evaluation missed {int(np.sum(~seen))} of {len(rows)} rows")
  return rows


def evaluate(runner, device_state, split, task: data.Task | data.MultiTask, batch_size: int):
  """(the task's metrics, the number of rows predicted as each class) on one split.

  Multi-task (``split`` a mapping task name → arrays): each task's metrics on its rows, scored
  on its own classes (the first C_t logits), as ``"<task>/<metric>"`` with ``"mean"``
  (:meth:`~nearprox.text.data.MultiTask.scores`); the counts per task name.

  Translation: BLEU and chrF of the decoded sentences (``translation_io.scores``); no counts.

  A single non-zero count is a classifier that collapsed to one class. QA (``split`` a
  :class:`QAEvalSplit`): the best span over each question's windows, scored against its
  gold answers (:mod:`nearprox.text.qa`: ``f1`` and ``exact_match`` in [0, 1]); no counts.
  """
  if isinstance(task, data.MultiTask):
    by_task, counts = {}, {}
    for one in (t for t in task.tasks if t.name in split):
      arrays = split[one.name]
      logits = predict(runner, device_state, arrays, batch_size)[:, : one.num_labels]
      by_task[one.name] = one.metrics(arrays["labels"], logits)
      predicted = np.bincount(np.argmax(logits, axis=-1), minlength=one.num_labels)
      counts[one.name] = [int(c) for c in predicted]
    return task.scores(by_task), counts
  if task.kind == "translation":  # split: a TranslationEvalSplit; the eval step decodes
    ids = predict(runner, device_state, split.arrays(), batch_size)
    return translation_io.scores(split, ids), []
  if task.kind == "qa":
    logits = predict(runner, device_state, split.arrays(), batch_size)  # [F, T, 2]
    predictions = qa.postprocess_predictions(
        split.questions, split.features, logits[..., 0], logits[..., 1]
    )
    scores = qa.evaluate_predictions(split.questions, predictions)
    return {name: scores[name] for name in task.metric_names}, []
  logits = predict(runner, device_state, split, batch_size)
  counts = (
      np.bincount(np.argmax(logits, axis=-1), minlength=task.num_labels)
      if logits.shape[-1] > 1
      else []
  )
  return task.metrics(split["labels"], logits), [int(c) for c in counts]
