"""nearprox: Gram-matrix filters of per-example gradients, for optax.

The tikhonov filter K(K+λI)⁻¹ (the "proximal gradient scaling" the library started from) and
its complement λ(K+λI)⁻¹, the natural filter: λ times the damped natural-gradient
(Levenberg–Marquardt, proximal-point) step (docs/method.md §1.2, §1.5).


per_example = nearprox.per_example_grads(loss_fn, params, batch)   # loss_fn -> [B]
opt = nearprox.proximal_sgd(learning_rate=0.1, damping=1e-3, damping_mode="relative")
updates, state = opt.update(per_example, state, params, mask=batch_mask)
params = optax.apply_updates(params, updates)

Example weights (e.g. iEF's ‖∇_logits ℓ_n‖², ``nearprox.text.losses.ief_weights``) go to
``opt.update(..., example_weights=s)`` (a ``loss_fn`` returning ``(losses, s)`` gives them
from its own forward pass: ``per_example_value_and_grads(..., has_aux=True)``);
``optax.chain(nearprox.scale_by_proximal(...),
optax.adamw(...))`` puts the filter in front of any optax optimizer.
``scale_by_proximal(..., sketch_dim=k)`` estimates the Gram from random features of the
costly leaves (``nearprox.sketch``; docs/method.md §2.9) instead of computing it exactly.
``optax.chain(opt, nearprox.soft_threshold_l1(lr, l1_weight, mask))`` ends any chain with the
L1 prox (soft-thresholding: exact zeros). ``nearprox.pcgrad_aggregate(num_tasks)`` is the
multi-task peer, Yu et al.'s PCGrad on the task gradients of a mixed batch (its ``update`` takes
``task_ids=``).
"""

from nearprox.base import PerExampleFactor
from nearprox.l1_prox import SoftThresholdL1State, soft_threshold_l1
from nearprox.pcgrad import PCGradState, pcgrad_aggregate
from nearprox.per_example import per_example_grads, per_example_value_and_grads
from nearprox.spectral_filter import FilterStats, filter_coefficients, gram_matrix, step_scale
from nearprox.transform import (
    ScaleByProximalState,
    proximal_sgd,
    scale_by_proximal,
    scale_by_proximal_norm,
)

__version__ = "0.1.0"

__all__ = [
    "FilterStats",
    "PCGradState",
    "PerExampleFactor",
    "ScaleByProximalState",
    "SoftThresholdL1State",
    "filter_coefficients",
    "gram_matrix",
    "pcgrad_aggregate",
    "per_example_grads",
    "per_example_value_and_grads",
    "proximal_sgd",
    "scale_by_proximal",
    "scale_by_proximal_norm",
    "soft_threshold_l1",
    "step_scale",
]
