"""--mode=quick: every study at a small budget, sized for ≤ 15 min on 2 idle CPU cores.

A smoke run, not evidence: MiniLM, batch 8, 32 tokens, 32 steps, one seed, dev/test
subsampled to 200 examples. The tuning protocol of experiments/tuning.py with two trials per
optimizer (16 steps on 200 held-out SST-2 training examples, one seed), for AdamW, EF, iEF
and the best filter with the grafted step size; SST-2 and tweets; three damping values for
EF; clean, FGM and PGD objectives (no SMART); 8-device local vs global Gram; MRPC and 40%
label noise with AdamW and the best proximal variant. It shows the pipeline end to end; the
README reports full.py's runs.

    python -m experiments.reproduce --mode=quick
    python -m nearprox.training.train --config experiments/configs/quick.py --workdir /tmp/q
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
  """The training config every quick run starts from (a study then overrides fields)."""
  config = default.get_config()
  config.max_length = 32
  config.batch_size = 8
  config.max_eval_examples = 200
  config.num_train_steps = 32
  config.log_every = 4
  config.eval_every = 16
  config.checkpoint_every = 10**9  # runs are short: SIGTERM and the last step save
  config.export_hf = False
  config.progress = False
  config.parallel = "jit"
  config.objective.kind = "clean"
  config.objective.epsilon = None  # each objective's default unless a study sets one
  return config


def get_plan() -> ml_collections.ConfigDict:
  """What each study runs in this mode (see experiments/studies/); ``--plan.*`` overrides it."""
  plan = ml_collections.ConfigDict()
  plan.mode = "quick"
  plan.studies = ("optimizers", "damping", "adversarial", "multidevice", "glue", "noise")
  plan.seeds = (0,)
  # The tuning protocol of experiments/tuning.py at a tiny budget (one seed: a smoke run).
  plan.tuning = ml_collections.ConfigDict(
      {"task": "sst2", "steps": 16, "holdout_examples": 200, "seeds": (0,)}
  )
  plan.optimizer_variants = ("adamw", "proximal_ef", "proximal_ief", "proximal_graft")
  # Trials: learning rate × relative damping (proximal variants), two per optimizer.
  plan.lr_grid = {
      "adamw": (1e-4, 3e-4),
      "proximal_ef": (0.1, 0.3),
      "proximal_ief": (0.1, 0.3),
      "proximal_graft": (1e-2, 3e-2),
  }
  plan.damping_trials = {v: (0.1,) for v in plan.lr_grid if v.startswith("proximal")}
  plan.optimizer_tasks = ("sst2", "tweets")
  plan.damping_grid = (0.01, 0.1, 1.0)
  plan.damping_filters = ("ef",)
  plan.objectives = ("clean", "fgm", "pgd")
  plan.objective_optimizers = ("best_proximal",)
  # Training perturbation per objective (others: nearprox.text.objectives defaults).
  # ε = 0.1 (ℓ2 over a whole example's word embeddings) sits inside the attack grid below.
  plan.objective_settings = {
      "fgm": {"epsilon": 0.1},
      "pgd": {"epsilon": 0.1, "step_size": 0.04, "num_steps": 3},
  }
  plan.attack_epsilons = (0.0, 0.05, 0.1, 0.2, 0.5)
  plan.attack_steps = 3
  plan.attack_examples = 128
  plan.multidevice_variants = ("local", "global")
  plan.multidevice_count = 8
  plan.multidevice_seeds = (0,)
  plan.glue_task = "mrpc"
  plan.glue_max_length = 64
  plan.glue_optimizers = ("adamw", "best_proximal")
  plan.noise_levels = (0.4,)
  plan.noise_optimizers = ("adamw", "best_proximal")
  plan.target_fraction = 0.95
  # Studies 7 and 8 (not in this mode's plan.studies; full.py and smoke.py run them).
  plan.sketch_dim = 1024
  plan.qa_optimizers = ("adamw", "best_proximal")
  plan.qa_settings = {
      "max_length": 128,
      "doc_stride": 32,
      "batch_size": 8,
      "eval_batch_size": 64,
      "eval_every": 16,
  }
  return plan
