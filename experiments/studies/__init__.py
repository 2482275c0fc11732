"""The studies behind "does the proximal scaling help?", one module each.

A study module has ``TITLE``, ``run(ctx)`` (asks ``ctx`` — a :class:`~experiments.tuning.Context`
over the mode's plan and the run store — for runs and returns ``{"tables": {name: [row, ...]},
"curves", "comparisons", "notes"}`` from the records that exist; a run not stored yet is
pending, and its rows are left out), ``markdown(study)`` (its section of docs/results.md; plot
links as ``PLOT:name.png``) and optionally ``plots(study, out)`` and ``PLAN`` (its plan fields
with their defaults, for fields the mode's plan does not set). Comparison records
(:func:`~.core.comparison`, with a ``condition`` naming what is compared) fill the verdict
table. Adding a study is one module plus one line in ``REGISTRY``: docs/studies.md.

Every optimizer's settings come from experiments/tuning.py (held-out training examples,
mean over seeds, the same number of trials per optimizer); a mode's ``plan.studies`` says
which of these it runs.
"""

from experiments.studies import (
    ablation,
    adversarial,
    batch_size,
    damping,
    glue,
    l1,
    multidevice,
    multitask,
    noise,
    optimizers,
    sketch,
    squad,
    time_to_accuracy,
    translation,
)
from experiments.studies.core import MIN_GAP, SKETCHED, STEP_COST_FILE, SUMMARY_FIELDS, comparison

# Study name -> module, in the order of the results document.
REGISTRY = {
    "optimizers": optimizers,
    "damping": damping,
    "adversarial": adversarial,
    "multidevice": multidevice,
    "glue": glue,
    "noise": noise,
    "sketch": sketch,
    "squad": squad,
    "translation": translation,
    "l1": l1,
    # Issue 40, parts 2-4.
    "ablation": ablation,
    "time_to_accuracy": time_to_accuracy,
    "batch_size": batch_size,
    # Issue 41, part 2.
    "multitask": multitask,
}
STUDIES = tuple(REGISTRY)

__all__ = [
    "MIN_GAP",
    "REGISTRY",
    "SKETCHED",
    "STEP_COST_FILE",
    "STUDIES",
    "SUMMARY_FIELDS",
    "comparison",
]
