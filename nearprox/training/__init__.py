"""The training system (the ``train`` extra): one config in, a fine-tuned model out.

* :mod:`nearprox.training.train`: ``train_and_evaluate(config, workdir)`` and the step;
  ``python -m nearprox.training.train --config CONFIG --workdir DIR``.
* :mod:`nearprox.training.optimizers`: the optimizers a config names, the schedule, L2.
* :mod:`nearprox.training.parallel`: the step under ``shard_map``, ``pmap`` or ``jit``.
* :mod:`nearprox.training.orbax_checkpoints`: save, keep k, resume, fall back.
* :mod:`nearprox.training.metrics_writer`: TensorBoard, JSON lines, progress bar.
"""
