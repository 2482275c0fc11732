"""Step time of every optimizer of a study, measured apart from the study's runs.

The study's own step times come from runs that shared the machine with other runs and with
tests, so their ratios mix the optimizers' costs with the load of the moment. Here one
process builds the training step each variant of ``plan.optimizer_variants`` runs in the
study (:func:`nearprox.training.train.step_functions`, compiled by the same
``parallel.Runner``, on one batch of the study's first task at its batch size and length),
compiles them all, then runs ``--repeats`` rounds that take one step of each in turn: load
that changes during the measurement hits every variant alike, and a step's time is its
minimum over the rounds. A variant's settings are its chosen tuning trial where the stored
runs have decided it, else its first trial (a step's cost does not depend on the rate); a
derived variant (grafted, in front of AdamW) is built on the filter the tuning chose and is
left out until that choice is made. When the plan has the sketch study, the variants it
sketches (``plan.sketch_check_variant``, and ``best_proximal`` once chosen) are timed again
with ``optimizer.sketch_dim = plan.sketch_dim``, for the sketch's cost against the exact Gram.
With ``--breakdown`` (default) the last of them (``best_proximal``'s once chosen) is taken
apart against AdamW's step (experiments/bench_step_parts.py): the time, FLOPs and bytes of
each part, in a table after the steps'.

    python -m experiments.bench_optimizers [--mode=full] [--repeats=5] [--data_dir=GLUE]

Writes ``experiments/results/<mode>/bench_optimizers.{md,json}``; the optimizer study reads
the JSON for the optimizer study's cost table (experiments/studies/optimizers.py).
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

from experiments import run_process, runs, studies, tuning
from experiments.studies import optimizers as optimizers_study
from nearprox.text import data

HERE = Path(__file__).resolve().parent


def define_flags() -> None:
  """The command line's flags, defined only when this runs as a program: tests import this
  module beside experiments.reproduce, whose flags have the same names."""
  flags.DEFINE_enum("mode", "full", ("smoke", "quick", "full"), "the study's mode")
  flags.DEFINE_integer("repeats", 5, "interleaved timed rounds (one step of each)")
  flags.DEFINE_string("out", str(HERE / "results"), "results root (<out>/<mode>/...)")
  flags.DEFINE_string("data_dir", None, "GLUE root (else $NEARPROX_GLUE_DIR)")
  flags.DEFINE_bool("breakdown", True, "also the parts of a sketched step against AdamW's")


def variant_configs(plan, base_config, out: Path) -> dict[str, tuple[str, object, str]]:
  """{variant: (label, config, settings)} of the plan's optimizer variants on the plan's
  first optimizer task, as the study builds them from the stored runs of ``out/runs``."""
  context = tuning.Context(plan, runs.RunStore(base_config, out))  # reads; trains nothing
  task = plan.optimizer_tasks[0]
  found = {}
  for name in plan.optimizer_variants:
    variant = context.resolve(name)
    if variant is None or context.overrides(variant) is None:
      continue  # a derived variant before the tuning chose its filter
    chosen = context.best_trial(variant)
    trial = chosen["trial"] if chosen else context.trials(variant)[0]
    settings = ", ".join(f"{k.split('.')[-1]} {v:g}" for k, v in trial.items())
    settings += "" if chosen else " (first trial: the tuning has not chosen yet)"
    config = runs.apply_overrides(base_config, context.reported_settings(variant, task, trial))
    found[variant] = (context.label(variant), config, settings)
  # The sketch study's variants again with the sketched Gram, for its cost against the exact.
  dim = plan.get("sketch_dim") if "sketch" in plan.studies else None
  sketched_variants = (plan.get("sketch_check_variant"), context.resolve("best_proximal"))
  for variant in dict.fromkeys(sketched_variants if dim else ()):
    if variant in found:
      label, config, settings = found[variant]
      sketched = runs.apply_overrides(config, {"optimizer.sketch_dim": dim})
      label = f"{label}, sketched Gram (k = {dim})"
      found[f"{variant}{studies.SKETCHED}"] = (label, sketched, settings)
  return found


def study_batch(config, task, tokenizer, batch_cache: dict):
  """The first training batch of ``config``'s task at its length and batch size, loaded once
  per (task, length, batch size) into ``batch_cache``."""
  from nearprox.training import task_io, train

  shape = (config.task, config.max_length, config.batch_size)
  if shape not in batch_cache:
    splits = task_io.load_splits(config, tokenizer)
    batch_cache[shape] = next(train.train_batches(splits["train"], config, task, 0))
  return batch_cache[shape]


def compiled_step(config, batch_cache: dict):
  """A function that runs the study's training step of ``config`` (compiled on its first
  call, made here) on one batch and returns its wall time; ``batch_cache`` keeps the batch of
  each (task, length, batch size) for the next variants."""
  import jax
  import jax.numpy as jnp

  from nearprox.training import optimizers, parallel, task_io, train

  task = data.get_task(config.task)
  runner = parallel.Runner(config.parallel)
  tx, per_example = optimizers.create_optimizer(config, config.num_train_steps, runner.axis_name)
  rng = jax.random.key(config.seed)
  model, params, tokenizer = task_io.create_model(
      config, task.num_labels, jax.random.fold_in(rng, 1)
  )
  batch = study_batch(config, task, tokenizer, batch_cache)
  runner.compile(*train.step_functions(config, task, model, tx, per_example, runner.axis_name))
  holder = [runner.put_state(train.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)))]

  def step() -> float:
    started = time.perf_counter()
    holder[0], metrics = runner.train(holder[0], batch, rng)  # the state is donated
    jax.device_get(metrics)  # as the training loop does every step
    return time.perf_counter() - started

  step()  # compiles
  return step


def measure(configs: dict, repeats: int, log=print) -> dict[str, float]:
  """{variant: the minimum step time over ``repeats`` interleaved rounds}."""
  steps, cache = {}, {}
  for variant, (label, config, _) in configs.items():
    started = time.time()
    steps[variant] = compiled_step(config, cache)
    log(f"[bench] compiled {label} in {time.time() - started:.0f} s")
  best = dict.fromkeys(steps, float("inf"))
  for round_index in range(repeats):
    for variant, step in steps.items():
      best[variant] = min(best[variant], step())
    log(
        f"[bench] round {round_index + 1}/{repeats}: "
        + ", ".join(f"{v} {best[v]:.3f}s" for v in best)
    )
  return best


def result(
    plan, configs: dict, seconds: dict[str, float], repeats: int, load: tuple[float, float]
) -> dict:
  """The JSON record: machine, shape, one row per variant with its ratios to SGD (the
  plan's SGD variant) and to AdamW; ``load``: the 1-minute load average before the first
  compilation and after the last timed round (an idle machine reads near 0 at the end)."""
  sgd = next((v for v in ("sgd", "sgd_momentum") if v in seconds), None)
  some_config = next(iter(configs.values()))[1]
  rows = []
  for variant, (label, config, settings) in configs.items():
    rows.append(
        {
            "variant": variant,
            "label": label,
            "optimizer": config.optimizer.name,
            "settings": settings,
            "sketch_dim": config.optimizer.get("sketch_dim") or None,
            "step_seconds": seconds[variant],
            "ratio_to_sgd": seconds[variant] / seconds[sgd] if sgd else None,
            "ratio_to_adamw": seconds[variant] / seconds["adamw"] if "adamw" in seconds else None,
        }
    )
  return {
      "mode": plan.mode,
      "task": some_config.task,
      "model": some_config.model.name,
      "batch_size": some_config.batch_size,
      "max_length": some_config.max_length,
      "repeats": repeats,
      "sgd_variant": sgd,
      "machine": run_process.machine(),
      "load_average_at_start": load[0],
      "load_average_at_end": load[1],
      "command": "python -m experiments.bench_optimizers " + " ".join(sys.argv[1:]),
      "rows": rows,
  }


def sketched_breakdown(configs: dict, repeats: int) -> dict | None:
  """{"variant", "rows"}: :func:`experiments.bench_step_parts.breakdown` of the last sketched
  variant of ``configs`` against AdamW's step, on the study's batch; None without either."""
  sketched = [variant for variant in configs if variant.endswith(studies.SKETCHED)]
  if "adamw" not in configs or not sketched:
    return None
  import jax

  from experiments import bench_step_parts
  from nearprox.training import task_io

  label, config, _ = configs[sketched[-1]]
  task = data.get_task(config.task)
  _, _, tokenizer = task_io.create_model(config, task.num_labels, jax.random.key(0))
  batch = study_batch(config, task, tokenizer, {})
  rows = bench_step_parts.breakdown(configs["adamw"][1], config, batch, label, repeats)
  return {"variant": sketched[-1], "rows": rows}


def markdown(record: dict) -> str:
  text = (
      f"# Step time of every optimizer of the `{record['mode']}` study, measured apart from it"
      f"\n\nexperiments/bench_optimizers.py times {optimizers_study.markdown_step_cost(record)}\n"
  )
  breakdown = record.get("breakdown")
  if breakdown:
    from experiments import bench_step_parts

    label = next(r["label"] for r in record["rows"] if r["variant"] == breakdown["variant"])
    text += (
        f"\n## Where the time of the step of {label} goes, against AdamW's\n\n"
        + bench_step_parts.markdown(breakdown["rows"], record["repeats"])
    )
  return text


def main(argv) -> None:
  del argv
  args = flags.FLAGS
  if args.data_dir:
    os.environ[data.GLUE_DIR_ENV] = args.data_dir
  mode = importlib.import_module(f"experiments.configs.{args.mode}")
  base_config, plan = mode.get_config(), mode.get_plan()
  out = Path(args.out) / plan.mode
  configs = variant_configs(plan, base_config, out)
  if not configs:
    raise app.UsageError(f"the {plan.mode} plan has no optimizer variant to time")
  absl_logging.set_verbosity(absl_logging.WARNING)
  load = os.getloadavg()[0]
  try:
    seconds = measure(configs, args.repeats)
  except data.DataError as error:  # the first variant loads the batch, before any timing
    raise app.UsageError(f"{error} (give --data_dir or ${data.GLUE_DIR_ENV})") from None
  record = result(plan, configs, seconds, args.repeats, (load, os.getloadavg()[0]))
  if args.breakdown:
    record["breakdown"] = sketched_breakdown(configs, args.repeats)
  run_process.write_json(out / studies.STEP_COST_FILE, record)
  (out / studies.STEP_COST_FILE).with_suffix(".md").write_text(markdown(record))
  print(markdown(record))


if __name__ == "__main__":
  define_flags()
  app.run(main)
