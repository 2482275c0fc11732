"""Multi30k English→German: an encoder–decoder Transformer trained from scratch, BLEU.

    python -m nearprox.training.train --config experiments/configs/multi30k.py --workdir runs/mt
    python -m nearprox.training.train --config experiments/configs/multi30k.py \
        --workdir runs/mt_prox --config.optimizer.name=proximal_sgd \
        --config.optimizer.learning_rate=0.1 --config.direction=de-en
    python -m nearprox.training.translate --workdir runs/mt --input in.en --output out.de

``data_dir``: a folder of ``{train,val,test_2016_flickr}.{en,de}[.gz]`` (Multi30k task 1,
raw text), default ``$NEARPROX_MULTI30K_DIR`` or ``../shared/data/multi30k``. The joint
subword vocabulary (``vocab_size``) is trained on the training split and cached; the model
config, the tokenizer and the training config are written to ``workdir/translation_model``
when training starts, the trained params when it ends (the translate command reads the
latest checkpoint of a training that has not ended). Dev BLEU (greedy decoding) is logged
every ``eval_every`` steps and after the last step (``dev/bleu_greedy``); ``report.json``
holds dev and test_2016_flickr BLEU and chrF of beam search (``beam_size``,
``length_penalty``). ``direction``, ``vocab_size``, the decoding settings and the
encoder–decoder's sizes are fields ``default.py`` lacks: ``--config.task=multi30k`` needs
this config (on another, training stops with an error naming it).

The model is issue 39's: pre-LN, 3 + 3 layers, d = 256, 4 heads, feed-forward 1024, dropout
0.1 (per example, on the embedding sums, the sub-layer outputs and the feed-forward's hidden
layer; none on the attention weights, as fairseq's default), label smoothing 0.1.

The budget is the translation study's (experiments/configs/full.py, ``plan.translation``),
measured before it was fixed (experiments/results/full/translation_budget.md, written by
``python -m experiments.translation_budget``): batches of 64 pairs (about 1,000 target
tokens), 2,000 steps (4.4 epochs of the 29,000 training pairs), 10% warmup, AdamW at 5e-4.
"""

import os

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.task = "multi30k"
  config.data_dir = os.environ.get("NEARPROX_MULTI30K_DIR", "../shared/data/multi30k")
  config.direction = "en-de"  # or "de-en"
  config.vocab_size = 8000  # joint subword vocabulary (byte-level BPE) of the training split
  # Subwords per source or target sentence, eos/bos included: cuts ~0.1% of the training
  # pairs (the longest has 54), and rows are padded to it, so it sets the cost of a step.
  config.max_length = 48
  # Pairs average 15-16 subwords: batches of similar lengths cut to 16/24/32/48 positions
  # (57%/35%/7%/1% of the pairs) cost about 20 positions a row instead of 48.
  config.length_buckets = (16, 24, 32, 48)
  config.beam_size = 4  # final dev/test evaluation
  config.length_penalty = 0.6  # beam search: scores divided by ((5 + length) / 6)^0.6
  config.dev_beam_size = 1  # evaluations during training: greedy
  config.batch_size = 64  # sentence pairs, global
  config.eval_batch_size = 128
  config.max_eval_examples = 0  # every sentence of val and test_2016_flickr

  config.model.name = "seq2seq"  # trained from scratch
  config.model.num_encoder_layers = 3
  config.model.num_decoder_layers = 3
  config.model.hidden_size = 256
  config.model.num_heads = 4
  config.model.intermediate_size = 1024
  config.model.dropout_rate = 0.1
  config.model.dropout = True

  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 5e-4
  config.optimizer.warmup_fraction = 0.1
  config.optimizer.weight_decay = 0.01

  config.objective.kind = "clean"
  config.objective.epsilon = ml_collections.config_dict.placeholder(float)
  config.objective.l2_weight = 0.0
  config.objective.label_smoothing = 0.1

  config.num_train_steps = 2000
  config.log_every = 50
  config.eval_every = 250
  config.checkpoint_every = 500
  config.export_hf = False  # the translation model is exported to workdir/translation_model
  return config
