"""The jitted training steps the benchmarks time, and how they are timed and counted.

:func:`make_steps` builds SGD's step and the proximal steps (factored, per-example kernel
gradients formed whole, ``kernel_combine="materialized"``, vmap, sketched) of one model on one
batch (sequence classification, softmax cross-entropy, dropout off); :func:`bench` compiles
and times them interleaved, with XLA's FLOP count and memory estimate of each, skipping (with
a note) a step that needs more memory than the limit or the machine has free. Used by
experiments/bench_step.py, bench_sketch.py and bench_step_parts.py.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nearprox
from nearprox import layer_factors
from nearprox.text import models

GB = 1024.0**3
# The exact Gram with the per-example kernel gradients formed whole, never in blocks.
UNBLOCKED = layer_factors.GramBlocking(block_numbers=0)


def per_example_loss(model):
  """(params, ids, mask, labels) -> [B] softmax cross-entropy, dropout off. For a
  ``Seq2SeqTransformer`` the three arrays are (source ids, target input ids, target output
  ids) and the loss is one pair's mean token cross-entropy over its real target tokens."""
  if isinstance(model, models.Seq2SeqTransformer):
    return _translation_loss(model)

  def loss(params, ids, mask, labels):
    logits = model.apply({"params": params}, ids, attention_mask=mask, deterministic=True).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

  return loss


def _translation_loss(model):
  pad = model.config.pad_id

  def loss(params, source, target_in, target_out):
    logits = model.apply({"params": params}, source, target_in, deterministic=True)
    tokens = optax.softmax_cross_entropy_with_integer_labels(logits, target_out)
    real = (target_out != pad).astype(tokens.dtype)
    return jnp.sum(tokens * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1.0)

  return loss


def translation_batch(config, batch: int, length: int, seed: int = 0):
  """(source, target input, target output) of random sentence pairs, lengths uniform in
  [length/2, length] (eos included), padded to ``length``; ids as ``Seq2SeqConfig`` says."""
  rng = np.random.default_rng(seed)
  first_word = max(config.pad_id, config.bos_id, config.eos_id) + 1

  def sentences():
    words = rng.integers(first_word, config.vocab_size, size=(batch, length))
    lengths = rng.integers(length // 2, length + 1, size=batch)
    real = np.arange(length)[None] < lengths[:, None]
    ends = np.arange(length)[None] == lengths[:, None] - 1
    return np.where(ends, config.eos_id, np.where(real, words, config.pad_id)).astype(np.int32)

  source, target_out = sentences(), sentences()
  target_in = np.concatenate([np.full((batch, 1), config.bos_id, np.int32), target_out[:, :-1]], 1)
  target_in = np.where(target_out == config.pad_id, config.pad_id, target_in)
  return jnp.asarray(source), jnp.asarray(target_in), jnp.asarray(target_out)


def make_batch(vocab: int, batch: int, length: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000 if vocab > 2000 else 1, vocab, size=(batch, length)).astype(np.int32)
  lengths = rng.integers(length // 2, length + 1, size=batch)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  labels = rng.integers(0, 2, size=batch).astype(np.int32)
  return jnp.asarray(ids * mask), jnp.asarray(mask), jnp.asarray(labels)


def text_batch(tokenizer, batch: int, length: int, data_dir=None):
  """(ids, mask, labels, description): the first ``batch`` sentences of SST-2's dev split,
  tokenized to ``length``, or random tokens (``make_batch``) when there is no GLUE data."""
  from nearprox.text.data import DataError, load_task

  try:
    split = load_task("sst2", "dev", data_dir, source="tsv")
  except DataError:
    ids, mask, labels = make_batch(tokenizer.vocab_size, batch, length)
    return ids, mask, labels, "random tokens (no GLUE SST-2 data found)"
  encoded = tokenizer(
      list(split.text_a[:batch]),
      padding="max_length",
      max_length=length,
      truncation=True,
      return_tensors="np",
  )
  mask = np.asarray(encoded["attention_mask"], np.int32)
  description = (
      f"SST-2 dev sentences 1–{batch}, {int(mask.sum())} real tokens of {batch * length} "
      "(the rest padding)"
  )
  return (
      jnp.asarray(encoded["input_ids"], jnp.int32),
      jnp.asarray(mask),
      jnp.asarray(np.asarray(split.labels[:batch]), jnp.int32),
      description,
  )


def unblocked(tree):
  """``tree`` with every dense kernel factor's Gram formed whole (:data:`UNBLOCKED`)."""
  return jax.tree.map(
      lambda x: (
          dataclasses.replace(x, gram_blocking=UNBLOCKED)
          if isinstance(x, layer_factors.DenseFactor)
          else x
      ),
      tree,
      is_leaf=lambda x: isinstance(x, layer_factors.DenseFactor),
  )


def make_steps(model, learning_rate=1e-3, damping=1e-3, sketch_dims=(), gram_blocking=None):
  """{name: (step, optimizer)}; ``gram_blocking`` (a ``layer_factors.GramBlocking``, None for
  the default) applies to every factored step but "factored_unblocked", which forms G whole."""
  losses_of = per_example_loss(model)
  sgd = optax.sgd(learning_rate)
  prox = nearprox.proximal_sgd(learning_rate, damping, damping_mode="relative")
  blocking = {} if gram_blocking is None else {"gram_blocking": gram_blocking}

  def sgd_step(params, state, ids, mask, labels):
    loss, grads = jax.value_and_grad(lambda p: losses_of(p, ids, mask, labels).mean())(params)
    updates, state = sgd.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  def proximal_step(method, opt=prox, **factored_options):
    def step(params, state, ids, mask, labels):
      losses, grads = nearprox.per_example_value_and_grads(
          losses_of, params, ids, mask, labels, method=method, **factored_options
      )
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, losses.mean()

    return step

  steps = {
      "sgd": (sgd_step, sgd),
      "factored": (proximal_step("factored", **blocking), prox),
      "factored_unblocked": (proximal_step("factored", gram_blocking=UNBLOCKED), prox),
      "factored_kept": (
          proximal_step("factored", kernel_combine="materialized", **blocking),
          prox,
      ),
      "vmap": (proximal_step("vmap"), prox),
  }
  for k in sketch_dims:
    opt = nearprox.proximal_sgd(learning_rate, damping, damping_mode="relative", sketch_dim=k)
    steps[f"sketch{k}"] = (proximal_step("factored", opt, **blocking), opt)
  return steps


def _cost(compiled, key: str) -> float:
  """One entry of XLA's ``cost_analysis()`` of a compiled program (NaN when absent)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis.get(key, float("nan")))


def gflops(compiled) -> float:
  return _cost(compiled, "flops") / 1e9


def gbytes_accessed(compiled) -> float:
  """XLA's count of the bytes a compiled program reads and writes, in GB."""
  return _cost(compiled, "bytes accessed") / 1e9


def counted_gflops(compiled, unblocked_fn, *call_args) -> float:
  """XLA's FLOP count of ``compiled``. XLA counts a loop body once, so a step whose exact Gram
  runs in blocks (a while loop) is counted on ``unblocked_fn``, the same computation with G
  formed whole (the same products), called on ``call_args``; e.g. ``lambda *a: fn(*unblocked(a))``
  for a function of the factors, or the step of ``make_steps(..., gram_blocking=UNBLOCKED)``."""
  if " while(" not in compiled.as_text():
    return gflops(compiled)
  return gflops(jax.jit(unblocked_fn).lower(*call_args).compile())


def peak_bytes(compiled) -> float:
  stats = compiled.memory_analysis()
  return float(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes)


def available_bytes() -> float | None:
  """The memory the kernel says can still be given to processes (``MemAvailable`` of
  /proc/meminfo), None where that file is absent."""
  try:
    with open("/proc/meminfo") as meminfo:
      for line in meminfo:
        if line.startswith("MemAvailable:"):
          return float(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def release_memory() -> None:
  """Drops the compiled programs of earlier benchmarks and hands the heap's free pages back
  to the system (glibc's ``malloc_trim``): a process that has run many steps otherwise keeps
  gigabytes of freed buffers, and a large step after them was killed for memory."""
  jax.clear_caches()
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):  # not glibc
    pass


def bench(model, params, batch, length, names, repeats, max_gb, vocab, data=None, sketch_dims=()):
  """{name: Result} for the steps in ``names``, timed interleaved on the same batch
  (``data`` = (ids, mask, labels), default random tokens). A step whose XLA memory estimate
  exceeds ``max_gb`` GB, or the memory this machine has available with the steps compiled
  before it held, is not run (its time None, the reason in its note)."""
  release_memory()
  ids, mask, labels = make_batch(vocab, batch, length) if data is None else data
  steps = make_steps(model, sketch_dims=sketch_dims)
  unblocked_steps = make_steps(model, sketch_dims=sketch_dims, gram_blocking=UNBLOCKED)
  compiled, results = {}, {}
  for name in names:
    step, opt = steps[name]
    state = opt.init(params)
    exe = jax.jit(step).lower(params, state, ids, mask, labels).compile()
    call_args = (params, state, ids, mask, labels)
    peak, flops = peak_bytes(exe), counted_gflops(exe, unblocked_steps[name][0], *call_args)
    if peak > max_gb * GB:
      results[name] = [None, peak, flops, f"not run: needs ~{peak / GB:.1f} GB > {max_gb:g} GB"]
      continue
    free = available_bytes()
    if free is not None and peak > free:
      note = f"not run: needs ~{peak / GB:.1f} GB, {free / GB:.1f} GB available"
      results[name] = [None, peak, flops, note]
      continue
    compiled[name] = (exe, (params, state, ids, mask, labels))
    jax.block_until_ready(exe(*compiled[name][1]))  # warm-up
    results[name] = [float("inf"), peak, flops, ""]
  for _ in range(repeats):
    for name, (exe, call_args) in compiled.items():
      start = time.perf_counter()
      jax.block_until_ready(exe(*call_args))
      results[name][0] = min(results[name][0], time.perf_counter() - start)
  return results


def fmt_time(result):
  seconds = result[0]
  return "–" if seconds is None else f"{seconds * 1e3:.0f} ms"


def fmt_ratio(result, base):
  if result[0] is None or base[0] is None:
    return "–"
  return f"{result[0] / base[0]:.2f}×"


class MarkdownOutput:
  """A benchmark's Markdown file, written when the benchmark ends; until then every finished
  part is kept in ``<path>.partial``, so a run that dies (killed for memory, say) loses only
  the part it was in and leaves the last finished file as it was."""

  def __init__(self, path):
    self.path = Path(path)
    self.partial = self.path.with_name(self.path.name + ".partial")
    self.path.parent.mkdir(parents=True, exist_ok=True)

  def emit(self, lines: list[str], finished: list[str]) -> None:
    """Prints ``finished`` (the last lines added to ``lines``) and saves ``lines``."""
    print("\n".join(finished), flush=True)
    self.partial.write_text("\n".join(lines) + "\n")

  def finish(self, lines: list[str]) -> None:
    self.path.write_text("\n".join(lines) + "\n")
    self.partial.unlink(missing_ok=True)
    print(f"\nwritten to {self.path}")
