"""Step time of each training objective's gradient, as a ratio to plain cross-entropy.

Times ``jax.jit(jax.grad(mean of the per-example objective))`` for clean / FGM / PGD /
SMART on one batch, all in the same process: each repeat runs every objective once
(interleaved, so drift in machine load hits all alike) and the table shows the minimum over
repeats. The count of forward (F), full backward (B) and input-only backward (Bδ) passes is
the one documented in ``nearprox/text/objectives.py``.

    python -m experiments.bench_objectives                  # MiniLM-L6 shape (hidden 384)
    python -m experiments.bench_objectives --model=tiny     # tiny_config (hidden 32)

Random weights: the cost does not depend on their values. Deterministic forward (no
dropout), CPU by default (set JAX_PLATFORMS to choose).
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

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


_MODEL = flags.DEFINE_enum("model", "minilm", ("minilm", "tiny"), "model shape (random weights)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "examples per batch")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "tokens per example")
_NUM_STEPS = flags.DEFINE_integer("num_steps", 3, "PGD K")
_REPEATS = flags.DEFINE_integer("repeats", 5, "interleaved timed repeats")


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


def main(argv) -> None:
  del argv
  batch_size, seq_len, repeats = _BATCH_SIZE.value, _SEQ_LEN.value, _REPEATS.value
  if _MODEL.value == "tiny":  # positions for --seq_len (tiny_config has 32)
    config = models.tiny_config(max_position_embeddings=max(32, seq_len))
  else:
    config = models.BertConfig(**MINILM)
  model = models.BertForSequenceClassification(config)
  params = models.init_params(model, jax.random.key(0), batch_size, seq_len)
  shape = (batch_size, seq_len)
  batch = dict(
      input_ids=jax.random.randint(jax.random.key(1), shape, 1, config.vocab_size),
      attention_mask=jnp.ones(shape, jnp.int32),
      labels=jax.random.randint(jax.random.key(2), shape[:1], 0, 2),
  )
  keys = jax.random.split(jax.random.key(3), batch_size)
  logits_fn = models.bert_logits_fn(model)

  steps = {}
  for name, (objective, passes) in objective_table(_NUM_STEPS.value).items():
    loss_fn = objectives.make_per_example_loss(logits_fn, objective, hidden_size=config.hidden_size)
    grad = jax.jit(jax.grad(lambda p, b, k, f=loss_fn: jnp.mean(f(p, b, k))))
    jax.block_until_ready(grad(params, batch, keys))  # compile
    steps[name] = (grad, passes)

  best = {name: float("inf") for name in steps}
  for _ in range(repeats):
    for name, (grad, _) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(grad(params, batch, keys))
      best[name] = min(best[name], time.perf_counter() - start)

  print(
      f"model={_MODEL.value} (hidden {config.hidden_size}, {config.num_hidden_layers} layers) "
      f"B={batch_size} T={seq_len} device={jax.devices()[0].platform} "
      f"min of {repeats} interleaved repeats"
  )
  print(f"{'objective':<24} {'passes':<16} {'ms/step':>9} {'x clean':>8}")
  for name, (_, passes) in steps.items():
    print(f"{name:<24} {passes:<16} {1e3 * best[name]:9.1f} {best[name] / best['clean']:8.2f}")


if __name__ == "__main__":
  app.run(main)
