"""``ObjectiveConfig``: which per-example training objective (clean, FGM, PGD or SMART), its
perturbation's settings with each kind's defaults, and how its two terms combine;
:mod:`nearprox.text.objectives` builds the losses from it."""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np

from nearprox.text.perturbations import NORMS

KINDS = ("clean", "fgm", "pgd", "smart")
COMBINES = ("sum", "adv_only")
# Where the iEF weights s_i of make_loss_at_perturbation(..., with_ief_weights=True) come from.
IEF_WEIGHTS = ("clean_term", "whole_loss")

# Per-kind defaults, from the anchors' public code (see ObjectiveConfig).
_DEFAULTS = {
    "clean": dict(
        epsilon=0.0,
        step_size=0.0,
        num_steps=1,
        norm="l2",
        random_start=False,
        noise_std=0.0,
        adv_weight=0.0,
    ),
    "fgm": dict(
        epsilon=1.0,
        step_size=0.0,
        num_steps=1,
        norm="l2",
        random_start=False,
        noise_std=0.0,
        adv_weight=1.0,
    ),
    "pgd": dict(
        epsilon=0.3,
        step_size=0.1,
        num_steps=3,
        norm="l2",
        random_start=True,
        noise_std=0.0,
        adv_weight=1.0,
    ),
    "smart": dict(
        epsilon=1e-3,
        step_size=1e-3,
        num_steps=1,
        norm="linf",
        random_start=False,
        noise_std=1e-5,
        adv_weight=1.0,
    ),
}


def _is_number(value, kind) -> bool:
  return isinstance(value, kind) and not isinstance(value, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """What the per-example training objective is. Fields left None take ``kind``'s default.

  Attributes:
    kind: "clean" (task loss only), "fgm", "pgd" or "smart".
    epsilon: radius ε of the per-example perturbation ball (FGM: the step length).
      Defaults: FGM 1.0 (Miyato et al.; the common PyTorch FGM's ε on the embedding
      output), PGD 0.3 (ℓ2, = K·α: FreeLB-range bound), SMART 1e-3 (= η, see module doc).
    step_size: PGD α (default 0.1, FreeLB's 1e-2..1e-1 range); SMART η (default 1e-3).
    num_steps: PGD K (default 3, FreeLB); SMART ascent steps (default 1, mt-dnn).
    norm: "l2" or "linf". Defaults: "l2" for FGM/PGD, "linf" for SMART (mt-dnn).
    random_start: PGD: start uniformly in the ε-ball (default True; FreeLB starts random).
      Unused by FGM and SMART (which always starts from noise_std noise).
    noise_std: SMART's initial noise σ (default 1e-5, mt-dnn ``noise_var``); σ = 0 gives
      δ = 0 (the ascent would start at the KL's minimum, where its gradient is 0).
    adv_weight: weight of the adversarial/smoothness term in the sum (default 1.0;
      SMART's α, the paper searches {1, 3, 5}).
    combine: "sum" (task + adv_weight·adv) or "adv_only" (adv; not for SMART, which has
      no label signal).
    l2_weight: λ_reg of λ_reg·½‖θ_S‖². Not used by :func:`make_per_example_loss`;
      :func:`nearprox.training.optimizers.l2_regularization` adds it after the filter.
    ief_weights: the iEF weights s_i that ``make_loss_at_perturbation(...,
      with_ief_weights=True)`` returns. "clean_term" (default; what every stored run used):
      ‖∇_z task_i‖² of the clean task term at the clean logits z alone, although ℓ_i and
      its gradient (hence K) also hold the adversarial term. "whole_loss": the squared
      gradient of the whole per-example loss ℓ_i with respect to the logits of both forward
      passes, s_i = ‖∂ℓ_i/∂z_i‖² + ‖∂ℓ_i/∂z̃_i‖² (z clean, z̃ perturbed), which is what iEF
      asks for (Wu et al. 2024, eq. 7: ∇_z of the loss whose per-example gradients form K).
      The two coincide for kind="clean".
    label_smoothing: ε of the smoothed targets of task "translation" (0.1 in Vaswani et al.
      2017); must be 0 for the other tasks.

  ``dataclasses.replace`` keeps resolved values: replace(fgm_cfg, kind="pgd") keeps ε=1.
  """

  kind: str = "clean"
  epsilon: float | None = None
  step_size: float | None = None
  num_steps: int | None = None
  norm: str | None = None
  random_start: bool | None = None
  noise_std: float | None = None
  adv_weight: float | None = None
  combine: str = "sum"
  l2_weight: float = 0.0
  ief_weights: str = "clean_term"
  label_smoothing: float = 0.0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"ObjectiveConfig.kind must be one of {KINDS}, got {self.kind!r}")
    if self.ief_weights not in IEF_WEIGHTS:
      raise ValueError(
          f"ObjectiveConfig.ief_weights must be one of {IEF_WEIGHTS}, got {self.ief_weights!r}"
      )
    for name, value in _DEFAULTS[self.kind].items():
      if getattr(self, name) is None:
        object.__setattr__(self, name, value)
    if self.norm not in NORMS:
      raise ValueError(f"ObjectiveConfig.norm must be one of {NORMS}, got {self.norm!r}")
    if self.combine not in COMBINES:
      raise ValueError(f"ObjectiveConfig.combine must be one of {COMBINES}, got {self.combine!r}")
    if not _is_number(self.label_smoothing, numbers.Real) or not 0 <= self.label_smoothing < 1:
      raise ValueError(
          f"ObjectiveConfig.label_smoothing must lie in [0, 1), got {self.label_smoothing!r}"
      )
    for name in ("epsilon", "step_size", "noise_std", "adv_weight", "l2_weight"):
      value = getattr(self, name)
      if not _is_number(value, numbers.Real) or not value >= 0:  # also rejects NaN
        raise ValueError(f"ObjectiveConfig.{name} must be a number >= 0, got {value!r}")
    if not isinstance(self.random_start, (bool, np.bool_)):
      raise ValueError(
          f"ObjectiveConfig.random_start must be a bool, got " f"{self.random_start!r}"
      )
    if not _is_number(self.num_steps, numbers.Integral) or self.num_steps < 1:
      raise ValueError(f"ObjectiveConfig.num_steps must be an int >= 1, got " f"{self.num_steps!r}")
    if self.kind in ("pgd", "smart") and self.step_size <= 0:
      raise ValueError(
          f"ObjectiveConfig.step_size must be > 0 for kind={self.kind!r}, got "
          f"{self.step_size!r}"
      )
    if self.kind == "smart" and self.combine == "adv_only":
      raise ValueError(
          "ObjectiveConfig.combine='adv_only' is not allowed for kind='smart': "
          "the smoothness term has no label signal"
      )
    if self.kind == "clean" and self.combine == "adv_only":
      raise ValueError(
          "ObjectiveConfig.combine='adv_only' needs an adversarial kind, got kind='clean'"
      )
