"""Accuracy under an embedding-space PGD attack for a grid of ε: a CSV table and a PNG plot.

A thin layer over :mod:`nearprox.text.robustness`; it trains nothing. From Python, give it a
model, its params and batches (e.g. at the end of training):

    from experiments.robustness_eval import evaluate_and_write
    rows = evaluate_and_write(model, params, batches, [0, 0.25, 0.5, 1, 2],
                              "experiments/results/robustness_sst2")
    # -> robustness_sst2.csv, robustness_sst2.png

From the command line, on a Hugging Face BERT directory (``models.save_pretrained`` output,
or "minilm") and a task's dev split (``nearprox.text.data.load_task``):

    python -m experiments.robustness_eval --checkpoint=runs/sst2/hf_model --task=sst2 \\
        --data_dir=../shared/data/glue --epsilons=0,0.25,0.5,1,2 --max_examples=512 \\
        --out=experiments/results/robustness_sst2
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from nearprox.text import models, perturbations, robustness


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


def main(argv) -> None:
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # JAX's INFO line per backend not found
  from nearprox.text import data

  FLAGS = flags.FLAGS
  task = data.get_task(FLAGS.task)
  model, params, tokenizer = models.load_pretrained(FLAGS.checkpoint, num_labels=task.num_labels)
  split = data.load_task(task.name, "dev", FLAGS.data_dir, source=FLAGS.source)
  arrays = data.encode(split, tokenizer, FLAGS.max_length).arrays()
  keep = data.eval_subset(len(arrays["labels"]), FLAGS.max_examples, FLAGS.seed)
  if keep is not None:
    arrays = {k: v[keep] for k, v in arrays.items()}
  rows = evaluate_and_write(
      model,
      params,
      list(data.batches(arrays, FLAGS.batch_size, shuffle=False)),
      [float(e) for e in FLAGS.epsilons],
      FLAGS.out,
      num_steps=FLAGS.num_steps,
      step_size=FLAGS.step_size,
      norm=FLAGS.norm,
      title=f"{task.display_name} dev under embedding PGD",
  )
  print(f"{'epsilon':>8} {'accuracy':>9} {'loss':>8}  (n={rows[0]['num_examples']})")
  for row in rows:
    print(f"{row['epsilon']:8.3g} {row['accuracy']:9.4f} {row['loss']:8.4f}")


if __name__ == "__main__":  # flags only here: the module is also imported for its function
  flags.DEFINE_string("checkpoint", None, "Hugging Face BERT directory with a head, or 'minilm'")
  flags.DEFINE_string("task", None, "sst2, cola, mrpc, rte or tweets")
  flags.DEFINE_string("data_dir", None, "GLUE root (default $NEARPROX_GLUE_DIR)")
  flags.DEFINE_string("source", None, "tsv, tfds or csv (default: per task)")
  flags.DEFINE_list("epsilons", ["0", "0.25", "0.5", "1", "2"], "attack radii")
  flags.DEFINE_integer("num_steps", 10, "PGD steps K")
  flags.DEFINE_float("step_size", None, "PGD step (default 2.5·ε/K)")
  flags.DEFINE_enum("norm", "l2", perturbations.NORMS, "perturbation norm")
  flags.DEFINE_integer("max_length", 128, "tokens per example")
  flags.DEFINE_integer("batch_size", 32, "evaluation batch size")
  flags.DEFINE_integer("max_examples", 0, "seeded dev subset (0: the whole dev split)")
  flags.DEFINE_integer("seed", 0, "seed of the dev subset")
  flags.DEFINE_string("out", None, "output prefix (.csv and .png added)")
  flags.mark_flags_as_required(["checkpoint", "task", "out"])
  app.run(main)
