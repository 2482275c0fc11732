"""Benchmark: one process on every CPU vs. N processes pinned to a share each (total steps/s).

    python -m experiments.bench_workers [--workers=2] [--steps=6] [--model=minilm]

(``--model`` is experiments/bench_step.py's flag: this benchmark times its steps.)

It answers whether ``reproduce --workers=N --pin_workers`` trains a CPU study faster than one
process. Each probe (a fresh process) compiles the SGD step and the factored proximal step of
experiments/bench_step.py on one fixed batch of the study's shape (B=32, T=64), then times
``--steps`` steps of each. First one
probe runs alone on every CPU this process may use; then N probes start together, probe i
pinned to the i-th share of the CPUs (``taskset``, :func:`experiments.workers.cpu_shares`). The
throughput ratio is N × (alone's time per step) / (the pinned probes' mean time per step):
above 1, pinned workers finish more steps per second in total. Both phases run in the same
invocation, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

from experiments import (
    bench_harness,
    bench_step,  # noqa: F401  (defines --model, the model it times)
    workers,
)

_WORKERS = flags.DEFINE_integer("workers", 2, "pinned probes run together (N)")
_STEPS = flags.DEFINE_integer("steps", 6, "timed steps per step kind, after compilation")
_PROBE = flags.DEFINE_bool("probe", False, "internal: time the steps and print one JSON line")
STEPS = ("sgd", "factored")
BATCH, LENGTH = 32, 64  # the optimizer study's batch


def probe() -> dict[str, float]:
  """Seconds per step of each of ``STEPS`` in this process (after compiling them)."""
  import jax

  from nearprox.text import models

  model, params, _ = models.load_pretrained(flags.FLAGS.model, num_labels=2)
  steps = bench_harness.make_steps(model)
  batch = bench_harness.make_batch(model.config.vocab_size, BATCH, LENGTH)
  seconds = {}
  for name in STEPS:
    step, optimizer = steps[name]
    state = optimizer.init(params)
    compiled = jax.jit(step).lower(params, state, *batch).compile()
    p, s, _ = jax.block_until_ready(compiled(params, state, *batch))
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      p, s, _ = compiled(p, s, *batch)
    jax.block_until_ready(p)
    seconds[name] = (time.perf_counter() - start) / _STEPS.value
  return seconds


def launch(prefix: list[str]) -> subprocess.Popen:
  command = [sys.executable, "-m", "experiments.bench_workers", "--probe"]
  command += [f"--steps={_STEPS.value}", f"--model={flags.FLAGS.model}"]
  return subprocess.Popen([*prefix, *command], stdout=subprocess.PIPE, text=True)


def result(process: subprocess.Popen) -> dict[str, float]:
  out, _ = process.communicate()
  if process.returncode:
    raise RuntimeError(f"probe exited with status {process.returncode}")
  return json.loads(out.strip().splitlines()[-1])


def main(argv) -> None:
  del argv
  if _PROBE.value:
    print(json.dumps(probe()), flush=True)
    return
  shares = workers.cpu_shares(_WORKERS.value)  # fails early with too many workers
  prefixes = workers.pinned_prefixes(_WORKERS.value)
  cpus = sorted(os.sched_getaffinity(0))
  print(f"alone: one probe on CPUs {cpus} ...", flush=True)
  alone = result(launch([]))
  print(f"pinned: {len(shares)} probes on CPUs {shares} ...", flush=True)
  processes = [launch(prefix) for prefix in prefixes]
  pinned = [result(p) for p in processes]
  lines = [
      f"load average at the end: {os.getloadavg()[0]:.2f} on {len(cpus)} CPUs; "
      f"{flags.FLAGS.model}, B={BATCH}, T={LENGTH}, {_STEPS.value} timed steps each",
      "",
      "| step | alone (all CPUs) | pinned (mean of N) | N | steps/s, pinned ÷ alone |",
      "|---|---|---|---|---|",
  ]
  for name in STEPS:
    mean = sum(p[name] for p in pinned) / len(pinned)
    ratio = len(pinned) * alone[name] / mean
    lines.append(
        f"| {name} | {alone[name] * 1e3:.0f} ms | {mean * 1e3:.0f} ms | {len(pinned)} | "
        f"{ratio:.2f}× |"
    )
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
