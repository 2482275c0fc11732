"""Text models and objectives for the proximal step (the ``models`` extra).

* :mod:`nearprox.text.models`: a Flax BERT that loads and saves Hugging Face checkpoints, and
  ``bert_logits_fn``, the adapter the objectives call; the encoder–decoder Transformer for
  translation (``Seq2SeqTransformer``, ``seq2seq_logits_fn``).
* :mod:`nearprox.text.decoding`: greedy decoding and beam search under ``jit``.
* :mod:`nearprox.text.data`: GLUE TSVs, TFDS GLUE (optional), the offline tweets, SQuAD;
  tokenization and fixed-shape batches.
* :mod:`nearprox.text.losses`: per-example task losses, their iEF weights, SMART's divergence.
* :mod:`nearprox.text.objectives`: the per-example training loss with adversarial
  perturbations (FGM, PGD, SMART) of the word embeddings.
* :mod:`nearprox.text.qa`: SQuAD post-processing and the official exact match / F1.
* :mod:`nearprox.text.robustness`: accuracy under an embedding-space PGD attack.
"""
