"""The experiments around nearprox: configs, the reproduce pipeline, the default job, benchmarks.

Run the entry points as modules from the repository root, e.g. ``python -m
experiments.reproduce --mode=quick`` or ``python -m experiments.default_job``.
"""
