"""A smoke-test config: a random 2-layer BERT (hidden 32) with MiniLM's tokenizer, a few
steps, small evaluation. Used by the tests; also a quick check that a machine is set up.

    python -m nearprox.training.train --config experiments/configs/tiny.py --workdir /tmp/tiny
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.name = "tiny"
  config.max_length = 16
  config.batch_size = 8
  config.eval_batch_size = 16
  config.max_eval_examples = 64
  config.num_train_steps = 8
  config.log_every = 4
  config.eval_every = 4
  config.checkpoint_every = 4
  config.optimizer.learning_rate = 0.5
  config.objective.kind = "clean"
  config.export_hf = False
  config.progress = False
  return config
