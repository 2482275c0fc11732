"""The translation study's budget, measured (issue 39: "measure first, then fix the budget").

Two measurements, one record:

* **BLEU against steps**: a measurement run of AdamW on the multi30k config, trained apart
  (``python -m nearprox.training.train --config experiments/configs/multi30k.py --workdir W
  ...``): its config, its val BLEU at every evaluation (greedy during training, beam search
  at the end) and its final val and test BLEU/chrF, read from ``W``.
* **Seconds per step, timed apart**: that config's AdamW training step compiled at every
  length bucket (batches cut to 16, 24, … subwords) in one process, ``--repeats`` interleaved
  rounds, the minimum of each; the expected step time is their mean weighted by the share of
  an epoch's batches in each bucket, and the run's steps times it is the training time the
  budget costs on this machine (evaluation not counted).

    python -m experiments.translation_budget --config experiments/configs/multi30k.py \
        [--config.FIELD=VALUE ...] --workdir W [--repeats=5] [--mode=full]

``--config`` and its overrides are the measurement run's own (the workdir keeps metrics,
not the config).

Writes ``experiments/results/<mode>/translation_budget.{json,md}``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from experiments import bench_optimizers, run_process
from nearprox.text import data

HERE = Path(__file__).resolve().parent


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "the measurement run's config", lock_config=True)
  flags.DEFINE_string("workdir", None, "the measurement run's workdir", required=True)
  flags.DEFINE_integer("repeats", 5, "interleaved timed rounds (one step per bucket)")
  flags.DEFINE_string("mode", "full", "results folder <out>/<mode>")
  flags.DEFINE_string("out", str(HERE / "results"), "results root")


def measurement_run(config: ml_collections.ConfigDict, workdir: Path) -> dict:
  """The run's config, val BLEU curve, final scores and own step time (from its workdir)."""
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  report_path = workdir / "report.json"
  report = json.loads(report_path.read_text()) if report_path.exists() else {}
  return {
      "workdir": str(workdir),
      "config": config.to_dict(),
      "curve": [(r["step"], r["dev/bleu"]) for r in rows if "dev/bleu" in r],
      "train_loss": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r],
      "steps": report.get("steps", max((r["step"] for r in rows), default=0)),
      "final": {split: report[split] for split in ("dev", "test") if split in report},
      "run_step_seconds": report.get("train_step_seconds"),
  }


def bucket_shares(config: ml_collections.ConfigDict) -> dict[int, float]:
  """{bucket length: share of an epoch's training batches cut to it}."""
  from nearprox.training import task_io

  task = data.get_task(config.task)
  _, _, tokenizer = task_io.create_model(config, task.num_labels, _key())
  arrays = task_io.load_splits(config, tokenizer)["train"]
  keys = task_io.sequence_keys(task)
  boundaries = task_io.length_boundaries(config) or (config.max_length,)
  bucket = data.batching.bucket_ids(data.row_lengths(arrays, keys), boundaries)
  batches = [-(-int((bucket == b).sum()) // config.batch_size) for b in range(len(boundaries))]
  return {length: n / sum(batches) for length, n in zip(boundaries, batches, strict=True)}


def _key():
  import jax

  return jax.random.key(0)


def step_configs(config: ml_collections.ConfigDict, lengths) -> dict:
  """bench_optimizers' ``{name: (label, config, settings)}``: the run's config with its
  batches padded to each bucket length (no buckets, ``max_length`` = the length)."""
  configs = {}
  for length in lengths:
    at = ml_collections.ConfigDict(config.to_dict())
    at.length_buckets = ()
    at.max_length = length
    at.progress = False
    configs[f"T={length}"] = (f"AdamW step, batches of {length} subwords", at, {})
  return configs


def budget_record(run: dict, shares: dict, seconds: dict, repeats: int, load: float) -> dict:
  expected = sum(shares[length] * seconds[f"T={length}"] for length in shares)
  return {
      "run": run,
      "buckets": [
          {"length": length, "share": shares[length], "step_seconds": seconds[f"T={length}"]}
          for length in shares
      ],
      "expected_step_seconds": expected,
      "expected_training_hours": expected * run["config"]["num_train_steps"] / 3600,
      "repeats": repeats,
      "machine": run_process.machine(),
      "load_average_at_start": load,
      "command": "python -m experiments.translation_budget " + " ".join(sys.argv[1:]),
  }


def markdown(record: dict) -> str:
  run, config = record["run"], record["run"]["config"]
  optimizer = config["optimizer"]
  lines = [
      "# The translation budget, measured",
      "",
      f"Written by `{record['command']}` (experiments/translation_budget.py).",
      "",
      f"**Measurement run**: {optimizer['name']} at learning rate {optimizer['learning_rate']:g}"
      f" (warmup {optimizer['warmup_fraction']:g} of the steps, then linear decay to 0), batch "
      f"{config['batch_size']} pairs, {config['num_train_steps']} steps, length buckets "
      f"{tuple(config.get('length_buckets') or ())}, seed {config['seed']}; trained apart, "
      f"{run['steps']} steps done.",
      "",
      "| step | val BLEU |",
      "|---|---|",
  ]
  final_step = run["steps"]
  for step, bleu in run["curve"]:
    how = "beam search" if step == final_step and run["final"] else "greedy"
    lines.append(f"| {step} | {bleu:.2f} ({how}) |")
  for split, scores in run["final"].items():
    name = "val" if split == "dev" else "test_2016_flickr"
    lines.append(f"\nFinal {name}: BLEU {scores['bleu']:.2f}, chrF {scores['chrf']:.2f}.")
  machine = record["machine"]
  lines += [
      "",
      f"**Step time, timed apart** ({machine.get('device_kind', '?')}, "
      f"{machine.get('cpus', '?')} CPUs, load average {record['load_average_at_start']:.2f} at "
      f"the start; minimum over {record['repeats']} interleaved rounds after compilation):",
      "",
      "| batch length (subwords) | share of the batches | s/step |",
      "|---|---|---|",
  ]
  for bucket in record["buckets"]:
    lines.append(
        f"| {bucket['length']} | {100 * bucket['share']:.1f}% | {bucket['step_seconds']:.3f} |"
    )
  lines += [
      "",
      f"Expected: {record['expected_step_seconds']:.3f} s/step, so "
      f"{record['expected_training_hours']:.2f} h of training for "
      f"{config['num_train_steps']} steps (evaluation not counted). The run's own median "
      f"step, on a machine it shared: {run['run_step_seconds'] or float('nan'):.3f} s.",
      "",
  ]
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  args = flags.FLAGS
  config = args.config
  run = measurement_run(config, Path(args.workdir))
  shares = bucket_shares(config)
  load = os.getloadavg()[0]
  seconds = bench_optimizers.measure(step_configs(config, shares), args.repeats)
  record = budget_record(run, shares, seconds, args.repeats, load)
  out = Path(args.out) / args.mode
  run_process.write_json(out / "translation_budget.json", record)
  (out / "translation_budget.md").write_text(markdown(record))
  print(markdown(record))


if __name__ == "__main__":
  define_flags()
  app.run(main)
