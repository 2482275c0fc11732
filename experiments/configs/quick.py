"""--quick: every study at a small budget, sized for ≤ 15 min on 2 idle CPU cores.

MiniLM, batch 8, 32 tokens, 32 steps, one seed, dev/test subsampled to 200 examples; two
learning rates per optimizer (SST-2 dev, no grid extension), three damping values per
filter; on tweets AdamW and the two proximal filters; clean, FGM and PGD objectives (no
SMART); 8-device local vs global Gram; MRPC and 40% label noise with AdamW and the best
proximal variant. About 28 training runs. The numbers show the pipeline end to end and the
direction of effects at a very short budget; they are not converged fine-tuning results
(see full.py, whose runs the README reports).

    python experiments/reproduce.py --quick
    python -m nearprox.training.train --config experiments/configs/quick.py --workdir /tmp/q
"""

import importlib.util
import pathlib

import ml_collections


def _default_config() -> ml_collections.ConfigDict:
  path = pathlib.Path(__file__).with_name("default.py")
  spec = importlib.util.spec_from_file_location("nearprox_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config() -> ml_collections.ConfigDict:
  """The training config every quick run starts from (a study then overrides fields)."""
  config = _default_config()
  config.max_length = 32
  config.batch_size = 8
  config.max_eval_examples = 200
  config.num_train_steps = 32
  config.log_every = 4
  config.eval_every = 16
  config.checkpoint_every = 10**9  # no checkpoints: runs are short and restart from scratch
  config.export_hf = False
  config.progress = False
  config.parallel = "jit"
  config.objective.kind = "clean"
  config.objective.epsilon = None  # each objective's default unless a study sets one
  return config


def get_plan() -> ml_collections.ConfigDict:
  """What each study runs in this mode (see experiments/studies.py)."""
  plan = ml_collections.ConfigDict()
  plan.mode = "quick"
  plan.seeds = (0,)
  # Learning-rate grids per optimizer variant, swept on the SST-2 dev split (seed 0).
  plan.lr_grid = {
      "sgd": (0.1, 0.3),
      "sgd_momentum": (1e-2, 3e-2),
      "adamw": (1e-4, 3e-4),
      "proximal_tikhonov": (3e-2, 1e-1),
      "proximal_natural": (0.1, 0.3),
      "proximal_norm": (1e-2, 3e-2),
  }
  plan.sweep_tasks = ("sst2",)  # tweets reuses SST-2's best learning rate
  plan.sweep_extensions = 0  # full.py extends a grid past an edge that wins
  plan.optimizer_tasks = ("sst2", "tweets")
  plan.tweets_variants = ("adamw", "proximal_tikhonov", "proximal_natural")
  plan.damping_grid = (0.01, 0.1, 1.0)
  plan.damping_filters = ("tikhonov", "natural")
  plan.objectives = ("clean", "fgm", "pgd")
  plan.objective_optimizers = ("best_proximal",)
  # Training perturbation per objective (others: nearprox.text.objectives defaults). ε = 0.1 (ℓ2 over
  # a whole example's word embeddings) sits inside the attack grid below.
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
  return plan
