"""--mode=smoke: the whole pipeline on the random "tiny" BERT in seconds (for the tests).

The numbers mean nothing (a random 2-layer model, 3 steps); only the plumbing is checked.
"""

import ml_collections

from experiments.configs import quick


def get_config() -> ml_collections.ConfigDict:
  config = quick.get_config()
  config.model.name = "tiny"
  config.max_length = 16
  config.batch_size = 8
  config.eval_batch_size = 32
  config.max_eval_examples = 32
  config.num_train_steps = 3
  config.log_every = 1
  config.eval_every = 2
  return config


def get_plan() -> ml_collections.ConfigDict:
  plan = quick.get_plan()
  plan.mode = "smoke"
  plan.studies = (*plan.studies, "sketch", "squad", "ablation", "time_to_accuracy", "batch_size")
  plan.tuning.steps = 3
  plan.tuning.holdout_examples = 16
  plan.optimizer_variants = ("sgd", "proximal_tikhonov")
  plan.lr_grid = {"sgd": (1e-2,), "proximal_tikhonov": (1e-2,)}
  plan.damping_trials = {"proximal_tikhonov": (0.1,)}
  plan.optimizer_tasks = ("sst2",)
  plan.damping_grid = (0.1, 1.0)
  plan.damping_filters = ("tikhonov",)
  plan.objectives = ("clean", "fgm")
  plan.attack_epsilons = (0.0, 1.0)
  plan.attack_steps = 1
  plan.attack_examples = 16
  plan.multidevice_variants = ("sgd", "local", "global")
  plan.glue_max_length = 16
  plan.glue_optimizers = ("best_proximal",)
  plan.noise_levels = (0.4,)
  plan.noise_optimizers = ("best_proximal",)
  plan.studies += ("l1",)
  plan.l1_weights = (1.0,)
  plan.l1_optimizers = ("best_proximal",)
  plan.sketch_dim = 64
  plan.sketch_check_variant = "proximal_tikhonov"
  plan.qa_optimizers = ("sgd", "best_proximal")
  plan.qa_settings = {
      "max_length": 48,
      "doc_stride": 16,
      "max_question_length": 16,  # real SQuAD questions reach 40 tokens; 48-token windows
      "batch_size": 8,
      "eval_batch_size": 16,
      "eval_every": 2,
  }
  # Issue 40, parts 2-4: the tuned (tikhonov, uniform weights) variant's sketched-Gram part
  # only, SGD as the time-to-accuracy baseline, two batch sizes at three steps' examples.
  plan.ablation_variant = "best_proximal"
  plan.ablation_tasks = ("sst2",)
  plan.tta_variants = ("sgd", "best_proximal")
  plan.tta_baseline = "sgd"
  plan.tta_eval_every = 1
  plan.batch_sizes = (8, 16)
  plan.batch_example_budget = 24
  plan.batch_variants = ("sgd", "best_proximal")
  plan.batch_lr_factors = (1.0,)
  return plan
