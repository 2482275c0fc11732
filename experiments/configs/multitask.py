"""Multi-task fine-tuning: one MiniLM encoder, a head per task for SST-2, MRPC and tweets.

The budget of the single-task runs of --mode=full (full.py: 600 steps × 32 examples, 64
tokens, clean objective, L2 1e-4, 10% warmup then linear decay), the examples now mixed:
each draws its task with probability ∝ n_t^(1/T), T = ``task_temperature`` = 2 (√ of the
training set sizes: SST-2 67,349, MRPC 3,668, tweets 29,749 → 53%, 12%, 35%;
nearprox.text.data.multitask). Evaluation: every task's dev split (tweets also its test split)
with its own metrics and their mean; export: ``workdir/hf_model/<task>/``, one Hugging Face
directory per task (the shared encoder and that task's head).

The optimizer is proximal SGD with the tikhonov filter at its SST-2 tuning choice (learning
rate 0.01, relative damping 0.1; experiments/results/full/chosen.json): on a mixed batch the
filter keeps the directions many examples agree on and damps the rest. The study's other rows
(experiments/studies/multitask.py), at their own SST-2 choices:

    python -m nearprox.training.train --config experiments/configs/multitask.py --workdir runs/mt \\
        --config.data_dir=../shared/data/glue
    ... --config.optimizer.name=adamw --config.optimizer.learning_rate=2e-4
    ... --config.optimizer.name=pcgrad_adamw --config.optimizer.learning_rate=2e-4
    ... --config.optimizer.name=proximal_adamw --config.optimizer.filter=natural \\
        --config.optimizer.weighting=ief --config.optimizer.learning_rate=1e-4 \\
        --config.optimizer.damping=1.0
    ... --config.tasks="('sst2','mrpc')" --config.task_temperature=1.0
"""

import ml_collections

from experiments.configs import full


def get_config() -> ml_collections.ConfigDict:
  config = full.get_config()
  config.task = "multitask"
  config.tasks = ("sst2", "mrpc", "tweets")
  config.task_temperature = 2.0
  config.optimizer.name = "proximal_sgd"
  config.optimizer.filter = "tikhonov"
  config.optimizer.learning_rate = 0.01
  config.optimizer.damping = 0.1
  config.export_hf = True
  config.progress = True
  return config
