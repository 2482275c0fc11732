"""The default job (README's `bash run.sh`): offline, a few minutes on a CPU.

Fine-tunes the offline MiniLM on the offline tweet-sentiment corpus twice with the same
budget (steps, batch, learning rate, momentum, objective = task + FGM + L2):

1. proximal SGD (tikhonov filter, relative damping) — ``experiments/configs/default.py``;
2. plain SGD — the same config with ``optimizer.name = "sgd"``.

Both run 100 steps of batch 32 and are evaluated on seeded random subsets of 1000 dev and
1000 test examples (and of the low-confidence test examples); `python -m nearprox.training.train
--config experiments/configs/default.py` evaluates on whole splits.

It then prints dev/test metrics side by side, writes ``comparison.png`` (training loss and
dev accuracy against step for both) and says where the checkpoints, logs and the exported
Hugging Face model are.

    python experiments/default_job.py [--workdir runs/default_job] [--steps N]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nearprox.training import train  # noqa: E402

CONFIG = Path(__file__).with_name("configs") / "default.py"


def load_config():
  spec = importlib.util.spec_from_file_location("default_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def plot(runs: dict[str, Path], path: Path) -> None:
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
  for label, workdir in runs.items():
    records = read_metrics(workdir)
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
  loss_ax.set(xlabel="step", ylabel="training loss (task + FGM)", title="training loss")
  acc_ax.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/default_job", type=Path)
  parser.add_argument("--steps", type=int, default=None, help="override num_train_steps")
  args = parser.parse_args()
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)

  reports, workdirs = {}, {}
  for label, optimizer in (("proximal SGD", "proximal_sgd"), ("plain SGD", "sgd")):
    config = load_config()
    # A few minutes on a CPU: dev/test metrics on seeded random subsets of 1000 examples.
    config.num_train_steps = 100
    config.max_eval_examples = 1000
    config.eval_every = 50
    if args.steps:
      config.num_train_steps = args.steps
    config.optimizer.name = optimizer
    workdirs[label] = args.workdir / optimizer
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

  plot_path = args.workdir / "comparison.png"
  plot(workdirs, plot_path)
  first = reports["proximal SGD"]
  splits = [name for name in first if isinstance(first[name], dict)]
  print("\n=== report ===")
  print(f"{'':34s}" + "".join(f"{label:>16s}" for label in reports))
  for split in splits:
    for metric in first[split]:
      print(
          f"{split + ' ' + metric:34s}"
          + "".join(f"{report[split][metric]:16.4f}" for report in reports.values())
      )
  print(
      f"{'seconds per step':34s}"
      + "".join(f"{report['train_step_seconds']:16.3f}" for report in reports.values())
  )
  print(f"\nplot: {plot_path}")
  for label, report in reports.items():
    print(
        f"{label}: checkpoints {workdirs[label] / 'checkpoints'}, logs "
        f"{workdirs[label] / 'metrics.jsonl'} and {workdirs[label] / 'tensorboard'}, "
        f"model {report.get('hf_model')}"
    )
  (args.workdir / "summary.json").write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
  main()
