"""Where the sketched training step's time goes, against AdamW's training step (issue 40).

experiments/bench_optimizers.py times whole training steps; :func:`breakdown` takes one
sketched variant's step apart, on the same batch and in the same process: the two training
steps whole (``train.step_functions``, jitted without donation so every call reads the same
state), the parts each of them runs (the mean loss's value_and_grad, the per-example capture
with and without the iEF weights, each optimizer update, the logged metrics), and the
zeroing of a masked example's rows that the training step leaves out
(``scale_by_proximal(zero_masked_rows=False)``). Each part is jitted alone; the rounds run
every part in turn and a part's time is its minimum over them, so load that changes during
the measurement hits all of them alike. Next to each time: XLA's FLOP count and bytes
accessed (``cost_analysis()``, machine and load independent), all as multiples of AdamW's
step. A part alone keeps in memory what the whole step can fuse away, so the parts need not
add up to the step exactly.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import nearprox
from experiments.bench_harness import gbytes_accessed, gflops
from nearprox import spectral_filter
from nearprox.text import data, objectives
from nearprox.training import optimizers, task_io, train

ADAMW_STEP = "AdamW: training step"


def _logged_metrics(params, updates, losses, mask, l2_weight):
  """What train_step logs beside the filter's statistics: the loss, the update's norm and the
  L2 penalty."""
  return {
      "loss": jnp.sum(losses * mask) / jnp.sum(mask),
      "update_norm": optax.tree.norm(updates),
      "l2_penalty": optimizers.l2_penalty(params, l2_weight),
  }


def step_parts(adamw_config, sketched_config, batch, label: str) -> dict[str, tuple]:
  """{part: (function, arguments)} on ``batch`` (a training batch of both configs' task):
  AdamW's and the sketched variant's (``label``) training steps and their parts, at the
  params and optimizer states of step 0."""
  task = data.get_task(sketched_config.task)
  model, params, _ = task_io.create_model(
      sketched_config, task.num_labels, jax.random.fold_in(jax.random.key(0), 1)
  )
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  rng = jax.random.key(sketched_config.seed)
  steps, states = {}, {}
  for name, config in (("adamw", adamw_config), ("sketched", sketched_config)):
    tx, per_example = optimizers.create_optimizer(config, config.num_train_steps, None)
    steps[name] = train.step_functions(config, task, model, tx, per_example, None)[0]
    states[name] = (tx, tx.init(params))
  # train_step's inputs to the loss: per-example keys of step 0, the clean objective's δ.
  inputs = {k: batch[k] for k in task_io.input_keys(task)}
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(rng, 0), i))(batch["index"])
  objective = train.objective_config(sketched_config)
  logits_fn = task_io.logits_fn(task, model, deterministic=not sketched_config.model.dropout)
  delta = objectives.adversarial_perturbation(
      logits_fn,
      objective,
      params,
      inputs,
      keys,
      task=task.kind,
      hidden_size=model.config.hidden_size,
  )
  loss_args = (inputs, keys, delta)
  with_weights = sketched_config.optimizer.get("weighting", "uniform") == "ief"
  losses_of = objectives.make_loss_at_perturbation(logits_fn, objective, task=task.kind)
  losses_and_weights_of = objectives.make_loss_at_perturbation(
      logits_fn, objective, task=task.kind, with_ief_weights=with_weights
  )
  mask = batch["mask"]

  def mean_loss_value_and_grad(p):
    return jax.value_and_grad(lambda p: jnp.sum(losses_of(p, *loss_args) * mask) / jnp.sum(mask))(p)

  def capture(p, loss_fn, has_aux):
    return nearprox.per_example_value_and_grads(loss_fn, p, *loss_args, has_aux=has_aux)

  value, factors = jax.jit(lambda p: capture(p, losses_and_weights_of, with_weights))(params)
  losses, weights = value if with_weights else (value, None)
  mean_grads = jax.jit(mean_loss_value_and_grad)(params)[1]
  adamw_tx, adamw_state = states["adamw"]
  sketched_tx, sketched_state = states["sketched"]

  def sketched_update(grads, state, p, mask):
    return sketched_tx.update(grads, state, p, mask=mask, example_weights=weights)

  one_masked = mask.at[-1].set(0.0)
  l2_weight = sketched_config.objective.l2_weight
  step = jnp.zeros((), jnp.int32)
  parts = {
      ADAMW_STEP: (steps["adamw"], (train.TrainState(step, params, adamw_state), batch, rng)),
      f"{label}: training step": (
          steps["sketched"],
          (train.TrainState(step, params, sketched_state), batch, rng),
      ),
      "AdamW: value_and_grad of the mean loss": (mean_loss_value_and_grad, (params,)),
      "AdamW: optimizer update (L2, Adam, weight decay, rate)": (
          adamw_tx.update,
          (mean_grads, adamw_state, params),
      ),
  }
  parts["sketched: capture of the losses and factors (forward + input backward)"] = (
      lambda p: capture(p, losses_of, False),
      (params,),
  )
  if with_weights:
    parts["sketched: the same capture with the iEF weights"] = (
        lambda p: capture(p, losses_and_weights_of, True),
        (params,),
    )
  parts |= {
      "sketched: optimizer update (K̂, solve, combine, then the rest of its chain)": (
          sketched_update,
          (factors, sketched_state, params, mask),
      ),
      # What zero_masked_rows=False saves the training step: one select per per-example array.
      "sketched: zeroing a masked example's rows in every factor (the transform's default; "
      "training skips it)": (spectral_filter.zero_masked_examples, (factors, one_masked)),
      "either: logged metrics (loss, update norm, L2 penalty)": (
          lambda p, u, losses: _logged_metrics(p, u, losses, mask, l2_weight),
          (params, mean_grads, losses),
      ),
  }
  return parts


def breakdown(adamw_config, sketched_config, batch, label: str, repeats: int) -> list[dict]:
  """One row per part of :func:`step_parts`: its minimum time over ``repeats`` interleaved
  rounds, FLOPs and bytes accessed, each also as a multiple of AdamW's training step."""
  parts = step_parts(adamw_config, sketched_config, batch, label)
  compiled = {}
  for name, (fn, args) in parts.items():
    compiled[name] = (jax.jit(fn).lower(*args).compile(), args)
    jax.block_until_ready(compiled[name][0](*args))  # warm-up
  seconds = dict.fromkeys(compiled, float("inf"))
  for _ in range(repeats):
    for name, (exe, args) in compiled.items():
      started = time.perf_counter()
      jax.block_until_ready(exe(*args))
      seconds[name] = min(seconds[name], time.perf_counter() - started)
  costs = {name: (gflops(exe), gbytes_accessed(exe)) for name, (exe, _) in compiled.items()}
  (base_flops, base_bytes), base_seconds = costs[ADAMW_STEP], seconds[ADAMW_STEP]
  return [
      {
          "part": name,
          "seconds": seconds[name],
          "gflops": costs[name][0],
          "gbytes_accessed": costs[name][1],
          "time_ratio": seconds[name] / base_seconds,
          "flops_ratio": costs[name][0] / base_flops,
          "bytes_ratio": costs[name][1] / base_bytes,
      }
      for name in compiled
  ]


def markdown(rows: list[dict], repeats: int) -> str:
  """The breakdown's table, with what it measured."""
  lines = [
      "| part | time | × AdamW step | FLOPs × AdamW step | bytes accessed × AdamW step |",
      "|---|---|---|---|---|",
  ]
  lines += [
      f"| {r['part']} | {1e3 * r['seconds']:.0f} ms | {r['time_ratio']:.2f}× | "
      f"{r['flops_ratio']:.2f}× | {r['bytes_ratio']:.2f}× |"
      for r in rows
  ]
  return (
      f"Each part jitted alone on the same batch (the steps without donation), the minimum over "
      f"{repeats} interleaved rounds; FLOPs and bytes accessed: XLA's cost_analysis() "
      "(load independent). A part alone keeps in memory what the whole step can fuse away, "
      "so the parts need not add up to the step. These rounds run after, and apart from, the "
      "whole-step timings above, and the steps here keep their inputs (no donation), so their "
      "times differ from those; compare ratios within one table.\n\n" + "\n".join(lines) + "\n"
  )
