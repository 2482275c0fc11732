"""--mode=full: the optimizer study of issue 13 at a real fine-tuning budget.

Budget of every reported number: MiniLM (all-MiniLM-L6-v2), batch 32, 64 tokens, 600 steps,
10% linear warmup then linear decay to 0, the same for every optimizer; L2 1e-4 on kernels,
no dropout, clean objective unless stated; evaluation on the whole dev/test splits; three
seeds for every reported number.

The tuning protocol (experiments/tuning.py), fixed here before any run:

* six trials per optimizer on log grids: six learning rates for AdamW and SGD+momentum,
  three learning rates × two relative dampings λ ∈ {0.1, 1} for every proximal variant;
* each trial is trained for 200 steps (a third of the budget, same schedule shape) on SST-2
  with seeds 0 and 1 and scored on 1,000 SST-2 training examples held out of training (the
  dev split is not loaded);
* the choice is the best mean held-out accuracy over the two seeds, trials with a seed that
  collapsed to one class last, ties by the lower final training loss; no grid extension;
* stage two, after the first: the best filter of {tikhonov, EF, iEF} with the grafted step
  size (d rescaled to the plain mean gradient's norm), and the same filter in front of AdamW,
  each with six trials of its own;
* the chosen settings run at the full budget with seeds 0, 1, 2 on SST-2 (dev), tweets (test)
  and MRPC (dev F1); tweets and MRPC reuse the SST-2 choice for every optimizer;
* the adversarial study (clean / FGM / PGD / SMART, attack ε grid 0 … 0.5) and the
  noisy-label study (20% and 40% flipped labels) then train AdamW and the proximal variant
  the tuning ranked first (``best_proximal``), three seeds each.

Added on 2026-11-29, after 5 tuning runs and before any proximal run, without changing the
above (studies 7 and 8 of experiments/studies/):

* ``sketch``: ``best_proximal`` on SST-2 with ``optimizer.sketch_dim = plan.sketch_dim`` (the
  smallest k of experiments/results/bench_step.md whose cos(d̂, d) ≥ 0.99 for both filters and
  both weightings), seeds 0, 1, 2, against the same settings with the exact Gram;
* ``squad``: AdamW, ``best_proximal`` and SGD+momentum on SQuAD's held-out articles
  (configs/squad.py: windows of 256 tokens, stride 64, batch 16, 600 steps), seeds 0, 1, 2,
  each at its SST-2 choice (QA is not tuned, for any optimizer).

Added on 2026-11-30, after tikhonov's tuning was complete and before any reported run:

* ``sketch`` also compares the exact and the sketched Gram at the tuning budget (200 steps,
  the held-out training examples) for ``plan.sketch_check_variant`` (tikhonov, the first
  filter whose tuning was complete) at the trial its tuning chose, seeds 0, 1, 2; the exact
  runs of seeds 0 and 1 are its tuning runs. It answers issue 14's training check without
  waiting for ``best_proximal``, and compares two Grams at equal settings, so it chooses
  nothing.

Added on 2026-11-30, training order only (no choice depends on it; the tables read the
same runs whatever the order): the tuning trains first, then ``squad``, then the optimizer
study on SST-2, then the rest in README order (``plan.train_first``; the SST-2 study came
before ``squad`` until 10 tuning trials were left). The runs of every part are fixed above;
this only decides which parts a partial study holds first: SQuAD needs 9 runs after the
tuning, the other tasks and robustness studies about 80.

Added on 2026-12-01, training order only, with SST-2 and SQuAD complete and tweets at three
seeds for AdamW, SGD+momentum and tikhonov: AdamW and ``best_proximal`` train their tweets
and MRPC runs next, before the other variants there, so a partial study holds the verdict's
comparison (the tuning's choice against AdamW) on every task first.

Added on 2026-12-06, before any of their runs (issue 40, part 1: every peer a user would
pick instead of AdamW), without changing the above: ``muon`` (optax.contrib.muon's update on
the hidden 2-D kernels, Adam on the embeddings, head, biases and LayerNorm),
``schedule_free_adamw`` (evaluated at its averaged iterate), ``lion`` (decoupled weight
decay 0.05, 5× AdamW's, as its paper advises for a rate 3-10× lower) and ``psgd_kron``
(psgdax's Kronecker-factored PSGD) join ``plan.optimizer_variants`` with six learning rates
each, the same number of trials as AdamW, on AdamW's budget and protocol: Muon at AdamW's
grid (its update is scaled to AdamW's RMS), schedule-free at twice AdamW's (its rate never
decays), Lion at a fifth, PSGD Kron at half. They are tuned, reported on the three tasks
with three seeds, and compared with the tuned proximal variant like AdamW; none of them is
a proximal variant, so no earlier choice changes.

Added on 2026-12-06, before any of its runs (issue 42): ``proximal_ief_eq8``, the iEF
variant at Wu et al.'s scale (``optimizer.weight_normalization = "damping"``: the step
Gᵀ(K+λI)⁻¹s of their eq. 8 / Algorithm 1, where ``proximal_ief`` takes (λ/Σs) times it).
Six trials like every optimizer: learning rate {0.003, 0.03} × relative λ {1e-3, 0.1, 1}
(1e-3: the paper reports iEF working near zero damping). The rates: the iEF tuning chose
0.1 at λ = 0.1 for the normalised step, and λ/Σs measured 0.3-11 (median 0.9) over 60
steps of an SST-2 run at λ = 1 (a one-off measurement then quoted in docs/method.md §1.4; the
eq. 8 runs now log it, tabulated in docs/results.md), so about 0.01 at λ = 0.1, bracketed
by the two rates. It is reported on the three tasks beside ``proximal_ief``; it is outside
the pools of ``best_filter`` and ``best_proximal``, so no earlier choice changes.
(Clarified 2026-12-07, changing no run: only the step's scale is the paper's; the variant
keeps every other setting of ``proximal_ief``, the study's momentum 0.9, warmup + linear
decay and L2, so it is not Algorithm 1's plain SGD with a fixed rate. Its tuning chose the
grid's top rate, 0.03, which the results' tuning table marks; the grid is not extended.)

Added on 2026-12-06, before any of its runs (issue 41): ``l1``, L1 as its proximal step
(``optimizer.l1_weight`` = λ₁: after every update the kernels are soft-thresholded at η_t·λ₁
with the optimizer's own schedule, ``nearprox.soft_threshold_l1``), λ₁ ∈ {0.1, 0.3, 1, 3}
(``plan.l1_weights``) for AdamW and ``best_proximal`` (the tuning's choice, iEF → AdamW), each
at its tuned settings, seeds 0, 1, 2, on SST-2; λ₁ = 0 is the optimizer study's runs. The
grid from a quick calculation: the warmup + linear decay over 600 steps sums to
Σ_t η_t = 300·η (0.06 at AdamW's chosen 2e-4, 0.03 at iEF → AdamW's 1e-4), and λ₁·Σ_t η_t is
the most the prox can move a weight towards 0: for AdamW 0.006, 0.018, 0.06, 0.18, about
0.2, 0.5, 2 and 5 times the median |θ| of MiniLM's kernels (0.034; 10%, 29%, 73% and 99% of
them lie below those, an upper bound on the zero fraction that the gradient lowers; for
iEF → AdamW 5%, 15%, 45%, 87%). After Adam's normalization a weight stays at 0 while
|m̂|/(√v̂+ε) ≤ λ₁, a step at most about 1: λ₁ = 1 and 3 sit at and beyond it, 0.1 and 0.3
below. The study reports the trade-off and chooses nothing: no earlier choice, run or
comparison changes.

The two "training order only" entries above were ``plan.train_first``, which the Ray runner
(2026-12-06, issue 38) dropped with the rest of the home-made scheduler: every run of a pass
now trains in parallel. The study was complete by then, so no record depends on the order.

Added on 2026-12-06, before any of its runs (issue 40 parts 2–5), without changing the
above (no earlier choice, run or comparison changes; every run below is new or is one of the
runs above, found by its key):

* ``ablation``: ``proximal_adamw`` (iEF → AdamW: the best filter, iEF, in front of AdamW) at
  its tuned settings, seeds 0, 1, 2, on SST-2 and tweets, with (a) its iEF-weighted mean
  gradient and no Gram (``optimizer.name = "weighted_mean_adamw"``, the same weights,
  learning rate and AdamW chain), (b) uniform weights (EF → AdamW), (c) the sketched Gram
  (``plan.sketch_dim``); each compared with iEF → AdamW by the fixed rule, and (a) with (c).
* ``time_to_accuracy``: AdamW, ``best_proximal`` (exact and sketched Gram) and
  ``best_peer`` (the peer whose tuning ranks first by the protocol's rule, on held-out
  training data), seeds 0, 1, 2, on SST-2 with the dev split evaluated every 20 steps
  (``plan.tta_eval_every``); steps and wall-clock to AdamW's final mean dev accuracy and to
  97% of it, the seconds per step from ``bench_optimizers`` (one process, interleaved),
  missing where it has not timed a step; the issue's target: the sketched variant at ≤ 0.7×
  AdamW's wall-clock.
* ``batch_size``: AdamW and ``best_proximal`` (exact Gram) on SST-2 with 19,200 training
  examples each (600 × 32): B ∈ {32, 128, 256} with ⌈19,200 / B⌉ = 600, 150, 75 steps,
  seeds 0, 1, 2. The learning-rate rule, the same for both: at B = 32 the tuning's choice
  η₀; at another B the best of the three trials η₀·√(B/32)·{0.5, 1, 2} by the tuning
  protocol (seeds 0 and 1, the 1,000 held-out training examples, the tuning's 6,400
  examples: ⌈6,400 / B⌉ steps), the damping at its B = 32 choice. √B is the square-root
  scaling rule for Adam-type updates (Malladi et al., NeurIPS 2022, arXiv 2205.10287), and
  both optimizers end in Adam's update. B = 256 stands for the issue's 512: the compiled
  training step of iEF → AdamW with the exact Gram at 512 × 64 tokens needs 17.0 GiB of XLA
  temporaries
  (``jit(...).lower(...).compile().memory_analysis()``; the word-embedding table's ghost
  Gram alone forms a [B·T, B·T] product, 4 GiB), on a 23 GiB machine whose runner trains
  two runs at once, and the training loop has no gradient accumulation; B = 256 (75 steps)
  needs 6.7 GiB, so two fit, and keeps a factor of 8 over B = 32.
  Changed on 2026-12-07, before any of its runs (0 of 24 stored), back to the issue's design:
  ``best_proximal`` with the sketched Gram (``plan.batch_sketch_dim = plan.sketch_dim``: at
  large B the exact Gram's cost is what the issue wants to avoid) and B ∈ {32, 128, 512}
  (600, 150, 38 steps). The same memory_analysis() gives the sketched step at 512 × 64 tokens
  13.1 GiB of temporaries (the word embedding's Gram stays exact, method.md §2.9) and AdamW's
  10.4 GiB; every B = 512 run reserves ``plan.memory_gib_by_batch_size`` of Ray's memory
  resource (16.3 GiB on this machine), so two of them never train at once, while a B = 32 run
  (about 2.3 GiB) still trains beside one. At B = 32 the sketched runs are the ablation's (c)
  runs (the same configs, the same keys). Nothing else changes.
* ``noise``: the 20% and 40% levels train seeds 0-4 (``plan.noise_seeds``; the stored seeds
  0-2 are among them); the clean level stays the optimizer study's three seeds.
* ``adversarial``: the clean and PGD runs of AdamW and ``best_proximal`` again, seeds 0, 1,
  2, with the same attack on the whole SST-2 dev split (``plan.robust_eval_examples = 0``),
  as runs of their own beside the 256-example rows (a run's key includes its attack, so the
  stored records keep their meaning); compared like the 256-example rows.

Added on 2026-12-06, before any of its runs (issue 41, part 2), without changing the above (no
earlier choice, run or comparison changes): ``multitask``, SST-2, MRPC and tweets trained
together on one MiniLM with a head per task (``config.task = "multitask"``,
configs/multitask.py), every example drawing its task with probability ∝ n_t^(1/T), T = 2
(``plan.multitask_temperature``: the square roots of the training set sizes give SST-2, MRPC
and tweets 53%, 12% and 35% of the examples; T = 1 would give MRPC 3.6%, about 700 examples, a
fifth of its training set), at the single-task budget (600 steps × 32, the examples mixed),
seeds 0, 1, 2, for AdamW, PCGrad → AdamW (``pcgrad_adamw``, Yu et al. 2020, at AdamW's choice:
it has no tuning of its own, and with one task it is AdamW), ``best_proximal`` and
``proximal_tikhonov`` (the tikhonov filter, which keeps the directions many examples agree on
and so damps task-conflicting ones), each at its SST-2 tuning choice as on every task of the
optimizer study. Per-task scores (SST-2 dev accuracy, MRPC dev F1, tweets test accuracy) and
their mean against the same optimizers' single-task runs; the verdict gets ``best_proximal``
vs AdamW on the multi-task mean.

Added on 2026-12-06, before any of its runs (issue 39), without changing the above:
``translation``, Multi30k English→German trained from scratch (configs/multi30k.py: the pre-LN
3 + 3 encoder–decoder, d = 256, dropout 0.1, label smoothing 0.1, batches of 64 sentence pairs
cut to length buckets of 16/24/32/48 subwords), with its own protocol (``plan.translation``,
experiments/studies/translation.py):

* the budget, measured before it was fixed (experiments/results/full/translation_budget.md:
  AdamW at 5e-4 trained for this budget, its val BLEU every 500 steps and its test BLEU, and
  the step timed apart at every bucket): 2,000 steps (4.4 epochs of the 29,000 training
  pairs), 10% linear warmup then linear decay; val BLEU (greedy) every 250 steps for the
  curves, beam search (4, length penalty 0.6) at the end;
* tuning on val, never on test_2016_flickr: six trials per optimizer, each trained for a third
  of the budget (667 steps, the same schedule shape) with seeds 0 and 1, the best mean val
  BLEU (beam) chosen by the optimizer study's rule; AdamW and Muon on the rates
  {1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3} (Muon's update is scaled to AdamW's RMS), SGD+momentum
  on {0.01, 0.03, 0.1, 0.3, 1, 3} (a from-scratch Transformer's SGD rate is not known to a
  factor of ten), ``best_proximal`` (the SST-2 tuning's choice, iEF → AdamW) on the rates
  {5e-4, 2e-3} × relative λ {1e-3, 0.1, 1} (λ = 1e-3: issue 42 asks the next study that tunes
  iEF to try the paper's near-zero damping);
* the chosen trials at the full budget, seeds 0, 1, 2, test_2016_flickr BLEU and chrF (beam);
  ``best_proximal`` also with the sketched Gram (``plan.sketch_dim``) at its exact-Gram choice;
* the FNGD verdict (arXiv 2403.03473 reports +24 BLEU over AdamW on Multi30k) by the study
  module's declared rule.

Changed on 2026-12-07, when no run of the translation study existed (0 stored), so nothing
measured under the earlier plan is discarded: time to AdamW's BLEU compares greedy with
greedy. The target had been AdamW's final val BLEU with beam search against curves whose
points before the last were greedy; now the runs also decode val greedily after their last
step (``dev/bleu_greedy``: one greedy pass of val per run) and the target is AdamW's
seed-mean greedy val BLEU there, the curves greedy throughout. The tuning runs now load
and decode val alone (``eval_splits`` = ("dev",), set because ``split`` is "dev"), so no
test_2016_flickr number is computed while tuning; their keys change with it, the reported
runs' do not. The study's test BLEU and chrF go to summary.json.

Compute: every run file records its wall time; on 2 CPU cores the study spans many hours, the
run store resumes anywhere, and the README marks a partial study as partial.

    python -m experiments.reproduce --mode=full [--stop_after=MIN] [--report_only]
"""

import ml_collections

from experiments.configs import quick, squad

PEERS = ("muon", "schedule_free_adamw", "lion", "psgd_kron")
PROXIMAL_VARIANTS = (
    "proximal_tikhonov",
    "proximal_ef",
    "proximal_ief",
    "proximal_graft",
    "proximal_adamw",
)


def get_config() -> ml_collections.ConfigDict:
  config = quick.get_config()  # quick.py derives from default.py
  config.max_length = 64
  config.batch_size = 32
  config.max_eval_examples = 0
  config.num_train_steps = 600
  config.log_every = 20
  config.eval_every = 100
  # Runs of up to an hour on a CPU core: a hard stop (no SIGTERM) loses at most 10 minutes.
  config.checkpoint_minutes = 10.0
  return config


def get_plan() -> ml_collections.ConfigDict:
  plan = quick.get_plan()
  plan.mode = "full"
  plan.studies = ("optimizers", "sketch", "adversarial", "noise", "squad")
  plan.seeds = (0, 1, 2)
  plan.tuning = ml_collections.ConfigDict(
      {"task": "sst2", "steps": 200, "holdout_examples": 1000, "seeds": (0, 1)}
  )
  plan.optimizer_variants = ("adamw", "sgd_momentum", *PROXIMAL_VARIANTS, *PEERS)
  plan.optimizer_variants += ("proximal_ief_eq8",)
  plan.lr_grid = {
      "adamw": (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4),
      "sgd_momentum": (2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1),
      # The natural filters keep a small part of ‖g‖ (a kept fraction of a few percent at
      # λ = 0.1), so their rates sit an order of magnitude above SGD's; grafting restores
      # SGD's step norm, and Adam normalizes whatever it is given.
      "proximal_tikhonov": (3e-3, 1e-2, 3e-2),
      "proximal_ef": (0.03, 0.1, 0.3),
      "proximal_ief": (0.03, 0.1, 0.3),
      "proximal_graft": (3e-3, 1e-2, 3e-2),
      "proximal_adamw": (3e-5, 1e-4, 3e-4),
      # Added on 2026-12-06 (docstring): the peers, six rates each.
      "muon": (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4),
      "schedule_free_adamw": (2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3),
      "lion": (2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4),
      "psgd_kron": (5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4),
      "proximal_ief_eq8": (0.003, 0.03),  # added on 2026-12-06 (docstring)
  }
  plan.damping_trials = {v: (0.1, 1.0) for v in PROXIMAL_VARIANTS}
  plan.damping_trials["proximal_ief_eq8"] = (1e-3, 0.1, 1.0)
  plan.optimizer_tasks = ("sst2", "tweets", "mrpc")
  plan.objectives = ("clean", "fgm", "pgd", "smart")
  plan.objective_optimizers = ("adamw", "best_proximal")
  plan.attack_epsilons = (0.0, 0.05, 0.1, 0.2, 0.5)
  plan.attack_steps = 5
  plan.attack_examples = 256
  plan.noise_levels = (0.2, 0.4)
  plan.noise_optimizers = ("adamw", "best_proximal")
  # Added on 2026-12-06 (docstring): issue 41's L1 study.
  plan.studies += ("l1",)
  plan.l1_weights = (0.1, 0.3, 1.0, 3.0)
  plan.l1_optimizers = ("adamw", "best_proximal")
  plan.sketch_dim = 1024
  plan.sketch_check_variant = "proximal_tikhonov"
  plan.qa_optimizers = ("adamw", "best_proximal", "sgd_momentum")
  # Added on 2026-12-06 (docstring): issue 40, parts 2-5.
  plan.studies += ("ablation", "time_to_accuracy", "batch_size")
  plan.ablation_variant = "proximal_adamw"
  plan.ablation_tasks = ("sst2", "tweets")
  plan.tta_task = "sst2"
  plan.tta_baseline = "adamw"
  plan.tta_eval_every = 20
  plan.tta_variants = ("adamw", "best_proximal", "best_peer")
  plan.tta_sketched = ("best_proximal",)
  plan.tta_target_fractions = (1.0, 0.97)
  plan.tta_time_ratio_target = 0.7
  plan.batch_sizes = (32, 128, 512)  # 2026-12-07: 512 with the sketched Gram (docstring)
  plan.batch_example_budget = 600 * 32
  plan.batch_variants = ("adamw", "best_proximal")
  plan.batch_lr_factors = (0.5, 1.0, 2.0)
  plan.batch_sketch_dim = plan.sketch_dim
  plan.memory_gib_by_batch_size = {"512": 14.0}  # XLA's 13.1 GiB (docstring)
  plan.noise_seeds = (0, 1, 2, 3, 4)
  # Added on 2026-12-06 (docstring): issue 41, part 2.
  plan.studies += ("multitask",)
  plan.multitask_tasks = ("sst2", "mrpc", "tweets")
  plan.multitask_temperature = 2.0
  plan.multitask_variants = ("adamw", "pcgrad_adamw", "best_proximal", "proximal_tikhonov")
  # Added on 2026-12-06 (docstring): issue 39, translation from scratch.
  plan.studies += ("translation",)
  plan.translation = ml_collections.ConfigDict(
      {
          "tuning": {
              "task": "multi30k",
              "steps": 667,
              "holdout_examples": 0,
              "seeds": (0, 1),
              "split": "dev",
              "base": "multi30k",
              # A hard stop (no SIGTERM) loses at most 10 minutes, as in the GLUE runs.
              "settings": {"num_train_steps": 2000, "eval_every": 250, "checkpoint_minutes": 10.0},
          },
          "variants": ("adamw", "best_proximal", "sgd_momentum", "muon"),
          "sketched": ("best_proximal",),
          "lr_grid": {
              "adamw": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3),
              "muon": (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3),
              "sgd_momentum": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
              "best_proximal": (5e-4, 2e-3),
          },
          "damping_trials": {"best_proximal": (1e-3, 0.1, 1.0)},
          "fngd_gain": 24.0,
      }
  )
  plan.robust_eval_objectives = ("clean", "pgd")
  plan.robust_eval_examples = 0
  qa = squad.get_config()
  plan.qa_settings = {
      k: qa[k] for k in ("max_length", "doc_stride", "batch_size", "eval_batch_size", "eval_every")
  }
  return plan
