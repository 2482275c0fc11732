"""Text models and objectives for the proximal step (the ``models`` extra).

* :mod:`nearprox.text.models`: a Flax BERT that loads and saves Hugging Face checkpoints, and
  ``bert_logits_fn``, the adapter the objectives call.
* :mod:`nearprox.text.data`: GLUE TSVs, TFDS GLUE (optional), the offline tweets; tokenization
  and fixed-shape batches.
* :mod:`nearprox.text.objectives`: per-example task losses and adversarial perturbations
  (FGM, PGD, SMART) of the word embeddings.
* :mod:`nearprox.text.robustness`: accuracy under an embedding-space PGD attack.
"""
