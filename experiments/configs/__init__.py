"""Training configs (``get_config()``) and, for the reproduce modes, study plans (``get_plan()``).

``default`` is the default job; ``tiny`` a random 2-layer BERT for tests; ``quick`` derives
from ``default``, and ``smoke`` and ``full`` from ``quick``. Each file imports its parent,
so ``python -m nearprox.training.train --config experiments/configs/quick.py`` works from the
repository root.
"""
