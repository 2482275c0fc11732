"""Benchmark: one SGD step vs. one proximal step (factored and vmap per-example gradients).

    python -m experiments.bench_step            # full: MiniLM, BERT-base shapes, B/T scaling
    python -m experiments.bench_step --quick    # MiniLM B=32 T=64 only, fewer repeats

For each setting it jits three train steps on the same batch (sequence classification,
softmax cross-entropy, dropout off so the vmap oracle is comparable):

  (i)   SGD:       value_and_grad of the mean loss, optax.sgd update, apply_updates;
  (ii)  factored:  nearprox.per_example_value_and_grads(method="factored"),
                   nearprox.proximal_sgd update (damping_mode="relative"), apply_updates;
  (ii-b)           the same with kernel_combine="materialized" (per-example kernel
                   gradients kept from the Gram to the combine: fewer FLOPs, more memory);
  (iii) vmap:      the same with method="vmap" (materializes the B × P per-example gradients);
  (iv)  sketched:  the factored step with ``sketch_dim=k`` (an estimated Gram, docs/method.md
                   §2.9), for several k, with the accuracy of its filtered gradient.

The sketch section runs on real text (the first B sentences of SST-2's dev split, from
--data_dir or $NEARPROX_GLUE_DIR; random tokens when neither is there, and the output says
so) and compares, per k, the step's time and memory with SGD's and the sketched filtered
gradient d̂ with the exact d: cos(d̂, d) for both filters at relative damping 0.1, with uniform
and with iEF weights (the minimum over three sketch seeds, i.e. step counts), and the relative
Frobenius error ‖K̂ − K‖/‖K‖ (root-mean-square over ten seeds); experiments/bench_sketch.py
holds these measurements, experiments/bench_harness.py the steps and their timing.

Times are the minimum over interleaved repeats after compilation (so a busy machine slows
all of them alike); ratios are to the SGD step of the same run. FLOPs are XLA's
``compiled.cost_analysis()`` count (machine independent). Peak memory is XLA's static
estimate ``compiled.memory_analysis()``: temp + argument + output bytes. Settings whose
estimate exceeds --max_gb, or the memory the machine has available at that point, are not
run and reported as such. The markdown table is printed and written to
experiments/results/bench_step.md (--output); while the run goes on, every finished part is
kept in ``<output>.partial`` (removed at the end), so a run that dies loses only the part it
was in and leaves the last finished output as it was.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

import nearprox
from experiments import bench_sketch
from experiments.bench_harness import (
    GB,
    MarkdownOutput,
    bench,
    counted_gflops,
    fmt_ratio,
    fmt_time,
    make_batch,
    per_example_loss,
    text_batch,
    translation_batch,
    unblocked,
)
from nearprox import sketch, spectral_filter
from nearprox.text import models

_QUICK = flags.DEFINE_bool("quick", False, "MiniLM B=32 T=64 only (no BERT-base, no scaling)")
_REPEATS = flags.DEFINE_integer("repeats", None, "timed repeats per step (default 5, quick 3)")
_MAX_GB = flags.DEFINE_float(
    "max_gb", 16.0, "skip settings whose peak memory estimate exceeds this"
)
_BERT_BASE = flags.DEFINE_bool("bert_base", True, "also the BERT-base shapes")
_SCALING = flags.DEFINE_bool("scaling", True, "also the batch size / sequence length sweep")
_SKETCH_DIMS = flags.DEFINE_list(
    "sketch_dims", ["256", "1024", "4096", "16384"], "k of the sketch table (MiniLM)"
)
_BERT_SKETCH_DIMS = flags.DEFINE_list(
    "bert_sketch_dims", ["1024", "4096"], "k of the sketch table (BERT-base shapes)"
)
_FAMILY_DIMS = flags.DEFINE_list(
    "family_dims", ["256", "1024", "4096"], "k of the family comparison"
)
_MODEL = flags.DEFINE_string(
    "model", "minilm", "the pretrained model of the MiniLM rows: 'minilm' or a checkpoint directory"
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "GLUE root with SST-2/dev.tsv (default $NEARPROX_GLUE_DIR)"
)
_TRANSLATION = flags.DEFINE_list(
    "translation",
    ["8000", "3", "256", "64", "32"],
    "the translation row's vocab, layers per stack, hidden size, batch (sentence pairs) and "
    "length (tokens per side); empty: no translation row (--quick: no vmap step in it)",
)
_OUTPUT = flags.DEFINE_string(
    "output", os.path.join(os.path.dirname(__file__), "results", "bench_step.md"), "Markdown file"
)


def target_lines(results) -> list[str]:
  """Issue #4's targets on MiniLM B=32 T=64, checked against this run's numbers."""
  sgd, fac, vmap = results["sgd"], results["factored"], results.get("vmap")
  lines = []

  def check(text, value, limit, lower_is_better=True):
    met = value <= limit if lower_is_better else value >= limit
    lines.append(f"- {text}: {value:.2f}× → {'met' if met else '**missed**'}")

  if fac[0] is not None and sgd[0] is not None:
    check("target factored step ≤ 1.3× the SGD step", fac[0] / sgd[0], 1.3)
    if vmap and vmap[0] is not None:
      check(
          "target factored step ≥ 3× faster than the vmap step",
          vmap[0] / fac[0],
          3.0,
          lower_is_better=False,
      )
  check("target factored peak memory ≤ 1.5× SGD's", fac[1] / sgd[1], 1.5)
  return lines


def breakdown(model, params, batch, length, repeats, vocab, sketch_dim) -> list[str]:
  """Rows timing the parts of the factored proximal step against SGD's gradient, with the
  FLOPs of each part (XLA's count) next to its time."""
  ids, mask, labels = make_batch(vocab, batch, length)
  losses_of = per_example_loss(model)
  prox = nearprox.proximal_sgd(1e-3, 1e-3, damping_mode="relative")
  sketched = nearprox.proximal_sgd(1e-3, 1e-3, damping_mode="relative", sketch_dim=sketch_dim)
  state = prox.init(params)
  capture = jax.jit(
      lambda p: nearprox.per_example_value_and_grads(
          losses_of, p, ids, mask, labels, method="factored"
      )
  )
  factors_ = capture(params)[1]
  count = jnp.zeros((), jnp.int32)
  coeffs = jnp.full((batch,), 1.0 / batch)

  def sketch_gram(f, c):
    return sketch.estimated_gram(sketch.sketch_per_example(f, c, sketch_dim))

  def combine_factored(f, c):  # every kernel as Aᵀ(c∘Δ), as in the sketched step
    return spectral_filter.combine(sketch.sketch_per_example(f, count, sketch_dim).for_combine, c)

  parts = {
      "forward (loss only)": (lambda p: losses_of(p, ids, mask, labels).mean(), (params,)),
      "SGD: value_and_grad of the mean loss": (
          jax.value_and_grad(lambda p: losses_of(p, ids, mask, labels).mean()),
          (params,),
      ),
      "factored: capture (forward + backward, factors)": (capture, (params,)),
      "factored: exact Gram K, per-example kernel gradients formed whole": (
          lambda f: spectral_filter.gram_matrix(f),
          (unblocked(factors_),),
      ),
      "factored: exact Gram K, G formed in cached blocks (default)": (
          lambda f: spectral_filter.gram_matrix(f),
          (factors_,),
      ),
      f"sketched: K̂ (sketch_dim={sketch_dim})": (sketch_gram, (factors_, count)),
      "combine: Aᵀ(c∘Δ) for every kernel": (combine_factored, (factors_, coeffs)),
      "factored: proximal update (Gram + solve + combine)": (
          lambda f, s, p: prox.update(f, s, p)[0],
          (factors_, state, params),
      ),
      f"sketched: proximal update (sketch_dim={sketch_dim})": (
          lambda f, s, p: sketched.update(f, s, p)[0],
          (factors_, sketched.init(params), params),
      ),
  }
  compiled, best, flops = {}, {}, {}
  for name, (fn, call_args) in parts.items():
    compiled[name] = jax.jit(fn).lower(*call_args).compile()
    flops[name] = counted_gflops(compiled[name], lambda *a, fn=fn: fn(*unblocked(a)), *call_args)
    jax.block_until_ready(compiled[name](*call_args))
    best[name] = float("inf")
  for _ in range(repeats):
    for name, (_, call_args) in parts.items():
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](*call_args))
      best[name] = min(best[name], time.perf_counter() - start)
  base = "SGD: value_and_grad of the mean loss"
  return [
      f"| {name} | {seconds * 1e3:.0f} ms | {seconds / best[base]:.2f}× | "
      f"{flops[name] / flops[base]:.2f}× |"
      for name, seconds in best.items()
  ]


LABELS = (
    ("sgd", "(i) SGD"),
    ("factored", "(ii) proximal, factored (default)"),
    ("factored_unblocked", "(ii-a) the same, per-example kernel gradients formed whole"),
    ("factored_kept", "(ii-b) proximal, factored, kernel_combine='materialized'"),
    ("vmap", "(iii) proximal, vmap"),
)


def comparison_rows(title, results):
  sgd = results["sgd"]
  rows = []
  for name, label in LABELS:
    if name not in results:
      continue
    r = results[name]
    rows.append(
        f"| {title} | {label} | {fmt_time(r)} | {fmt_ratio(r, sgd)} | "
        f"{r[2] / sgd[2]:.2f}× | {r[1] / GB:.2f} GB | {r[1] / sgd[1]:.2f}× | {r[3]} |"
    )
  return rows


def translation_rows(vocab, layers, hidden, batch, length, steps, repeats) -> list[str]:
  """The encoder–decoder of issue 39 (random weights, random pairs): ``steps`` of SGD, the
  factored proximal step (tied output projection included) and the vmap oracle."""
  config = models.Seq2SeqConfig(
      vocab_size=vocab,
      num_encoder_layers=layers,
      num_decoder_layers=layers,
      hidden_size=hidden,
      num_heads=max(1, hidden // 64),
      intermediate_size=4 * hidden,
      max_length=length,
  )
  model = models.Seq2SeqTransformer(config)
  params = models.init_seq2seq(config, jax.random.key(0))
  size = sum(x.size for x in jax.tree.leaves(params)) / 1e6
  data = translation_batch(config, batch, length)
  results = bench(model, params, batch, length, steps, repeats, _MAX_GB.value, vocab, data)
  title = (
      f"Translation {layers}+{layers} layers, d={hidden}, V={vocab} ({size:.1f}M params), "
      f"B={batch} pairs, T={length}"
  )
  return comparison_rows(title, results)


def header(command: str) -> list[str]:
  return [
      "# Step-time benchmark: SGD vs. proximal step (factored / vmap per-example gradients)",
      "",
      f"- machine: {platform.machine()} {platform.processor() or platform.platform()}, "
      f"{os.cpu_count()} CPUs, jax {jax.__version__}, devices {jax.devices()}, float32 matmul "
      f"precision {jax.config.jax_default_matmul_precision or 'default'}",
      f"- command: `{command}`",
      f"- load average when the run started: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
      "(other processes may share them; interleaved repeats slow every step alike).",
      "- time: min over interleaved repeats after compile; memory: XLA memory_analysis() "
      "temp + argument + output bytes of the jitted step; dropout off; proximal step = "
      "nearprox.proximal_sgd(damping=1e-3, damping_mode='relative').",
      "- FLOPs: XLA cost_analysis() of the compiled step (deterministic; a step with the exact "
      "Gram in blocks is counted on its unblocked twin, as XLA counts a loop body once); wall "
      "times on a shared "
      "machine are noisy, compare them with the FLOPs column. Lower bound of the factored step "
      "for the dense kernels: (4T + B)/(3T) × SGD with the factored combine, (3T + B)/(3T) with "
      "kernel_combine='materialized' (nearprox/factored_grads.py docstring).",
      "",
  ]


def main(argv) -> None:
  del argv
  repeats = _REPEATS.value or (3 if _QUICK.value else 5)
  sketch_dims = [int(k) for k in _SKETCH_DIMS.value]
  lines = header(" ".join(["python -m experiments.bench_step", *sys.argv[1:]]))
  output = MarkdownOutput(_OUTPUT.value)
  emit = lambda finished: output.emit(lines, finished)  # ``finished``: the lines just added
  lines += [
      "## Step time and peak memory, relative to SGD",
      "",
      "| setting | step | time | × SGD | FLOPs × SGD | peak memory | × SGD | note |",
      "|---|---|---|---|---|---|---|---|",
  ]
  steps = ("sgd", "factored", "factored_unblocked", "factored_kept", "vmap")

  minilm, minilm_params, tokenizer = models.load_pretrained(_MODEL.value, num_labels=2)
  vocab = minilm.config.vocab_size
  results = bench(minilm, minilm_params, 32, 64, steps, repeats, _MAX_GB.value, vocab)
  lines += comparison_rows("MiniLM-L6 (22.7M params), B=32, T=64", results)
  emit(lines)
  if _TRANSLATION.value:
    steps_ = ("sgd", "factored") if _QUICK.value else ("sgd", "factored", "vmap")
    row = translation_rows(*(int(v) for v in _TRANSLATION.value), steps_, repeats)
    lines += row
    emit(row)

  base = base_params = None
  if not _QUICK.value and _BERT_BASE.value:
    config = models.BertConfig(num_labels=2)  # BERT-base: 12 layers, hidden 768, FFN 3072
    base = models.BertForSequenceClassification(config)
    base_params = models.init_params(base, jax.random.key(0), 2, 8)
    for batch in (32, 8):
      base_results = bench(
          base,
          base_params,
          batch,
          128,
          steps,
          max(2, repeats // 2),
          _MAX_GB.value,
          config.vocab_size,
      )
      if base_results["factored"][0] is not None:
        break
    row = comparison_rows(f"BERT-base shapes (random weights), B={batch}, T=128", base_results)
    lines += row
    emit(row)

  start = len(lines)
  lines += ["", *target_lines(results)]
  sketch_dim = sketch_dims[len(sketch_dims) // 2]
  lines += [
      "",
      "## Where the factored step's time goes (MiniLM, B=32, T=64)",
      "",
      "| part | time | × SGD value_and_grad | FLOPs × SGD value_and_grad |",
      "|---|---|---|---|",
  ]
  lines += breakdown(minilm, minilm_params, 32, 64, repeats, vocab, sketch_dim)
  lines += [
      "",
      "The exact Gram's FLOPs are B·T·P (per-example kernel gradients) + B²·P (G Gᵀ) over the "
      "P dense-kernel parameters, (T + B)/(3T) = 0.5 of a value_and_grad's 3·B·T·P at B=32, "
      "T=64. Formed whole, G (B·d_in·d_out numbers per layer) goes to memory and back between "
      "the two products; the default forms it in blocks of columns of its longer side that stay in cache "
      "(nearprox/layer_factors.py, docs/method.md §2.7). Time ratios above their FLOP ratios "
      "are throughput the part loses against SGD's own matmuls on this machine.",
      "",
  ]
  emit(lines[start:])

  start = len(lines)
  lines += [
      "## Estimated Gram: scale_by_proximal(sketch_dim=k)",
      "",
      "Each sketched leaf contributes Φ Φᵀ (Φ its Kronecker sketch, k₁·k₂ ≈ k features per "
      "example); leaves whose exact Gram is cheaper stay exact (docs/method.md §2.9). Times and "
      "memory as above; cos(d̂, d) between the sketched and the exact filtered gradient at "
      "relative damping 0.1, minimum over three sketch seeds (step counts); ‖K̂−K‖/‖K‖: "
      "root-mean-square over ten seeds, next to its bound √(Σ c·tr(K_leaf)²)/‖K‖ from the "
      "variance bound, and the same error relative to the sketched leaves' own part of K.",
      "",
  ]
  data = text_batch(tokenizer, 32, 64, _DATA_DIR.value)
  section, measured = bench_sketch.sketch_section(
      "MiniLM-L6, B=32, T=64",
      minilm,
      minilm_params,
      data[:3],
      sketch_dims,
      repeats,
      _MAX_GB.value,
      data[3],
  )
  lines += section
  if measured is not None:
    lines += [*bench_sketch.sketch_target_lines(*measured, sketch_dims), ""]
  lines += [
      "#### Sketch families at equal k (the same batch's dense kernels)",
      "",
      "Time to compute the sketched kernels' part of K̂ (all of them, one jitted function; × the "
      "library's family) and its error relative to their exact part (root-mean-square over five "
      "seeds). Each family has k₁k₂ features per kernel (docs/method.md §2.9).",
      "",
      "| k | kernels | family | time | × library's | ‖K̂−K‖/‖K‖ (sketched kernels) |",
      "|---|---|---|---|---|---|",
      *bench_sketch.family_rows(
          minilm, minilm_params, data[:3], [int(k) for k in _FAMILY_DIMS.value], repeats
      ),
      "",
  ]
  emit(lines[start:])

  if base is not None:
    bert_dims = [int(k) for k in _BERT_SKETCH_DIMS.value]
    ids, mask, labels = make_batch(base.config.vocab_size, 32, 128)
    section, _ = bench_sketch.sketch_section(
        "BERT-base shapes (random weights), B=32, T=128",
        base,
        base_params,
        (ids, mask, labels),
        bert_dims,
        max(2, repeats // 2),
        _MAX_GB.value,
        "random tokens and random weights (a pretrained BERT-base is not stored here)",
    )
    lines += section
    emit(section)

  if not _QUICK.value and _SCALING.value:
    lines += [
        "",
        "## Factored proximal step vs. batch size B and sequence length T (MiniLM)",
        "",
        "| B | T | SGD | factored | × SGD | FLOPs × SGD | factored peak memory | × SGD " "| note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    emit(lines[-4:])
    for batch in (8, 32, 128):
      for length in (32, 128, 512):
        results = bench(
            minilm,
            minilm_params,
            batch,
            length,
            ("sgd", "factored"),
            2 if batch * length >= 16384 else 3,
            _MAX_GB.value,
            vocab,
        )
        sgd, fac = results["sgd"], results["factored"]
        note = fac[3] or sgd[3]
        row = (
            f"| {batch} | {length} | {fmt_time(sgd)} | {fmt_time(fac)} | "
            f"{fmt_ratio(fac, sgd)} | {fac[2] / sgd[2]:.2f}× | {fac[1] / GB:.2f} GB | "
            f"{fac[1] / sgd[1]:.2f}× | {note} |"
        )
        lines.append(row)
        emit([row])

  output.finish(lines)


if __name__ == "__main__":
  app.run(main)
