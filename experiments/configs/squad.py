"""SQuAD v1.1 extractive QA: MiniLM with a span head, proximal SGD, clean objective.

    python -m nearprox.training.train --config experiments/configs/squad.py --workdir runs/squad \
        --config.data_dir=../shared/data/squad
    python -m nearprox.training.train --config experiments/configs/squad.py \
        --workdir runs/squad_adamw --config.data_dir=../shared/data/squad \
        --config.optimizer.name=adamw --config.optimizer.learning_rate=1e-4

``data_dir``: a folder with ``dev-v1.1.json`` (and optionally ``train-v1.1.json``) or the
JSON file itself. With the dev file alone (the offline case) it is split by article
(:mod:`nearprox.text.data.squad`): 8,868 training questions → 10,102 windows of 256 tokens
(64 shared between consecutive windows of a question), and 1,702 held-out questions (1,797
windows) on which F1 and exact match are reported (``report.json``: ``dev``).

Budget: two CPU cores. A global batch of 16 windows × 256 tokens has as many tokens as the
B=32, T=128 row of the step-time table (experiments/results/bench_step.md), which gives the
step time to expect; the run files of the study record the measured ones. 600 steps are
≈ 0.95 epoch, with evaluations of the 1,702 held-out questions at step 300 and at the end.
Adversarial objectives add forward and backward passes per step (their pass counts:
nearprox/text/objectives.py), hence "clean". The learning rates are the classification
defaults, not tuned for QA.
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.task = "squad"
  config.model.name = "minilm"
  config.max_length = 256  # tokens per window (question + context piece)
  config.doc_stride = 64  # context tokens shared by consecutive windows of one question
  config.batch_size = 16
  config.eval_batch_size = 64
  config.max_eval_examples = 0  # every held-out question
  config.objective.kind = "clean"
  config.num_train_steps = 600
  config.log_every = 10
  config.eval_every = 300
  config.checkpoint_every = 100
  return config
