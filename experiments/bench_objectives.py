"""Step time of each training objective's gradient, as a ratio to plain cross-entropy.

Times ``jax.jit(jax.grad(mean of the per-example objective))`` for clean / FGM / PGD /
SMART on one batch, all in the same process: each repeat runs every objective once
(interleaved, so drift in machine load hits all alike) and the table shows the minimum over
repeats. The count of forward (F), full backward (B) and input-only backward (Bδ) passes is
the one documented in ``nearprox/objectives.py``.

    python experiments/bench_objectives.py                  # MiniLM-L6 shape (hidden 384)
    python experiments/bench_objectives.py --model tiny     # tiny_config (hidden 32)

Random weights: the cost does not depend on their values. Deterministic forward (no
dropout), CPU by default (set JAX_PLATFORMS to choose).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from nearprox.text import models, objectives  # noqa: E402

# all-MiniLM-L6-v2's shape (its config.json), without loading the weights.
MINILM = dict(
    vocab_size=30522,
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=12,
    intermediate_size=1536,
    max_position_embeddings=512,
)


def objective_table(num_steps: int) -> dict[str, tuple[objectives.ObjectiveConfig, str]]:
  k = num_steps
  return {
      "clean": (objectives.ObjectiveConfig(kind="clean"), "1F + 1B"),
      "fgm": (objectives.ObjectiveConfig(kind="fgm"), "2F + 2B + 1Bδ"),
      f"pgd K={k}": (
          objectives.ObjectiveConfig(kind="pgd", num_steps=k, random_start=False),
          f"{k + 1}F + 2B + {k}Bδ",
      ),
      f"pgd K={k} random start": (
          objectives.ObjectiveConfig(kind="pgd", num_steps=k),
          f"{k + 2}F + 2B + {k}Bδ",
      ),
      "smart K=1": (objectives.ObjectiveConfig(kind="smart"), "3F + 2B + 1Bδ"),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--num-steps", type=int, default=3, help="PGD K")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)

  config = models.tiny_config() if args.model == "tiny" else models.BertConfig(**MINILM)
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0), args.batch_size, args.seq_len)
  shape = (args.batch_size, args.seq_len)
  batch = dict(
      input_ids=jax.random.randint(jax.random.key(1), shape, 1, config.vocab_size),
      attention_mask=jnp.ones(shape, jnp.int32),
      labels=jax.random.randint(jax.random.key(2), shape[:1], 0, 2),
  )
  keys = jax.random.split(jax.random.key(3), args.batch_size)
  logits_fn = models.bert_logits_fn(model)

  steps = {}
  for name, (objective, passes) in objective_table(args.num_steps).items():
    loss_fn = objectives.make_per_example_loss(logits_fn, objective, hidden_size=config.hidden_size)
    grad = jax.jit(jax.grad(lambda p, b, k, f=loss_fn: jnp.mean(f(p, b, k))))
    jax.block_until_ready(grad(params, batch, keys))  # compile
    steps[name] = (grad, passes)

  best = {name: float("inf") for name in steps}
  for _ in range(args.repeats):
    for name, (grad, _) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(grad(params, batch, keys))
      best[name] = min(best[name], time.perf_counter() - start)

  print(
      f"model={args.model} (hidden {config.hidden_size}, {config.num_hidden_layers} layers) "
      f"B={args.batch_size} T={args.seq_len} device={jax.devices()[0].platform} "
      f"min of {args.repeats} interleaved repeats"
  )
  print(f"{'objective':<24} {'passes':<16} {'ms/step':>9} {'x clean':>8}")
  for name, (_, passes) in steps.items():
    print(f"{name:<24} {passes:<16} {1e3 * best[name]:9.1f} {best[name] / best['clean']:8.2f}")


if __name__ == "__main__":
  main()
