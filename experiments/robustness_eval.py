"""Accuracy under an embedding-space PGD attack for a grid of ε: a CSV table and a PNG plot.

A thin layer over :mod:`nearprox.text.robustness`; it trains nothing. From Python, give it a
model, its params and batches (e.g. at the end of training):

    from experiments.robustness_eval import evaluate_and_write
    rows = evaluate_and_write(model, params, batches, [0, 0.25, 0.5, 1, 2],
                              "experiments/results/robustness_sst2")
    # -> robustness_sst2.csv, robustness_sst2.png

From the command line, on a Hugging Face BERT directory (``models.save_pretrained`` output,
or "minilm") and a task's dev split (``nearprox.text.data.load_task``):

    python experiments/robustness_eval.py --checkpoint runs/sst2/hf --task sst2 \\
        --data-dir ../shared/data/glue --epsilons 0,0.25,0.5,1,2 --max-examples 512 \\
        --out experiments/results/robustness_sst2
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from nearprox.text import models, objectives, robustness


def evaluate_and_write(
    model,
    params,
    batches: Iterable,
    epsilons: Sequence[float],
    out_prefix: str | os.PathLike,
    *,
    num_steps: int = 10,
    step_size: float | None = None,
    norm: str = "l2",
    label: str | None = None,
    title: str | None = None,
) -> list[dict]:
  """Runs :func:`nearprox.text.robustness.attack_accuracy` on a nearprox BERT classifier and
  writes ``<out_prefix>.csv`` and ``<out_prefix>.png``; returns the rows."""
  rows = robustness.attack_accuracy(
      models.bert_logits_fn(model),
      params,
      batches,
      epsilons,
      hidden_size=model.config.hidden_size,
      num_steps=num_steps,
      step_size=step_size,
      norm=norm,
  )
  out_prefix = Path(out_prefix)
  robustness.write_csv(rows, out_prefix.with_suffix(".csv"))
  robustness.plot_accuracy(
      {label: rows} if label else rows,
      out_prefix.with_suffix(".png"),
      **({"title": title} if title else {}),
  )
  return rows


def _dev_batches(task_name: str, tokenizer, args) -> list[dict]:
  import numpy as np

  from nearprox.text import data

  split = data.load_task(task_name, "dev", args.data_dir, source=args.source)
  arrays = data.encode(split, tokenizer, args.max_length).arrays()
  if 0 < args.max_examples < len(arrays["labels"]):
    keep = np.sort(
        np.random.default_rng(args.seed).permutation(len(arrays["labels"]))[: args.max_examples]
    )
    arrays = {k: v[keep] for k, v in arrays.items()}
  return list(data.batches(arrays, args.batch_size, shuffle=False))


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--checkpoint",
      required=True,
      help="Hugging Face BERT directory with a classification head, or 'minilm'",
  )
  parser.add_argument("--task", required=True, help="sst2, cola, mrpc, rte or tweets")
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--source", default=None, help="tsv, tfds or csv (default: per task)")
  parser.add_argument("--epsilons", default="0,0.25,0.5,1,2", help="comma-separated attack radii")
  parser.add_argument("--num-steps", type=int, default=10)
  parser.add_argument("--step-size", type=float, default=None, help="default 2.5·ε/K")
  parser.add_argument("--norm", choices=objectives.NORMS, default="l2")
  parser.add_argument("--max-length", type=int, default=128)
  parser.add_argument("--batch-size", type=int, default=32)
  parser.add_argument("--max-examples", type=int, default=0, help="0: the whole dev split")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True, help="output prefix (.csv and .png added)")
  args = parser.parse_args(argv)

  from nearprox.text import data, models

  task = data.get_task(args.task)
  model, params, tokenizer = models.load_pretrained(args.checkpoint, num_labels=task.num_labels)
  batches = _dev_batches(args.task, tokenizer, args)
  epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
  rows = evaluate_and_write(
      model,
      params,
      batches,
      epsilons,
      args.out,
      num_steps=args.num_steps,
      step_size=args.step_size,
      norm=args.norm,
      title=f"{args.task} dev under embedding PGD",
  )
  print(f"{'epsilon':>8} {'accuracy':>9} {'loss':>8}  (n={rows[0]['num_examples']})")
  for row in rows:
    print(f"{row['epsilon']:8.3g} {row['accuracy']:9.4f} {row['loss']:8.4f}")
  return rows


if __name__ == "__main__":
  main()
