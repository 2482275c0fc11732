"""The estimated Gram's section of experiments/bench_step.py.

:func:`sketch_accuracy` compares the filtered gradient of ``scale_by_proximal(sketch_dim=k)``
with the exact one on one batch, and the sketched K̂ with K against the variance bound of
docs/method.md §2.9; :func:`family_rows` times other sketch families at equal k on the same
batch's dense kernels; :func:`sketch_section` times the sketched steps against SGD's and
writes the table (:func:`sketch_target_lines`: issue 14's targets). Functions of a model, its
params and a batch (ids, mask, labels).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import nearprox
from experiments.bench_harness import GB, bench, fmt_ratio, fmt_time, per_example_loss
from nearprox import factored_grads, layer_factors, sketch, spectral_filter
from nearprox.text import losses


def batch_factored_grads(model, params, data):
  """The factored per-example gradients of ``data`` = (ids, mask, labels)."""
  loss = per_example_loss(model)
  return jax.jit(lambda p: factored_grads.factored_value_and_grads(loss, p, *data)[1])(params)


def _flat_cosine(x, y):
  dot = sum(jnp.vdot(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in zip(x, y))
  norm = lambda t: jnp.sqrt(sum(jnp.vdot(a.astype(jnp.float32), a.astype(jnp.float32)) for a in t))
  return dot / (norm(x) * norm(y))


def sketch_accuracy(model, params, data, sketch_dims, counts=3, error_counts=10, damping=0.1):
  """{k: metrics} of the sketched filter against the exact one on one batch.

  Metrics: the minimum over ``counts`` sketch seeds (step counts 0, 1, …) of cos(d̂, d) for
  (filter, weights) in {tikhonov, natural} × {uniform, iEF}, at relative damping ``damping``;
  the root-mean-square over ``error_counts`` seeds of ‖K̂ − K‖_F/‖K‖_F and of the same
  restricted to the sketched leaves, and the bound √(Σ c·tr(K_leaf)²)/‖K‖_F on the first
  (docs/method.md §2.9).
  """
  ids, mask, labels = data
  grads = batch_factored_grads(model, params, data)
  logits = jax.jit(
      lambda p: model.apply({"params": p}, ids, attention_mask=mask, deterministic=True).logits
  )(params)
  ief = losses.cross_entropy_logit_grad_sq_norm(logits, labels)
  settings = [(f, w) for f in ("tikhonov", "natural") for w in ("uniform", "iEF")]

  @functools.partial(jax.jit, static_argnames="sketch_dim")
  def directions(grads, count, sketch_dim):
    """d of every setting, in one program (one compile; the Gram or sketch is shared)."""
    out = []
    for filter, weights in settings:
      tx = nearprox.scale_by_proximal(
          damping, filter=filter, damping_mode="relative", sketch_dim=sketch_dim
      )
      state = tx.init(None)._replace(count=count)
      d, _ = tx.update(grads, state, example_weights=ief if weights == "iEF" else None)
      out.append(jax.tree.leaves(d))
    return out

  cosine = jax.jit(_flat_cosine)
  zero = jnp.zeros((), jnp.int32)
  exact = dict(zip(settings, directions(grads, zero, None)))
  leaf_grams = jax.jit(
      lambda g: [spectral_filter.gram_matrix([x]) for _, x in spectral_filter.per_example_leaves(g)]
  )(grads)
  leaf_grams = [np.asarray(k, np.float64) for k in leaf_grams]
  gram = sum(leaf_grams)
  gram_norm = np.linalg.norm(gram)
  out = {}
  for k in sketch_dims:
    factors = sketch.variance_factors(grads, k)
    sketched_exact = sum(
        (g for g, c in zip(leaf_grams, factors) if c is not None), np.zeros_like(gram)
    )
    bound = np.sqrt(sum(c * np.trace(g) ** 2 for g, c in zip(leaf_grams, factors) if c))
    estimate = jax.jit(lambda g, c, k=k: sketch.sketch_per_example(g, c, k).features)
    cosines = {setting: [] for setting in settings}
    errors, sketched_errors = [], []
    for count in range(max(counts, error_counts)):
      count = jnp.asarray(count, jnp.int32)
      phi = estimate(grads, count)  # None when k leaves every leaf exact
      phi = np.zeros((len(gram), 0)) if phi is None else np.asarray(phi, np.float64)
      error = np.sum((phi @ phi.T - sketched_exact) ** 2)
      errors.append(error / gram_norm**2)
      sketched_errors.append(error / max(np.sum(sketched_exact**2), 1e-30))
      if int(count) >= counts:
        continue
      for setting, d_hat in zip(settings, directions(grads, count, k)):
        cosines[setting].append(float(cosine(d_hat, exact[setting])))
    out[k] = {
        "sketched": sum(c is not None for c in factors),
        "features": int(phi.shape[1]),
        "cos": {setting: min(values) for setting, values in cosines.items()},
        "error": float(np.sqrt(np.mean(errors))),
        "sketched_error": float(np.sqrt(np.mean(sketched_errors))),
        "bound": float(bound / gram_norm),
        "sketched_share": float(np.trace(sketched_exact) / np.trace(gram)),
    }
  return out


def _count_sketch(x, key, k):
  """[..., d] -> [..., k]: each coordinate added, with a random sign, into a random bucket."""
  buckets = jax.random.randint(jax.random.fold_in(key, 0), (x.shape[-1],), 0, k)
  signs = jax.random.rademacher(jax.random.fold_in(key, 1), (x.shape[-1],), x.dtype)
  moved = jnp.moveaxis(x * signs, -1, 0)
  return jnp.moveaxis(jax.ops.segment_sum(moved, buckets, num_segments=k), 0, -1)


def _gaussian_kronecker(a, d, key, k1, k2):
  s1 = jax.random.normal(jax.random.fold_in(key, 0), (a.shape[-1], k1)) / np.sqrt(k1)
  s2 = jax.random.normal(jax.random.fold_in(key, 1), (d.shape[-1], k2)) / np.sqrt(k2)
  return jnp.einsum("btr,bts->brs", a @ s1, d @ s2).reshape(a.shape[0], -1)


def _count_kronecker(a, d, key, k1, k2):
  x = _count_sketch(a, jax.random.fold_in(key, 0), k1)
  y = _count_sketch(d, jax.random.fold_in(key, 1), k2)
  return jnp.einsum("btr,bts->brs", x, y).reshape(a.shape[0], -1)


def _tensor_sketch(a, d, key, k1, k2):
  """TensorSketch (Pham & Pagh 2013): count sketches of a and δ to k = k₁k₂ buckets, multiplied
  in Fourier space (a circular convolution: the sketch of a ⊗ δ), summed over positions."""
  k = k1 * k2
  fa = jnp.fft.rfft(_count_sketch(a, jax.random.fold_in(key, 0), k), axis=-1)
  fd = jnp.fft.rfft(_count_sketch(d, jax.random.fold_in(key, 1), k), axis=-1)
  return jnp.fft.irfft(jnp.sum(fa * fd, axis=1), n=k, axis=-1)


SKETCH_FAMILIES = {
    "Kronecker, Rademacher S₁, S₂ (the library's)": sketch.kronecker_features,
    "Kronecker, Gaussian S₁, S₂": _gaussian_kronecker,
    "Kronecker, count sketches S₁, S₂": _count_kronecker,
    "TensorSketch (count sketches + FFT)": _tensor_sketch,
}


def family_rows(model, params, data, sketch_dims, repeats, seeds=5) -> list[str]:
  """Rows comparing sketch families at equal k on the MiniLM batch's dense kernels (those the
  library sketches at that k): the time to compute K̂'s sketched part, and its relative error
  (root-mean-square over ``seeds``)."""
  grads = batch_factored_grads(model, params, data)
  rows = []
  for k in sketch_dims:
    flags = sketch.sketched_leaves(grads, k)
    kernels = [
        leaf
        for (path, leaf) in spectral_filter.per_example_leaves(grads)
        if flags[path] and isinstance(leaf, layer_factors.DenseFactor)
    ]
    exact = np.asarray(jax.jit(spectral_filter.gram_matrix)(kernels), np.float64)
    compiled = {}
    for name, features in SKETCH_FAMILIES.items():

      def gram(kernels, key, features=features):
        total = 0.0
        for index, leaf in enumerate(kernels):
          k1, k2 = sketch.side_dims(*leaf.matrix_shape, k)
          phi = features(leaf.inputs, leaf.cotangents, jax.random.fold_in(key, index), k1, k2)
          total = total + phi @ phi.T
        return total

      compiled[name] = jax.jit(gram).lower(kernels, jax.random.key(0)).compile()
    best = {name: float("inf") for name in compiled}
    errors = {name: [] for name in compiled}
    for seed in range(max(seeds, repeats)):
      for name, exe in compiled.items():
        start = time.perf_counter()
        estimate = np.asarray(jax.block_until_ready(exe(kernels, jax.random.key(seed))), np.float64)
        best[name] = min(best[name], time.perf_counter() - start)
        if seed < seeds:
          errors[name].append(np.sum((estimate - exact) ** 2) / np.sum(exact**2))
    base = best[next(iter(best))]
    for name in compiled:
      rows.append(
          f"| {k} | {len(kernels)} | {name} | {best[name] * 1e3:.0f} ms | "
          f"{best[name] / base:.2f}× | {np.sqrt(np.mean(errors[name])):.3f} |"
      )
  return rows


SKETCH_HEADER = [
    "| k | leaves sketched | their share of trace(K) | features / example | time | × SGD "
    "| FLOPs × SGD | peak memory | × SGD | cos tikhonov | cos natural | cos tikhonov, iEF "
    "| cos natural, iEF | ‖K̂−K‖/‖K‖ | bound | sketched leaves' ‖K̂−K‖/‖K‖ |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def sketch_rows(results, accuracy, sketch_dims) -> list[str]:
  sgd, exact = results["sgd"], results["factored"]
  rows = [
      f"| exact | 0 | 0 | – | {fmt_time(exact)} | {fmt_ratio(exact, sgd)} | "
      f"{exact[2] / sgd[2]:.2f}× | {exact[1] / GB:.2f} GB | {exact[1] / sgd[1]:.2f}× "
      "| 1 | 1 | 1 | 1 | 0 | 0 | 0 |"
  ]
  for k in sketch_dims:
    r, a = results[f"sketch{k}"], accuracy[k]
    cos = " | ".join(f"{a['cos'][s]:.4f}" for s in a["cos"])
    rows.append(
        f"| {k} | {a['sketched']} | {a['sketched_share']:.1%} | {a['features']:,} | "
        f"{fmt_time(r)} | {fmt_ratio(r, sgd)} | {r[2] / sgd[2]:.2f}× | {r[1] / GB:.2f} GB | "
        f"{r[1] / sgd[1]:.2f}× | {cos} | {a['error']:.4f} | {a['bound']:.4f} | "
        f"{a['sketched_error']:.3f} |"
    )
  return rows


def sketch_target_lines(results, accuracy, sketch_dims) -> list[str]:
  """Issue #14's targets (MiniLM, B=32, T=64, real text), checked at every k."""
  sgd = results["sgd"]
  verdict = lambda ok: "met" if ok else "**missed**"
  lines = [
      "Targets, per k: step ≤ 1.15× SGD's time, peak memory ≤ 1.2× SGD's, and cos(d̂, d) ≥ 0.99 "
      "for both filters with uniform and iEF weights (the worst of the four):",
      "",
  ]
  for k in sketch_dims:
    time_ratio = results[f"sketch{k}"][0] / sgd[0]
    memory = results[f"sketch{k}"][1] / sgd[1]
    worst = min(accuracy[k]["cos"].values())
    lines.append(
        f"- k = {k}: time {time_ratio:.2f}× → {verdict(time_ratio <= 1.15)}; memory "
        f"{memory:.2f}× → {verdict(memory <= 1.2)}; cos {worst:.4f} → {verdict(worst >= 0.99)}"
        f" (‖K̂−K‖/‖K‖ = {accuracy[k]['error']:.4f})"
    )
  return lines


def sketch_section(title, model, params, data, sketch_dims, repeats, max_gb, note) -> list[str]:
  """The sketch table of one setting (and the targets for MiniLM)."""
  names = ("sgd", "factored", *(f"sketch{k}" for k in sketch_dims))
  batch, length = data[0].shape
  results = bench(
      model, params, batch, length, names, repeats, max_gb, None, data=data, sketch_dims=sketch_dims
  )
  skipped = [name for name in names if results[name][0] is None]
  if skipped:
    return [f"### {title}", "", f"not run: {'; '.join(results[n][3] for n in skipped)}", ""], None
  accuracy = sketch_accuracy(model, params, data, sketch_dims)
  return [
      f"### {title}",
      "",
      f"- data: {note}.",
      "",
      *SKETCH_HEADER,
      *sketch_rows(results, accuracy, sketch_dims),
      "",
  ], (results, accuracy)
