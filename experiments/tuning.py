"""Optimizer variants and the tuning protocol every study draws its settings from.

The protocol (issue 13; fixed before the runs, the same for every optimizer):

* **Trials.** Each variant has the trials of its plan grid: the product of
  ``plan.lr_grid[variant]`` and, for the proximal variants, ``plan.damping_trials[variant]``
  (relative λ; learning rate and damping tuned jointly on log grids). A mode's plan gives every
  variant the same number of trials; :func:`Context.tuning` reports the count.
* **Tuning runs.** ``plan.tuning.steps`` steps (the schedule's shape is the budget's: warmup
  fraction and linear decay to 0) on ``plan.tuning.task``, evaluated on
  ``plan.tuning.holdout_examples`` training examples held out of training
  (``config.holdout_examples``: the same examples for every run, and the reported dev/test
  splits are not even loaded), one run per seed of ``plan.tuning.seeds``.
* **Choice.** The trial with the best mean held-out metric over the tuning seeds, where a
  trial any of whose seeds collapsed to one class ranks below every trial none of whose seeds
  did; ties go to the lower mean training loss at the end. Never one seed alone.
* **Two stages.** ``best_filter`` is the best first-stage filter variant (tikhonov, EF, iEF)
  by that rule; the derived variants (:data:`DERIVED`: the same filter with the grafted step
  size, and the same filter in front of AdamW) are tuned after it, on their own grids.
  ``best_proximal`` is the best of every proximal variant, derived ones included, by the same
  rule on the same held-out examples: what the robustness studies compare with AdamW.
  ``best_peer`` is the best of the peers (:data:`PEERS`) by the same rule.
* **Reported runs** use the chosen trial at the mode's full budget, ``plan.seeds`` seeds, on
  every task (tasks other than the tuning task reuse its settings, for every optimizer alike).
"""

from __future__ import annotations

import collections
import itertools
import json
import math
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from experiments import run_process, runs
from nearprox.text import data

VARIANTS: dict[str, dict[str, Any]] = {
    "sgd": {"optimizer.name": "sgd", "optimizer.momentum": 0.0},
    "sgd_momentum": {"optimizer.name": "sgd", "optimizer.momentum": 0.9},
    "adamw": {"optimizer.name": "adamw"},
    "proximal_tikhonov": {"optimizer.name": "proximal_sgd", "optimizer.filter": "tikhonov"},
    "proximal_ef": {"optimizer.name": "proximal_sgd", "optimizer.filter": "natural"},
    "proximal_ief": {
        "optimizer.name": "proximal_sgd",
        "optimizer.filter": "natural",
        "optimizer.weighting": "ief",
    },
    "proximal_norm": {"optimizer.name": "proximal_norm_sgd"},
    # Wu et al.'s eq. 8 / Algorithm 1 step Gᵀ(K+λI)⁻¹s (docs/method.md §1.4): a variant of its
    # own, outside the pools the aliases choose from, so no earlier choice changes.
    "proximal_ief_eq8": {
        "optimizer.name": "proximal_sgd",
        "optimizer.filter": "natural",
        "optimizer.weighting": "ief",
        "optimizer.weight_normalization": "damping",
    },
    # The peers (nearprox.training.optimizers.PEERS), tuned like AdamW on their own grids.
    "muon": {"optimizer.name": "muon"},
    "schedule_free_adamw": {"optimizer.name": "schedule_free_adamw"},
    # Lion's rates sit ~5× below AdamW's; its decoupled decay 5× above keeps lr·λ (Chen et al.
    # 2023: λ 3-10× AdamW's).
    "lion": {"optimizer.name": "lion", "optimizer.weight_decay": 0.05},
    "psgd_kron": {"optimizer.name": "psgd_kron"},
}
FILTERS = ("proximal_tikhonov", "proximal_ef", "proximal_ief")  # candidates for best_filter
# Second stage: the best filter with these overrides on top.
DERIVED: dict[str, dict[str, Any]] = {
    "proximal_graft": {"optimizer.step_size": "graft"},
    "proximal_adamw": {"optimizer.name": "proximal_adamw"},
}
PROXIMAL = (*FILTERS, "proximal_norm", *DERIVED)
DISPLAY = {
    "sgd": "SGD",
    "sgd_momentum": "SGD+momentum",
    "adamw": "AdamW",
    "proximal_tikhonov": "proximal SGD, tikhonov",
    "proximal_ef": "proximal SGD, EF (natural, uniform weights)",
    "proximal_ief": "proximal SGD, iEF (natural, iEF weights)",
    "proximal_norm": "rank-one proximal (‖g‖²/(‖g‖²+λ))",
    "proximal_ief_eq8": "proximal SGD, iEF, Wu et al.'s scale (eq. 8)",
    "muon": "Muon (Adam on embeddings, head, biases, LayerNorm)",
    "schedule_free_adamw": "schedule-free AdamW",
    "lion": "Lion",
    "psgd_kron": "PSGD Kron",
    "proximal_graft": "{base}, grafted step size",
    "proximal_adamw": "{base} → AdamW",
    "majority": "majority class (no training)",
}
# What a JAX user would pick instead of AdamW (nearprox.training.optimizers.PEERS).
PEERS = ("muon", "schedule_free_adamw", "lion", "psgd_kron")
# Alias -> the variants it chooses from, by the tuning's rule (:func:`_rank`).
ALIAS_POOLS = {"best_filter": FILTERS, "best_proximal": PROXIMAL, "best_peer": PEERS}
ALIASES = tuple(ALIAS_POOLS)


def final(result: dict, split: str, metric: str) -> float:
  return float(result["report"].get(split, {}).get(metric, float("nan")))


def history_curve(result: dict, name: str) -> list[tuple[int, float]]:
  return [(row["step"], row[name]) for row in result["history"] if name in row]


def end_loss(result: dict) -> float:
  """Mean training loss over the last quarter of the logged steps (NaN if diverged)."""
  losses = [v for _, v in history_curve(result, "train/loss")]
  tail = losses[-max(1, len(losses) // 4) :]
  return float(np.mean(tail)) if tail else float("nan")


def diverged(result: dict) -> bool:
  """Whether the run diverged: training stopped at a non-finite update (the report's
  ``diverged_at_step``), or, in records from before training stopped there, a logged training
  loss is non-finite. Its scores are its diverged model's (e.g. BLEU 0), so they count."""
  if result["report"].get("diverged_at_step") is not None:
    return True
  return any(not math.isfinite(v) for _, v in history_curve(result, "train/loss"))


def mean_std(values) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value) of the non-NaN values."""
  values = [v for v in values if v is not None and not math.isnan(v)]
  if not values:
    return float("nan"), float("nan")
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def collapsed(result: dict, split: str | None = None) -> bool | None:
  """Whether the final model puts every example of ``split`` (default: the task's reported
  split) in one class; None when the run file does not record its predictions. A multi-task
  run (default split: dev) records counts per task: whether any of its tasks collapsed."""
  if result["config"]["task"] == data.MULTITASK:
    per_task = result["report"].get("predicted_classes", {}).get(split or "dev")
    if per_task is None:
      return None
    return any(sum(c > 0 for c in counts) == 1 for counts in per_task.values())
  split = split or data.get_task(result["config"]["task"]).reported_split
  counts = result["report"].get("predicted_classes", {}).get(split)
  return None if counts is None else sum(c > 0 for c in counts) == 1


def machine_kind(result: dict) -> str:
  """The accelerator a run trained on (``NVIDIA H200``…; ``unknown`` if unrecorded); on a CPU
  backend with the cores the run could use and its host (``cpu, 2 cores, Linux-6.18-x86_64``),
  since its step time depends on both."""
  machine = result.get("machine", {})
  kind = machine.get("device_kind", "unknown")
  cpus = machine.get("cpus")
  if machine.get("backend") == "cpu" and cpus:
    where = run_process.host(machine)
    return (
        f"{kind}, {cpus} core{'' if cpus == 1 else 's'}"
        + (f", {where}" if where else "")
        + run_process.threads_label(machine)
    )
  return kind


def _rank(row: dict) -> tuple:
  """Sort key of a tuning row, larger is better: no collapsed seed, mean score, low loss."""
  nan_low = lambda x: -math.inf if math.isnan(x) else x
  return (row["collapsed_seeds"] == 0, nan_low(row["score"]), nan_low(-row["train_loss_end"]))


def choose(rows: list[dict]) -> dict:
  """The chosen tuning row: the protocol's rule (:func:`_rank`) over complete trials."""
  return max(rows, key=_rank)


def table_rows(rows: list[dict], trials: list[dict], chosen: dict | None) -> list[dict]:
  """Tuning ``rows`` for a table: without their trial, flagged ``chosen`` (the row equal to
  ``chosen``, None while undecided) with its ``edges`` in ``trials``' grid (:func:`grid_edges`,
  "" inside the grid or not chosen: a CSV cell)."""
  out = []
  for row in rows:
    is_chosen = chosen is not None and row["trial"] == chosen["trial"]
    edges = ", ".join(grid_edges(trials, row["trial"])) if is_chosen else ""
    out.append(
        {k: v for k, v in row.items() if k != "trial"} | {"chosen": is_chosen, "edges": edges}
    )
  return out


def grid_edges(trials: list[dict], trial: dict) -> list[str]:
  """Which of ``trial``'s settings lie at an end of the grid ``trials`` spans, e.g.
  ``["learning rate at the top"]``: there the grid does not show that the best setting lies
  inside it. The protocol fixes each grid before its runs and does not extend it, so a
  reader needs to see which choices sit at an edge."""
  edges = []
  for key in trial:
    values = sorted({t[key] for t in trials if t.get(key) is not None})
    if len(values) < 2 or trial[key] is None:
      continue
    name = key.split(".")[-1].replace("_", " ")
    if trial[key] == values[0]:
      edges.append(f"{name} at the bottom")
    elif trial[key] == values[-1]:
      edges.append(f"{name} at the top")
  return edges


class Group(NamedTuple):
  """The runs of one variant at its chosen trial, one per seed that exists."""

  variant: str
  label: str
  trial: dict
  results: list[dict]
  edges: tuple[str, ...] = ()  # :func:`grid_edges` of the chosen trial in its tuning grid

  @property
  def lr(self) -> float:
    return self.trial["optimizer.learning_rate"]

  def describe(self) -> dict:
    """The columns naming the group in a table row."""
    optimizer = self.results[0]["config"]["optimizer"]
    damping = optimizer["damping"] if self.variant.startswith("proximal") else None
    return {
        "optimizer": optimizer["name"],
        "variant": self.label,
        "learning_rate": self.lr,
        "damping": damping,
        "machine": self.machine,
        "tuning_edges": ", ".join(self.edges),  # "" inside its grid (a CSV cell)
    }

  def stat(self, split: str, metric: str) -> tuple[float, float]:
    return mean_std([final(r, split, metric) for r in self.results])

  def stats(self, name: str, split: str, metric: str) -> dict[str, float]:
    """``{name: mean, name_std: seed standard deviation}`` of a metric on a split."""
    mean, std = self.stat(split, metric)
    return {name: mean, f"{name}_std": std}

  @property
  def machine(self) -> str:
    """The machine kind its runs trained on (:func:`machine_kind`), or ``mixed``."""
    kinds = {machine_kind(r) for r in self.results}
    return kinds.pop() if len(kinds) == 1 else "mixed"

  def step_seconds(self, kind: str | None = None) -> float:
    """The fastest seed's step time, among the seeds that ran on machine ``kind`` if given;
    NaN when no seed did, or (no ``kind``) when the seeds ran on different machines.

    The seeds do the same work on the same kind of machine, so what differs between them is
    other processes sharing the cores (tests, a second worker), which only slow a run down:
    the minimum is the least disturbed measurement.
    """
    if kind is None and self.machine == "mixed":
      return float("nan")
    seconds = [
        r["report"]["train_step_seconds"]
        for r in self.results
        if kind is None or machine_kind(r) == kind
    ]
    return min(seconds, default=float("nan"))

  def step_ratio(self, other: Group | None) -> float:
    """Its step time over ``other``'s, both measured on one machine kind that runs of both
    trained on (the one with the most of their runs); NaN when they share none."""
    if other is None:
      return float("nan")
    counts = collections.Counter(machine_kind(r) for r in self.results + other.results)
    shared = {machine_kind(r) for r in self.results} & {machine_kind(r) for r in other.results}
    if not shared:
      return float("nan")
    kind = max(sorted(shared), key=lambda k: counts[k])
    return self.step_seconds(kind) / other.step_seconds(kind)

  def collapsed_seeds(self) -> int | None:
    one_class = [collapsed(r) for r in self.results]
    return None if None in one_class else sum(one_class)


class Context:
  """The plan of the mode, the run store, and the tuning every study shares."""

  def __init__(self, plan, store: runs.RunStore):
    self.plan = plan
    self.store = store
    self.waiting: list[str] = []  # aliases asked for before their tuning was complete
    # tune()'s answers: the stored runs do not change while a Context lives (a pass of the
    # driver reads the store, then trains), and every alias, label and study asks again.
    self._tuned: dict[str, tuple[list[dict], bool]] = {}

  # ------------------------------------------------------------------------ variants

  def resolve(self, name: str) -> str | None:
    """A variant name; an alias (``best_filter``, ``best_proximal``, ``best_peer``) becomes
    the variant it chooses (None until the tuning runs that decide it all exist)."""
    if name not in ALIASES:
      return name
    pool = ALIAS_POOLS[name]
    rows = {}
    for variant in (v for v in pool if v in self.plan.lr_grid):
      row = self.best_trial(variant)
      if row is None:
        self.waiting.append(name)
        return None  # the choice must not change when a missing trial lands
      rows[variant] = row
    return max(rows, key=lambda v: _rank(rows[v])) if rows else None

  def overrides(self, variant: str) -> dict | None:
    """The config overrides of a variant (derived ones need the best filter first)."""
    if variant not in DERIVED:
      return dict(VARIANTS[variant])
    base = self.resolve("best_filter")
    return None if base is None else {**VARIANTS[base], **DERIVED[variant]}

  def label(self, variant: str) -> str:
    base = self.resolve("best_filter") if variant in DERIVED else None
    return DISPLAY[variant].format(base=DISPLAY.get(base, "best filter"))

  def trials(self, variant: str, grids=None) -> list[dict]:
    """A variant's grid: learning rate × (proximal variants) relative damping, from
    ``grids`` (a plan section with ``lr_grid`` and ``damping_trials``; default the plan)."""
    grids = grids or self.plan
    dampings = (grids.get("damping_trials") or {}).get(variant) or (None,)
    return [
        {"optimizer.learning_rate": lr}
        | ({} if damping is None else {"optimizer.damping": damping})
        for lr, damping in itertools.product(grids.lr_grid[variant], dampings)
    ]

  # ------------------------------------------------------------------------ tuning

  def tuning(self, variant: str) -> tuple[list[dict], bool]:
    """(one row per trial of ``variant`` that has runs: mean held-out score over the tuning
    seeds, collapsed seeds, end loss; whether every tuning run exists). A derived variant
    has no rows before the first stage is complete."""
    return self.tune(variant, self.trials(variant))

  def tune(self, variant: str, trials: list[dict], extra: dict | None = None, tuning=None):
    """:meth:`tuning`'s rows and completeness for ``trials`` of ``variant`` (settings that
    override its own), with ``extra`` overrides on every tuning run (a batch size and its
    budget, say): the same runs, scores and choice rule for any grid a study declares.

    ``tuning``: a study's own protocol section (default ``plan.tuning``): ``task``,
    ``steps``, ``holdout_examples``, ``seeds``, and optionally ``split`` (the split scored,
    default "holdout"), ``base`` (the config the runs start from, :meth:`RunStore.run`) and
    ``settings`` (overrides of every run of the study: its budget)."""
    protocol = None if tuning is None or tuning is self.plan.tuning else tuning.to_dict()
    key = json.dumps([variant, trials, extra, protocol], sort_keys=True, default=str)
    if key not in self._tuned:
      self._tuned[key] = self._tune(variant, trials, extra, tuning)
    rows, complete = self._tuned[key]
    return [dict(row) for row in rows], complete

  def _tune(self, variant: str, trials: list[dict], extra: dict | None, tuning):
    base = self.overrides(variant)
    if base is None:
      return [], False
    tuning = tuning or self.plan.tuning
    split = tuning.get("split", "holdout")
    metric = data.get_task(tuning.task).primary_metric
    prefix = "tune" if tuning is self.plan.tuning else f"tune:{tuning.task}"
    rows, complete = [], True
    for trial in trials:
      settings = {**self.tuning_settings(base, trial, tuning), **(extra or {})}
      named = {**(extra or {}), **trial}
      name = f"{prefix}:{variant}:" + ",".join(
          f"{k.split('.')[-1]}={v:g}" if isinstance(v, (int, float)) else f"{k.split('.')[-1]}={v}"
          for k, v in named.items()
      )
      found = [
          self.store.run(f"{name}:seed={s}", {**settings, "seed": s}, **_base(tuning))
          for s in tuning.seeds
      ]
      found = [r for r in found if r is not None]
      complete &= len(found) == len(tuning.seeds)
      if not found:
        continue
      mean, std = mean_std([final(r, split, metric) for r in found])
      one_class = [collapsed(r, split) for r in found]
      rows.append(
          {
              "variant": self.label(variant),
              "optimizer": found[0]["config"]["optimizer"]["name"],
              "learning_rate": trial["optimizer.learning_rate"],
              "damping": trial.get("optimizer.damping"),
              "seeds": len(found),
              "metric": f"{split}_{metric}",
              "score": mean,
              "score_std": std,
              "collapsed_seeds": sum(bool(c) for c in one_class),
              "diverged_seeds": sum(diverged(r) for r in found),
              "train_loss_end": mean_std([end_loss(r) for r in found])[0],
              "machine": " + ".join(sorted({machine_kind(r) for r in found})),
              "trial": trial,
          }
      )
    return rows, complete and bool(rows)

  def tuning_settings(self, overrides: dict, trial: dict, tuning=None) -> dict:
    """The overrides of a tuning run (without its seed): the study's settings, the tuning
    task, budget and held-out examples, then the variant's overrides and the trial's. A
    protocol scored on a reported split (``split`` = "dev") also sets ``eval_splits`` to it:
    its tuning runs load and decode no other split, so no test number is ever computed
    while tuning."""
    tuning = tuning or self.plan.tuning
    split = tuning.get("split", "holdout")
    return {
        **tuning.get("settings", {}),
        "task": tuning.task,
        "num_train_steps": tuning.steps,
        "holdout_examples": tuning.holdout_examples,
        **({} if split == "holdout" else {"eval_splits": (split,)}),
        **overrides,
        **trial,
    }

  def best_trial(self, variant: str, grids=None, tuning=None) -> dict | None:
    """The chosen tuning row of ``variant`` (None: not decided until every trial exists);
    ``grids`` and ``tuning``: a study's own (:meth:`trials`, :meth:`tune`)."""
    if grids is None and tuning is None:
      rows, complete = self.tuning(variant)
    else:
      rows, complete = self.tune(variant, self.trials(variant, grids), tuning=tuning)
    return choose(rows) if complete else None

  def chosen(self) -> dict:
    """The tuning stage's decisions, as ``experiments/results/<mode>/chosen.json`` stores
    them: ``{"mode", "tuning", "aliases": {alias: variant or None}, "variants": {variant:
    {"label", "overrides", "metric", "score", "score_std", "seeds"}}}``. ``overrides`` are the
    config overrides of the variant at its chosen trial; a variant whose tuning is not
    complete is absent, and an alias it decides is None."""
    variants = {}
    for variant in self.plan.optimizer_variants:
      row = self.best_trial(variant)
      if row is not None:
        variants[variant] = {
            "label": self.label(variant),
            "overrides": {**self.overrides(variant), **row["trial"]},
            **{k: row[k] for k in ("metric", "score", "score_std", "seeds")},
        }
    return {
        "mode": self.plan.mode,
        "tuning": self.plan.tuning.to_dict(),
        "aliases": {alias: self.resolve(alias) for alias in ALIASES},
        "variants": variants,
    }

  # ------------------------------------------------------------------------ reported runs

  def reported_settings(self, variant: str, task: str, trial: dict, extra=None) -> dict:
    """The overrides of a reported run of ``variant`` on ``task`` (without its seed): the
    mode's full budget, the variant's overrides, the trial's settings, then ``extra``."""
    return {"task": task, **self.overrides(variant), **trial, **(extra or {})}

  def group(self, label, task, name, seeds=None, extra=None, devices=1, attack=None, study=None):
    """The :class:`Group` of ``name`` (a variant or an alias) on ``task`` at its chosen trial
    and the mode's full budget, one run per seed (default ``plan.seeds``); None when the
    variant is not in the plan, its tuning is not complete or no run exists.

    ``study``: a plan section with a tuning protocol of its own (``tuning``, and ``lr_grid``
    and ``damping_trials`` keyed by the names it asks for, aliases included): the trial is
    chosen by it, and the runs start from ``study.tuning.base`` with its ``settings``."""
    variant = self.resolve(name)
    if variant is None or variant not in self.plan.lr_grid:
      return None
    grids = None if study is None else study_grids(study, name, variant)
    tuning = None if study is None else study.tuning
    chosen = self.best_trial(variant, grids, tuning)
    if chosen is None:
      return None
    edges = tuple(grid_edges(self.trials(variant, grids), chosen["trial"]))
    settings = {**tuning.get("settings", {}), **(extra or {})} if tuning else extra
    overrides = self.reported_settings(variant, task, chosen["trial"], settings)
    found = []
    for seed in self.plan.seeds if seeds is None else seeds:
      run_name = f"{label}:{task}:{variant}:seed={seed}"
      run_name += "".join(f":{k.split('.')[-1]}={v}" for k, v in (extra or {}).items())
      found.append(
          self.store.run(run_name, {**overrides, "seed": seed}, devices, attack, **_base(tuning))
      )
    found = [r for r in found if r is not None]
    return Group(variant, self.label(variant), chosen["trial"], found, edges) if found else None


def _base(tuning) -> dict:
  """The ``base=`` argument of :meth:`RunStore.run` for a study's protocol ({} for the plan's)."""
  base = tuning.get("base") if tuning else None
  return {"base": base} if base else {}


def study_grids(study, name: str, variant: str):
  """``study``'s grids for ``variant``, declared under the name a study asked for (an alias
  such as ``best_proximal`` is declared before the tuning resolves it)."""
  return ml_collections.ConfigDict(
      {
          "lr_grid": {variant: study.lr_grid[name]},
          "damping_trials": {variant: (study.get("damping_trials") or {}).get(name)},
      }
  )
