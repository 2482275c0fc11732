"""The default job (README's `bash run.sh`): offline, about a quarter of an hour on a CPU.

Fine-tunes the offline MiniLM on the offline tweet-sentiment corpus three times with the same
budget (100 steps of batch 32, objective = task + FGM + L2), the comparison a user asks for
first:

1. the proximal variant that the optimizer study (``--mode=full``, experiments/tuning.py)
   ranked first, at the learning rate and damping its tuning chose;
2. AdamW at the rate its tuning chose;
3. SGD with momentum at the rate its tuning chose.

The study's choices are read from one small committed file, ``experiments/results/full/
chosen.json``, which the study's tuning stage writes (``tuning.Context.chosen``: each tuned
variant's label and config overrides, and which variant ``best_proximal`` names); the job
reads nothing of the study's run store. ``--chosen=PATH`` reads another study's file. When the
file is absent or lacks one of the three choices (a tuning not complete yet), the job runs
``FALLBACK`` (the default config's proximal SGD, AdamW at 1e-4, SGD+momentum at the default
rate) and says so; a file that does not parse or names an unknown config field is an error
that names the file. Each run is evaluated on seeded random subsets of 1000 dev and 1000 test
examples (and of the low-confidence test examples), dev every 20 steps;
`python -m nearprox.training.train --config experiments/configs/default.py` evaluates on whole
splits.

It then prints dev/test metrics side by side, writes ``comparison.png`` (training loss and dev
accuracy against step, and dev accuracy against training seconds: the runs' summed step times,
without compilation and evaluation; one legend below the panels) and says where the
checkpoints, logs and the exported Hugging Face models are.

    python -m experiments.default_job [--workdir=runs/default_job] [--chosen=PATH]
        [--config.num_train_steps=40]
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments.configs import default
from nearprox.training import metrics_writer, train

# The optimizer study's decisions (written by its tuning stage; see tuning.Context.chosen).
CHOSEN = Path(__file__).resolve().parent / "results" / "full" / "chosen.json"
# The study's variants the job compares, in its column order (an alias or a variant name).
TUNED = ("best_proximal", "adamw", "sgd_momentum")
# Used until the study has chosen them all: (label, overrides of the job config).
FALLBACK = [
    ("proximal SGD (default config)", {}),
    ("AdamW", {"optimizer.name": "adamw", "optimizer.learning_rate": 1e-4}),
    ("SGD+momentum", {"optimizer.name": "sgd"}),
]


def study_choices(path: Path = CHOSEN) -> tuple[list[tuple[str, dict]], str | None]:
  """[(label, overrides)] of the runs, and None when ``path`` (a ``chosen.json``) decided
  them all, else why they are ``FALLBACK``. A malformed file is a ValueError naming it."""
  path = Path(path)
  if not path.exists():
    return FALLBACK, f"{path} does not exist (the study's tuning has not written it)"
  try:
    chosen = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is not valid JSON: {error}") from None
  aliases = chosen.get("aliases", {}) if isinstance(chosen, dict) else None
  variants = chosen.get("variants") if isinstance(chosen, dict) else None
  if not isinstance(aliases, dict) or not isinstance(variants, dict):
    raise ValueError(
        f'{path} is not a chosen.json: expected an object with "aliases" and "variants" '
        "objects (tuning.Context.chosen)"
    )
  choices, missing = [], []
  for name in TUNED:
    variant = aliases[name] if name in aliases else name
    if not isinstance(variant, (str, type(None))):
      raise ValueError(f"{path}: alias {name!r} names {variant!r}, not a variant name")
    if variant is None or variant not in variants:
      missing.append(name if variant in (None, name) else f"{name} ({variant})")
      continue
    entry = variants[variant]
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("label"), str)
        and isinstance(entry.get("overrides"), dict)
    ):
      raise ValueError(
          f'{path}: variant {variant!r} needs a "label" string and an "overrides" object'
      )
    choices.append((entry["label"] + " (tuned)", dict(entry["overrides"])))
  if missing:
    return FALLBACK, f"{path} has no choice yet for {', '.join(missing)}"
  return choices, None


def configure(job, overrides: dict, source: Path | None = None):
  """A copy of ``job`` with ``overrides`` (flattened keys); an unknown key or a value of the
  wrong type is a ValueError that names ``source``, the file they came from."""
  config = job.copy_and_resolve_references()
  where = f"{source}: " if source else ""
  for key, value in overrides.items():
    *parents, field = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or field not in node:
      raise ValueError(f"{where}override {key!r} names no field of the job's config")
    try:
      config.update_from_flattened_dict({key: value})
    except (TypeError, ValueError, KeyError) as error:
      raise ValueError(f"{where}override {key!r}={value!r}: {error}") from None
  return config


def settings(job, chosen: Path) -> tuple[dict, list[str]]:
  """The runs' configs ({label: config}, ``job`` with each choice's overrides) and the lines
  that say where their settings come from. A malformed ``chosen`` is a ValueError naming it."""
  choices, fallback = study_choices(chosen)
  source = None if fallback else chosen
  configs = {label: configure(job, overrides, source) for label, overrides in choices}
  if fallback:
    lines = [
        "Settings: the default ones (FALLBACK in experiments/default_job.py), not the "
        f"optimizer study's choices: {fallback}."
    ]
  else:
    lines = [f"Settings: chosen by the optimizer study's tuning, read from {chosen}:"]
  for label, overrides in choices:
    lines.append(f"  {label}: {json.dumps(overrides) if overrides else 'the job config'}")
  return configs, lines


def job_config():
  """``default.py`` at the job's budget: dev/test metrics on seeded subsets of 1000, dev
  every 20 steps (for the plot's curves)."""
  config = default.get_config()
  config.num_train_steps = 100
  config.max_eval_examples = 1000
  config.eval_every = 20
  return config


def _last_per_step(rows: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows carrying ``name``; a step logged twice (a rerun's final
  evaluation) keeps its last value."""
  values = {int(r["step"]): float(r[name]) for r in rows if name in r}
  steps = np.array(sorted(values), dtype=float)
  return steps, np.array([values[int(s)] for s in steps])


def training_seconds(rows: list[dict], steps: np.ndarray) -> np.ndarray | None:
  """Seconds of training up to each of ``steps``: the sum over the logged windows of their
  median step time (``train/step_time``) × their steps, interpolated between logged steps.
  The wall-clock time of the rows (``time``) would also count the evaluations on the way and
  train.py does not log how long they take; the median leaves out the first step's
  compilation. None without step times."""
  logged, step_time = _last_per_step(rows, "train/step_time")
  if not len(logged):
    return None
  windows = np.diff(np.concatenate([[0.0], logged]))
  return np.interp(steps, np.concatenate([[0.0], logged]), np.cumsum([0.0, *(windows * step_time)]))


def figure(workdirs: dict[str, Path]):
  """Training loss and dev accuracy against step, dev accuracy against training seconds; one
  legend for the three panels, below them."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (loss_ax, acc_ax, time_ax) = plt.subplots(1, 3, figsize=(15, 4.4), layout="constrained")
  for label, workdir in workdirs.items():
    rows = metrics_writer.read_jsonl(workdir / "metrics.jsonl")
    (line,) = loss_ax.plot(*_last_per_step(rows, "train/loss"), label=label)
    dev_steps, dev_accuracy = _last_per_step(rows, "dev/accuracy")
    acc_ax.plot(dev_steps, dev_accuracy, marker="o", color=line.get_color())
    seconds = training_seconds(rows, dev_steps)
    if seconds is not None:
      time_ax.plot(seconds, dev_accuracy, marker="o", color=line.get_color())
  loss_ax.set(xlabel="step", ylabel="training loss (task + objective)", title="training loss")
  acc_ax.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
  time_ax.set(
      xlabel="training seconds\n(summed step times: no compilation, no evaluation)",
      ylabel="dev accuracy",
      title="dev accuracy against training time",
  )
  for ax in (loss_ax, acc_ax, time_ax):
    ax.grid(alpha=0.3)
  fig.legend(loc="outside lower center", ncols=min(3, len(workdirs)), frameon=False)
  return fig


def plot(workdirs: dict[str, Path], path: Path) -> None:
  import matplotlib.pyplot as plt

  fig = figure(workdirs)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(configs: dict, workdir: Path) -> tuple[dict[str, dict], dict[str, Path]]:
  """Trains each of ``configs`` ({label: config}); their reports (no params) and workdirs."""
  reports, workdirs = {}, {}
  for index, (label, config) in enumerate(configs.items()):
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
  try:
    configs, lines = settings(flags.FLAGS.config, Path(flags.FLAGS.chosen))
  except ValueError as error:  # a malformed chosen.json, named in the message
    raise SystemExit(f"error: {error}") from None
  print("\n".join(lines), flush=True)
  reports, workdirs = run(configs, workdir)
  plot(workdirs, workdir / "comparison.png")
  print("\n" + "\n".join(report_lines(reports, workdirs)))
  print(f"\nplot: {workdir / 'comparison.png'}")
  (workdir / "summary.json").write_text(json.dumps(reports, indent=2))


if __name__ == "__main__":
  # Defined here, not at import, so tests can import this module beside reproduce's flags.
  flags.DEFINE_string("workdir", "runs/default_job", "one subdirectory per optimizer")
  flags.DEFINE_string(
      "chosen", str(CHOSEN), "the study's choices (a tuning stage's chosen.json); absent: FALLBACK"
  )
  config_flags.DEFINE_config_dict(
      "config", job_config(), "the config of every run (the optimizer fields are set per run)"
  )
  app.run(main)
