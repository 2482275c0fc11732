"""Fine-tunes a Flax BERT on a text-classification or extractive-QA task with proximal SGD
or a baseline.

    python -m nearprox.training.train --config experiments/configs/default.py --workdir runs/default \
        [--config.optimizer.name=adamw --config.optimizer.learning_rate=1e-4 ...]
    python -m nearprox.training.train --config experiments/configs/squad.py --workdir runs/squad \
        --config.data_dir=../shared/data/squad

One step, read top to bottom in :func:`train_step`: per-example keys → adversarial
perturbation (a constant) → per-example losses and gradients (proximal) or the masked mean
gradient (baselines) → optimizer update (the
proximal transform aggregates over devices itself) → new params and summed metrics. The
same per-device function runs under ``jax.shard_map`` (default), ``jax.pmap`` or plain
``jax.jit`` (one device); every collective names the axis ``"batch"``.

Around it (:func:`train_and_evaluate`): data from :mod:`nearprox.text.data` (the last partial
batch padded and masked), orbax checkpoints (resume, keep k, save on SIGTERM and after the
last step, fall back to the previous checkpoint if the latest is unreadable; SIGTERM during
the final evaluation returns ``preempted`` and a rerun evaluates again; several processes
stop together, :func:`preemption.preemption_notice`), TensorBoard events and a JSON-lines log in
``workdir``, a progress bar, dev/test evaluation and the export of the fine-tuned model as a
Hugging Face directory (both at ``optimizers.evaluation_params``: for schedule-free AdamW
its averaged iterate, for the others the trained params). A non-finite update ends training
at its step (``report["diverged_at_step"]``); the diverged model is still evaluated, so the
run is scored, not lost. Several hosts:
:func:`nearprox.training.parallel.initialize` joins them (``jax.distributed``); each host
reads its block of every global batch.

What depends on the task's kind (classification or span QA: the model head, the label keys
of a batch, the splits, the metrics) is in :mod:`nearprox.training.task_io`; the objectives
get ``task=task.kind``. ``config.task = "multitask"`` (experiments/configs/multitask.py) trains
``config.tasks`` on one encoder with a head per task from mixed batches whose ``task_ids``
pick each example's head (:mod:`nearprox.training.multitask_io`); PCGrad
(``pcgrad_adamw``) also gets them.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import nearprox
from nearprox.text import data, models, objectives
from nearprox.training import (
    multitask_io,
    optimizers,
    parallel,
    preemption,
    task_io,
    translation_io,
)
from nearprox.training.metrics_writer import MetricWriter
from nearprox.training.orbax_checkpoints import DIRNAME as CHECKPOINTS_DIRNAME
from nearprox.training.orbax_checkpoints import Checkpoints
from nearprox.training.task_io import INPUT_KEYS, create_model, evaluate, load_splits


class TrainState(NamedTuple):
  step: jax.Array
  params: Any
  opt_state: Any


def objective_config(config) -> objectives.ObjectiveConfig:
  fields = {k: v for k, v in config.objective.items() if v is not None}
  return objectives.ObjectiveConfig(**fields)


# ------------------------------------------------------------------------------ the step


def train_step(
    state: TrainState,
    batch,
    rng,
    *,
    perturbation_fn,
    loss_fn,
    tx,
    per_example: bool,
    per_example_method: str,
    axis_name: str | None,
    loss_returns_weights: bool = False,
    input_keys: tuple[str, ...] = INPUT_KEYS,
    l2_weight: float = 0.0,
    zero_fractions: bool = False,
):
  """One optimizer step on this device's block of the global batch.

  ``loss_returns_weights`` (per-example optimizers only): ``loss_fn`` returns ``(losses,
  example weights [B])`` for the proximal filter (e.g. ``make_loss_at_perturbation(...,
  with_ief_weights=True)``); False: uniform weights. ``input_keys``: the batch entries the
  loss reads (:func:`nearprox.training.task_io.input_keys`). ``l2_weight``: the optimizer's L2
  weight, so the step logs the penalty it adds (``l2_penalty``; the chain applies its gradient).
  ``zero_fractions``: log the fraction of exactly zero kernel weights per layer after the step
  (``zeros/<layer>``, ``zeros/all``), what the L1 prox (``config.optimizer.l1_weight``) makes.
  """

  def global_sum(x):
    return jax.lax.psum(x, axis_name) if axis_name else x

  mask = batch["mask"]
  inputs = {k: batch[k] for k in input_keys}
  # Example i's randomness (dropout, adversarial noise) depends on (seed, step, example id)
  # only, so any split of the batch over devices or hosts gives the same numbers.
  step_key = jax.random.fold_in(rng, state.step)
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(batch["index"])
  num_examples = global_sum(jnp.sum(mask))
  # The adversarial perturbation of each example's word embeddings (zeros for "clean"):
  # found first, then a constant input of the loss, so the differentiated loss has no inner
  # differentiation and the factored path can factor every layer.
  delta = perturbation_fn(state.params, inputs, keys)

  if per_example:
    value, grads = nearprox.per_example_value_and_grads(
        loss_fn,
        state.params,
        inputs,
        keys,
        delta,
        method=per_example_method,
        has_aux=loss_returns_weights,
    )
    # The weights come out beside the losses (aux): nothing differentiates them.
    example_losses, weights = value if loss_returns_weights else (value, None)
    extra = {"example_weights": weights} if loss_returns_weights else {}
    if "task_ids" in batch:  # multi-task: PCGrad groups the examples by task
      extra["task_ids"] = batch["task_ids"]
    updates, opt_state = tx.update(grads, state.opt_state, state.params, mask=mask, **extra)
  else:

    def mean_loss(params):
      example_losses = loss_fn(params, inputs, keys, delta)
      return jnp.sum(example_losses * mask) / num_examples, example_losses

    (_, example_losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(state.params)
    updates, opt_state = tx.update(global_sum(grads), state.opt_state, state.params)

  params = optax.apply_updates(state.params, updates)
  metrics = {
      "loss": global_sum(jnp.sum(example_losses * mask)) / num_examples,
      "update_norm": optax.tree.norm(updates),
  }
  if l2_weight:
    metrics["l2_penalty"] = optimizers.l2_penalty(state.params, l2_weight)
  if zero_fractions:
    zeros = optimizers.kernel_zero_fractions(params)
    metrics.update({f"zeros/{layer}": fraction for layer, fraction in zeros.items()})
  # Found by type wherever the chain holds it, so reordering the chain keeps the logging.
  proximal = optax.tree_utils.tree_get(opt_state, "ScaleByProximalState")
  if proximal is not None:
    metrics.update({f"gram/{k}": v for k, v in proximal.stats._asdict().items()})
  pcgrad = optax.tree_utils.tree_get(opt_state, "PCGradState")
  if pcgrad is not None:
    metrics.update({f"pcgrad/{k}": v for k, v in pcgrad.stats._asdict().items()})
  return TrainState(state.step + 1, params, opt_state), metrics


def step_functions(
    config, task: data.Task, model, tx, per_example: bool, axis_name, beam_size: int | None = None
):
  """(train_fn(state, batch, rng), eval_fn(state, batch)): :func:`train_step` with the
  config's objective, optimizer ``tx`` (``optimizers.create_optimizer``) and example
  weighting bound, and :func:`eval_step` at the state's ``optimizers.evaluation_params``;
  per-device functions for ``parallel.Runner``. Translation: eval_fn decodes with
  ``beam_size`` beams (default ``config.dev_beam_size``; 1 is greedy)."""
  objective = objective_config(config)
  logits_fn = task_io.logits_fn(task, model, deterministic=not config.model.dropout)
  perturbation_fn = functools.partial(
      objectives.adversarial_perturbation,
      logits_fn,
      objective,
      task=task.kind,
      hidden_size=model.config.hidden_size,
  )
  # iEF weights from the loss's own forward passes: the clean task term's by default, the
  # whole loss's with config.objective.ief_weights="whole_loss".
  ief = config.optimizer.get("weighting", "uniform") == "ief"
  loss_fn = objectives.make_loss_at_perturbation(
      logits_fn, objective, task=task.kind, with_ief_weights=ief
  )
  train_fn = functools.partial(
      train_step,
      perturbation_fn=perturbation_fn,
      loss_fn=loss_fn,
      tx=tx,
      per_example=per_example,
      per_example_method=config.optimizer.per_example,
      axis_name=axis_name,
      loss_returns_weights=ief,
      input_keys=task_io.input_keys(task),
      l2_weight=config.objective.l2_weight,
      zero_fractions=config.optimizer.get("l1_weight", 0.0) > 0,
  )
  if task.kind == "translation":
    evaluate_at = translation_io.decode_fn(model, config, beam_size or config.dev_beam_size)
  else:
    eval_logits_fn = models.bert_logits_fn(model, deterministic=True)
    evaluate_at = functools.partial(
        eval_step, logits_fn=eval_logits_fn, keys=task_io.eval_keys(task)
    )

  def eval_fn(state: TrainState, batch):
    # The evaluated params: schedule-free AdamW's averaged iterate, the others' params.
    params = optimizers.evaluation_params(state.opt_state, state.params)
    return evaluate_at(params, batch)

  return train_fn, eval_fn


def eval_step(params, batch, *, logits_fn, keys=task_io.TOKEN_KEYS):
  """Logits [B, C] (classification; multi-task: each row's task's head, ``keys`` with
  ``task_ids``) or start and end logits stacked, [B, T, 2] (QA)."""
  logits = logits_fn(params, {k: batch[k] for k in keys})
  return jnp.stack(logits, axis=-1) if isinstance(logits, tuple) else logits


# ------------------------------------------------------------------------------ the loop


def train_batches(arrays, config, task, start_step: int):
  """Global-batch iterator positioned at ``start_step`` (epochs reshuffled by seed); with
  ``config.length_buckets``, batches of similar lengths cut to their bucket's length; for
  ``config.task = "multitask"`` the mixed batches of :func:`multitask_io.train_batches`."""
  if config.task == data.MULTITASK:
    yield from multitask_io.train_batches(arrays, config, start_step, **parallel.host_shard())
    return
  boundaries = task_io.length_boundaries(config)
  if boundaries:
    keys = task_io.sequence_keys(task)
    lengths = data.row_lengths(arrays, keys)
    per_epoch = data.num_bucketed_batches(lengths, boundaries, config.batch_size)

    def epoch_batches(epoch):
      return data.bucketed_batches(
          arrays,
          config.batch_size,
          sequence_keys=keys,
          boundaries=boundaries,
          seed=config.seed,
          epoch=epoch,
          **parallel.host_shard(),
      )

  else:
    per_epoch = data.num_batches(task_io.num_rows(arrays), config.batch_size)

    def epoch_batches(epoch):
      return data.batches(
          arrays, config.batch_size, seed=config.seed, epoch=epoch, **parallel.host_shard()
      )

  epoch, skip = divmod(start_step, per_epoch)
  while True:
    for i, batch in enumerate(epoch_batches(epoch)):
      if i >= skip:
        yield batch
    epoch, skip = epoch + 1, 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains for ``config.num_train_steps`` steps (resuming from ``workdir``), evaluates,
  exports, and returns the report (also written to ``workdir/report.json``)."""
  workdir = Path(workdir)
  parallel.initialize()
  # Configuration errors first, before any expensive work.
  task = task_io.get_task(config)
  objective = objective_config(config)
  runner = parallel.Runner(config.parallel)
  tx, per_example = optimizers.create_optimizer(config, config.num_train_steps, runner.axis_name)
  task_io.check_config(config, task)

  rng = jax.random.key(config.seed)
  model, params, tokenizer = create_model(config, task.num_labels, jax.random.fold_in(rng, 1))
  splits = load_splits(config, tokenizer)
  runner.compile(*step_functions(config, task, model, tx, per_example, runner.axis_name))

  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  checkpoints = Checkpoints(
      workdir / CHECKPOINTS_DIRNAME,
      config.checkpoint_every,
      config.keep_checkpoints,
      config.checkpoint_minutes,
  )
  state = checkpoints.restore_latest(state)
  start_step = int(state.step)
  writer = MetricWriter(workdir, enabled=parallel.is_main_process(), from_step=start_step)
  if start_step == 0:
    writer.write_config(config)
  if task.kind == "translation" and parallel.is_main_process():
    # The model config, tokenizer and training config now, the params at the end: the
    # translate command can read a checkpoint of a training that stops before its end.
    translation_io.export_model(
        model, None, tokenizer, workdir / translation_io.MODEL_DIRNAME, config=config
    )
  logging.info(
      "task %s: %s; train %d rows; optimizer %s; objective %s; from step %d",
      task.name,
      task.description,
      task_io.num_rows(splits["train"]),
      config.optimizer.name,
      objective.kind,
      start_step,
  )

  # The split evaluated during training: holdout (tuning on held-out training examples),
  # else the first reported split loaded (dev).
  watched = next(name for name in splits if name != "train")
  # Translation whose final evaluation decodes otherwise (beam search) than the evaluations
  # during training (config.dev_beam_size, greedy): the watched split is also decoded the
  # training way after the last step, logged as "<split>/<metric>_<decoder>" (dev/bleu_greedy),
  # so the curve of in-training evaluations reaches the end of training with one decoder.
  final_in_training_decoder = (
      task.kind == "translation" and config.beam_size != config.dev_beam_size
  )
  preempted = False
  diverged_at_step = None
  device_state = runner.put_state(state)
  progress = writer.progress(config.num_train_steps, start_step, config.progress)
  step_times = []
  try:
    with preemption.preemption_notice() as reached_preemption:
      batches = train_batches(splits["train"], config, task, start_step)
      for step in range(start_step, config.num_train_steps):
        started = time.perf_counter()
        device_state, metrics = runner.train(device_state, next(batches), rng)
        metrics = jax.device_get(metrics)
        step_times.append(time.perf_counter() - started)
        done = step + 1
        progress.update(1)
        # A non-finite update leaves every later parameter non-finite: no step can recover,
        # so training ends here and the final evaluation scores the diverged model.
        if not np.isfinite(metrics["update_norm"]):
          diverged_at_step = done
        last = done == config.num_train_steps or diverged_at_step is not None
        if done % config.log_every == 0 or last:
          metrics = {k: float(v) for k, v in metrics.items()}
          metrics["step_time"] = float(np.median(step_times[-config.log_every :]))
          writer.write_scalars(done, {f"train/{k}": v for k, v in metrics.items()})
          progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if done % config.eval_every == 0 and not last:
          scores, _ = evaluate(runner, device_state, splits[watched], task, config.eval_batch_size)
          writer.write_scalars(done, {f"{watched}/{k}": v for k, v in scores.items()})
        elif last and final_in_training_decoder:
          scores, _ = evaluate(runner, device_state, splits[watched], task, config.eval_batch_size)
          decoder = translation_io.decoder_name(config.dev_beam_size)
          writer.write_scalars(done, {f"{watched}/{k}_{decoder}": v for k, v in scores.items()})
        if diverged_at_step is not None:
          logging.error(
              "training diverged at step %d (loss %s, update norm %s): every parameter after "
              "it is non-finite, so training stops there and the final evaluation scores that "
              "model",
              done,
              metrics["loss"],
              metrics["update_norm"],
          )
          break
        if reached_preemption(done):
          logging.warning("SIGTERM: saving a checkpoint at step %d and stopping", done)
          checkpoints.save(done, runner.get_state(device_state), force=True)
          preempted = True
          break
        if checkpoints.should_save(done):
          checkpoints.save(done, runner.get_state(device_state))
      state = runner.get_state(device_state)
      if not preempted and checkpoints.latest_step() != int(state.step):
        # The final state too: a stop during the final evaluation, the export or a caller's
        # attack (:func:`preemption.stop_on_sigterm`) then costs those only, not the training.
        checkpoints.save(int(state.step), state, force=True)
  finally:
    progress.close()
    checkpoints.wait()

  # The model that was evaluated is the one exported and returned: for schedule-free AdamW
  # its averaged iterate, not the point its last gradient was taken at.
  evaluated_params = optimizers.evaluation_params(state.opt_state, state.params)
  report = {
      "task": task.name,
      **({"tasks": list(task.names)} if isinstance(task, data.MultiTask) else {}),
      "optimizer": config.optimizer.name,
      "objective": objective.kind,
      "start_step": start_step,
      "steps": int(state.step),
      "workdir": str(workdir),
      "train_step_seconds": float(np.median(step_times[1:] or step_times or [0.0])),
      "diverged_at_step": diverged_at_step,
  }
  if not preempted:
    if task.kind == "translation" and config.beam_size != config.dev_beam_size:
      # The final scores decode with config.beam_size beams (training is over: the train
      # step's compilation is not needed again).
      functions = step_functions(
          config, task, model, tx, per_example, runner.axis_name, beam_size=config.beam_size
      )
      runner.compile(*functions)
    try:
      with preemption.stop_on_sigterm():
        scores = {
            name: evaluate(runner, device_state, splits[name], task, config.eval_batch_size)
            for name in splits
            if name != "train"
        }
        if task.kind == "translation" and parallel.is_main_process():
          # What the translate command reads: params, model config and tokenizer.
          report["translation_model"] = str(
              translation_io.export_model(
                  model, evaluated_params, tokenizer, workdir / translation_io.MODEL_DIRNAME
              )
          )
        elif config.export_hf and parallel.is_main_process() and isinstance(task, data.MultiTask):
          # One HF directory per task head, the shared encoder in each.
          report["hf_models"] = multitask_io.export(model, evaluated_params, tokenizer, workdir)
        elif config.export_hf and parallel.is_main_process():
          report["hf_model"] = str(
              models.save_pretrained(model, evaluated_params, tokenizer, workdir / "hf_model")
          )
    except preemption.Preempted:
      logging.warning("SIGTERM after step %d, before the final evaluation ended", state.step)
      preempted = True
  report["preempted"] = preempted
  if not preempted:  # all splits' final scores or none: a rerun logs them once
    report["predicted_classes"] = {}
    for name, (split_scores, predicted_classes) in scores.items():
      report[name], report["predicted_classes"][name] = split_scores, predicted_classes
      writer.write_scalars(int(state.step), {f"{name}/{k}": v for k, v in split_scores.items()})
  writer.close()
  if parallel.is_main_process():
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
  report["params"] = evaluated_params
  return report


def configure_logging() -> None:
  """INFO from nearprox; quiet the chatter of the libraries it drives."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax's per-save chatter
  # "Unable to initialize backend 'tpu'" on every start of a machine without one.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def main(argv):
  del argv
  from absl import flags

  config = flags.FLAGS.config
  print("Resolved config:\n" + str(config), flush=True)
  report = train_and_evaluate(config, flags.FLAGS.workdir)
  report.pop("params")
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and the exported model.")
  flags.mark_flags_as_required(["config", "workdir"])
  configure_logging()
  app.run(main)
