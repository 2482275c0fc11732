"""The default job (README's `bash run.sh`): offline, about a quarter of an hour on a CPU.

Fine-tunes the offline MiniLM on the offline tweet-sentiment corpus three times with the same
budget (100 steps of batch 32, objective = task + FGM + L2), the comparison a user asks for
first:

1. the proximal variant that the optimizer study (``--mode=full``, experiments/tuning.py)
   ranked first, at the learning rate and damping its tuning chose;
2. AdamW at the rate its tuning chose;
3. SGD with momentum at the rate its tuning chose.

Until the study's tuning has decided all three, the job runs ``FALLBACK`` (the default
config's proximal SGD, AdamW at 1e-4, SGD+momentum at the default rate) and says so. Each run is evaluated on
seeded random subsets of 1000 dev and 1000 test examples (and of the low-confidence test
examples); `python -m nearprox.training.train --config experiments/configs/default.py`
evaluates on whole splits.

It then prints dev/test metrics side by side, writes ``comparison.png`` (training loss and
dev accuracy against step for each) and says where the checkpoints, logs and the exported
Hugging Face models are.

    python -m experiments.default_job [--workdir=runs/default_job] [--config.num_train_steps=40]
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from experiments import report
from experiments.configs import default
from nearprox.training import metrics_writer, train

STUDY = Path(__file__).resolve().parent / "results" / "full"
# The study's variants the job compares, in its column order.
TUNED = ("best_proximal", "adamw", "sgd_momentum")
# Used until the study has chosen them all: (label, overrides of the job config).
FALLBACK = [
    ("proximal SGD (default config)", {}),
    ("AdamW", {"optimizer.name": "adamw", "optimizer.learning_rate": 1e-4}),
    ("SGD+momentum", {"optimizer.name": "sgd"}),
]


def study_choices() -> tuple[list[tuple[str, dict]], bool]:
  """[(label, overrides)] of the runs, and whether the study's tuning decided them."""
  from experiments import runs, tuning
  from experiments.configs import full

  executor = runs.Executor(full.get_config(), STUDY, STUDY / "work", allow_new=False)
  ctx = tuning.Context(full.get_plan(), executor)
  chosen = []
  for name in TUNED:
    variant = ctx.resolve(name)
    trial = ctx.best_trial(variant) if variant else None
    if trial is None:
      return FALLBACK, False
    label = ctx.label(variant) + " (tuned)"
    chosen.append((label, {**ctx.overrides(variant), **trial["trial"]}))
  return chosen, True


def job_config():
  """``default.py`` at the job's budget: dev/test metrics on seeded subsets of 1000."""
  config = default.get_config()
  config.num_train_steps = 100
  config.max_eval_examples = 1000
  config.eval_every = 50
  return config


def plot(workdirs: dict[str, Path], path: Path) -> None:
  fig, (loss_ax, acc_ax) = report.pyplot().subplots(1, 2, figsize=(10, 3.8))
  for label, workdir in workdirs.items():
    records = metrics_writer.read_jsonl(workdir / "metrics.jsonl")
    train_rows = [r for r in records if "train/loss" in r]
    dev_rows = [r for r in records if "dev/accuracy" in r]
    loss_ax.plot(
        [r["step"] for r in train_rows], [r["train/loss"] for r in train_rows], label=label
    )
    acc_ax.plot(
        [r["step"] for r in dev_rows],
        [r["dev/accuracy"] for r in dev_rows],
        marker="o",
        label=label,
    )
  loss_ax.set(xlabel="step", ylabel="training loss (task + objective)", title="training loss")
  acc_ax.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  report.save_figure(fig, path, dpi=120)


def run(job, workdir: Path, choices) -> tuple[dict[str, dict], dict[str, Path]]:
  """Trains ``job`` once per (label, overrides); their reports (no params) and workdirs."""
  reports, workdirs = {}, {}
  for index, (label, overrides) in enumerate(choices):
    config = job.copy_and_resolve_references()
    config.update_from_flattened_dict(overrides)
    workdirs[label] = workdir / f"{index}_{config.optimizer.name}"
    print(
        f"\n=== {label}: {config.num_train_steps} steps of batch {config.batch_size} on "
        f"{config.task}, objective {config.objective.kind} + L2 ===",
        flush=True,
    )
    reports[label] = train.train_and_evaluate(config, workdirs[label])
    reports[label].pop("params")
    if reports[label]["preempted"]:
      # SIGTERM: the run saved a checkpoint; running this script again resumes it.
      raise SystemExit(
          f"{label} was interrupted at step {reports[label]['steps']}; "
          f"run the same command again to resume from {workdirs[label]}"
      )
  return reports, workdirs


def report_lines(reports: dict[str, dict], workdirs: dict[str, Path]) -> list[str]:
  """The metrics of every evaluated split side by side (columns numbered, labels listed
  first: they are longer than a column), then where the outputs are."""
  first = next(iter(reports.values()))
  lines = ["=== report ===", *(f"({i}) {label}" for i, label in enumerate(reports, 1)), ""]
  lines.append(f"{'':34s}" + "".join(f"{f'({i})':>16s}" for i in range(1, len(reports) + 1)))
  evaluated = (n for n in first if isinstance(first[n], dict) and n != "predicted_classes")
  for split in evaluated:
    for metric in first[split]:
      values = "".join(f"{r[split][metric]:16.4f}" for r in reports.values())
      lines.append(f"{split + ' ' + metric:34s}" + values)
  seconds = "".join(f"{r['train_step_seconds']:16.3f}" for r in reports.values())
  lines += [f"{'seconds per step':34s}" + seconds, ""]
  for label, r in reports.items():
    lines.append(
        f"{label}: checkpoints {workdirs[label] / 'checkpoints'}, logs "
        f"{workdirs[label] / 'metrics.jsonl'} and {workdirs[label] / 'tensorboard'}, "
        f"model {r.get('hf_model')}"
    )
  return lines


def main(argv) -> None:
  del argv
  train.configure_logging()
  workdir = Path(flags.FLAGS.workdir)
  choices, tuned = study_choices()
  print(
      "Settings: "
      + (
          "chosen by the optimizer study's tuning (experiments/results/full)"
          if tuned
          else "the study's tuning is not complete yet, so the default settings"
      ),
      flush=True,
  )
  reports, workdirs = run(flags.FLAGS.config, workdir, choices)
  plot(workdirs, workdir / "comparison.png")
  print("\n" + "\n".join(report_lines(reports, workdirs)))
  print(f"\nplot: {workdir / 'comparison.png'}")
  (workdir / "summary.json").write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
  # Defined here, not at import, so tests can import this module beside reproduce's flags.
  flags.DEFINE_string("workdir", "runs/default_job", "one subdirectory per optimizer")
  config_flags.DEFINE_config_dict(
      "config", job_config(), "the config of every run (the optimizer fields are set per run)"
  )
  app.run(main)
