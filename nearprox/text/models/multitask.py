"""One shared BERT encoder with a classification head per task, for mixed-task batches.

``BertForMultiTaskClassification(config, heads=(("sst2", 2), ("mrpc", 2), ("tweets", 3)))``
runs the encoder and its pooler once on the whole batch, applies every task's head (a dense
layer on the pooled [CLS] state, as ``BertForSequenceClassification``'s) to the whole batch,
and keeps for example i the logits of its own task ``task_ids[i]``:

    logits_i = head_{t_i}(dropout(pooled_i)),  padded to C = max_t C_t with NO_CLASS.

Why every head sees the whole batch: the factored per-example gradients
(:mod:`nearprox.factored_grads`) intercept each dense layer's call and need the batch axis
first; gathering example i's head weights would hide the heads from them. Head t's output on
an example of another task gets no cotangent (it is not selected), so that example's
gradient of head t is exactly 0, in both the factored and the vmap per-example gradients.

Tasks with fewer classes than C get NO_CLASS (−1e9, finite) in the missing columns: softmax
gives them probability 0, so cross-entropy, its logit gradient (the iEF weights) and SMART's
symmetric KL are those of the task's own C_t classes (a finite constant, not −inf, so that
0·(log 0 − log 0) terms stay 0, not NaN). Scores and predictions use the first C_t columns.

Parameters: ``bert/...`` (the encoder, named as in every BERT of this package) and
``classifier/<task>/{kernel,bias}``; :func:`task_classifier` cuts out one task's
``BertForSequenceClassification`` (same encoder, that task's head), which
``save_pretrained`` exports as a Hugging Face directory.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from nearprox.text.models.bert import (
    BertForSequenceClassification,
    BertModel,
    SequenceClassifierOutput,
    _Layer,
)
from nearprox.text.models.dropout import ExampleDropout

NO_CLASS = -1e9  # the logit of a class the example's task does not have


def check_heads(heads) -> tuple[tuple[str, int], ...]:
  """``heads`` as a tuple of (task name, number of classes ≥ 2), names unique; ValueError."""
  heads = tuple((str(name), int(size)) for name, size in heads)
  names = [name for name, _ in heads]
  if len(heads) < 2:
    raise ValueError(f"a multi-task model needs at least two heads, got {names}")
  if len(set(names)) != len(names):
    raise ValueError(f"head names must be unique, got {names}")
  small = [name for name, size in heads if size < 2]
  if small:
    raise ValueError(f"every head needs at least 2 classes; {small} have fewer")
  return heads


class _TaskHeads(_Layer):
  """One dense layer per task on the pooled states [B, H] → logits [T, B, C] (padded)."""

  heads: tuple[tuple[str, int], ...] = ()

  @nn.compact
  def __call__(self, pooled):
    width = max(size for _, size in self.heads)
    out = []
    for name, size in self.heads:
      logits = self._dense(size, name)(pooled)
      out.append(jnp.pad(logits, ((0, 0), (0, width - size)), constant_values=NO_CLASS))
    return jnp.stack(out)


class BertForMultiTaskClassification(_Layer):
  """logits [B, max C_t]: example i's own task's head (module docstring).

  ``heads``: ((task name, number of classes), ...) in task-id order: ``task_ids[i] = t``
  selects ``heads[t]``. ``task_ids`` (int [B]) is required.
  """

  heads: tuple[tuple[str, int], ...] = ()
  takes_task_ids = True  # bert_logits_fn passes batch["task_ids"]

  @nn.compact
  def __call__(
      self,
      input_ids,
      attention_mask=None,
      token_type_ids=None,
      *,
      task_ids=None,
      deterministic: bool = True,
      dropout_keys=None,
      word_embeddings_delta=None,
  ) -> SequenceClassifierOutput:
    cfg = self.config
    heads = check_heads(self.heads)
    if task_ids is None or task_ids.shape != input_ids.shape[:1]:
      raise ValueError(
          "BertForMultiTaskClassification needs task_ids [B] (each example's task), got "
          f"{None if task_ids is None else task_ids.shape} for input_ids {input_ids.shape}"
      )
    outputs = BertModel(cfg, self.dtype, self.param_dtype, name="bert")(
        input_ids,
        attention_mask,
        token_type_ids,
        deterministic=deterministic,
        dropout_keys=dropout_keys,
        word_embeddings_delta=word_embeddings_delta,
    )
    rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout_prob
    pooled = ExampleDropout(rate)(outputs.pooler_output, dropout_keys, deterministic)
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    every_head = _TaskHeads(**kw, heads=heads, name="classifier")(pooled)  # [T, B, C]
    rows = jnp.arange(input_ids.shape[0])
    return SequenceClassifierOutput(logits=every_head[task_ids.astype(jnp.int32), rows])


def task_classifier(model: BertForMultiTaskClassification, params, task: str):
  """(``BertForSequenceClassification`` with ``task``'s classes, its params): the shared
  encoder and that task's head, e.g. for ``save_pretrained``."""
  names = [name for name, _ in model.heads]
  if task not in names:
    raise ValueError(f"unknown head {task!r}; the model has {names}")
  size = dict(model.heads)[task]
  config = dataclasses.replace(model.config, num_labels=size)
  single = BertForSequenceClassification(config, dtype=model.dtype, param_dtype=model.param_dtype)
  return single, {"bert": params["bert"], "classifier": params["classifier"][task]}
