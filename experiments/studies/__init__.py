"""The eight studies behind "does the proximal scaling help?" (issue 7), as run lists + tables.

Each study function takes a :class:`~experiments.tuning.Context` (the mode's plan from
``experiments/configs/<mode>.py`` and a :class:`runs.Executor`) and returns a study dict:
``{"name", "title", "requested", "missing", "tables": {name: [row, ...]}, "curves",
"comparisons", "notes", "plan"}``. Every number in a table is read from run result files; a
run that does not exist (deadline or ``--report_only``) is counted in ``missing`` and leaves
its rows out. Rows name an optimizer variant by its label (``variant``, e.g. "AdamW") and by
its config name (``optimizer``, e.g. "adamw"). ``comparisons`` are the records the verdict
is rendered from (:func:`comparison`). What they share is in :mod:`.core` (constants, the
comparison record, dev curves, the :func:`~.core.study` wrapper that adds ``requested``,
``missing`` and ``waiting``); ``FUNCTIONS`` lists them in the README's order.

Every optimizer's settings come from experiments/tuning.py (held-out training examples,
mean over seeds, the same number of trials per optimizer); a mode's ``plan.studies`` says
which of these it runs (--mode=full: optimizers, sketch, adversarial, noise, squad).
Module of each: ``optimizers`` (1), ``gram`` (2, 4, 7: how the Gram is formed),
``robustness`` (3, 6), ``tasks`` (5, 8).

1. ``optimizers``  ``plan.optimizer_variants`` (AdamW, SGD+momentum, the tikhonov, EF and iEF
   filters, the best filter with the grafted step size and in front of AdamW) at their tuned
   settings on ``plan.optimizer_tasks`` (SST-2 and MRPC dev, tweets test), ``plan.seeds``
   seeds; the tuning table; steps to a target and the step time against SGD's, in the
   runs and measured apart from them (``step_cost``: experiments/bench_optimizers.py).
2. ``damping``     relative λ sweep for both filters: accuracy and the Gram spectrum
   (effective rank, kept fraction) across training.
3. ``adversarial`` clean / FGM / PGD / SMART objectives with ``plan.objective_optimizers``
   (AdamW and the best proximal variant): clean accuracy and accuracy under embedding-space
   PGD vs ε; per objective, the best proximal variant against AdamW under attack at the
   middle radius (``reported_epsilon``).
4. ``multidevice`` local vs global Gram on 8 host devices (subprocess), step time.
5. ``glue``        one more GLUE task (MRPC: F1) with the SST-2 settings.
6. ``noise``       20% / 40% flipped SST-2 training labels; tweets low-confidence test.
7. ``sketch``      the tuned proximal variant with the exact and with the sketched Gram
   (``optimizer.sketch_dim``), same settings and seeds, on SST-2 (issue 14); and, before
   that choice exists, ``plan.sketch_check_variant`` at its tuned trial and the tuning budget;
   the sketched/exact step time ratio timed apart from the runs (bench_optimizers.py).
8. ``squad``       extractive QA on SQuAD's held-out articles: AdamW, the tuned proximal
   variant and SGD+momentum at their SST-2 settings (issue 15).
"""

from experiments.studies.core import MIN_GAP, SKETCHED, STEP_COST_FILE, SUMMARY_FIELDS, comparison
from experiments.studies.gram import damping, multidevice, sketch
from experiments.studies.optimizers import optimizers
from experiments.studies.robustness import adversarial, noise, reported_epsilon
from experiments.studies.tasks import glue, majority_class_row, squad

# Study name -> function of a Context, in the order of the README.
FUNCTIONS = {
    fn.__name__: fn
    for fn in (optimizers, damping, adversarial, multidevice, glue, noise, sketch, squad)
}
STUDIES = tuple(FUNCTIONS)

__all__ = [
    "FUNCTIONS",
    "MIN_GAP",
    "SKETCHED",
    "STEP_COST_FILE",
    "STUDIES",
    "SUMMARY_FIELDS",
    "comparison",
    "majority_class_row",
    "reported_epsilon",
]
