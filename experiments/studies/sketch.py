"""Study 7: the tuned proximal variant with the exact and with the sketched Gram
(``optimizer.sketch_dim``), same settings and seeds, on SST-2; and one variant at the tuning
budget before the study's choice exists."""

from __future__ import annotations

from experiments.report import DAMPING, LR, OPTIMIZER, RAN_ON, SEEDS, get, spread, table
from experiments.studies.core import SKETCHED, STUDY_TASK, comparison, step_cost, summary_rows
from experiments.tuning import Context, Group, collapsed
from nearprox.text import data

TITLE = "Sketched vs exact Gram"


def run(ctx: Context) -> dict:
  plan = ctx.plan
  # First: it needs one variant's tuning, best_proximal (below) trains every missing one.
  check, check_summary = sketch_at_tuning_budget(ctx)
  best = ctx.resolve("best_proximal")
  rows, summary = {}, []
  settings = (("exact", "optimizers", None), ("sketched", "sketch", plan.sketch_dim))
  for gram, label, dim in settings:
    extra = None if dim is None else {"optimizer.sketch_dim": dim}
    group = ctx.group(label, STUDY_TASK, best, extra=extra)  # exact: study 1's runs
    if group is not None:
      rows[gram] = {
          **group.describe(),
          "gram": gram,
          "sketch_dim": dim,
          "seeds": len(group.results),
          **group.stats("dev_accuracy", "dev", "accuracy"),
          "collapsed_seeds": group.collapsed_seeds(),
          "step_seconds": group.step_seconds(),
      }
      values = [("accuracy", "dev_accuracy")]
      summary += summary_rows("sketch", rows[gram], group, values, condition=_gram(dim))
  # The step time ratio measured apart from the runs, which shared the machine.
  cost = step_cost(ctx)
  timed = {r["variant"]: r["step_seconds"] for r in cost["rows"]} if cost else {}
  for variant, pair in (
      (best, rows),
      (plan.get("sketch_check_variant"), check),
  ):
    if "sketched" in pair and {variant, f"{variant}{SKETCHED}"} <= timed.keys():
      pair["sketched"]["timed_step_ratio"] = timed[f"{variant}{SKETCHED}"] / timed[variant]
  comparisons = []
  if len(rows) == 2:
    subject = {**rows["sketched"], "variant": f"the sketched Gram (k = {plan.sketch_dim})"}
    baseline = {**rows["exact"], "variant": "the exact Gram"}
    comparisons.append(
        comparison(subject, baseline, "dev_accuracy", study="sketch", condition="SST-2 dev acc.")
    )
  if len(check) == 2:
    subject = {**check["sketched"], "variant": f"the sketched Gram (k = {plan.sketch_dim})"}
    baseline = {**check["exact"], "variant": "the exact Gram"}
    record = comparison(
        subject,
        baseline,
        "holdout_accuracy",
        study="sketch",
        budget="tuning",
        condition="SST-2 held-out acc., tuning budget",
    )
    comparisons.append(record)
  tables = {"sketch": list(rows.values()), "sketch_tuning_budget": list(check.values())}
  tables["summary"] = summary + check_summary
  return {"tables": tables, "comparisons": comparisons}


def _gram(dim: int | None) -> str:
  return "exact Gram" if dim is None else f"sketched Gram, k={dim}"


def sketch_at_tuning_budget(ctx: Context) -> tuple[dict[str, dict], list[dict]]:
  """``plan.sketch_check_variant`` at its chosen tuning trial with the exact and the sketched
  Gram, at the tuning budget (held-out training examples, no dev), ``plan.seeds`` seeds: the
  exact runs of the tuning seeds are its tuning runs. Needs only that variant's tuning, so it
  answers issue 14 before the whole study's choice exists. With their summary.json records;
  ({}, []) without the plan field."""
  plan = ctx.plan
  variant = plan.get("sketch_check_variant")
  chosen = ctx.best_trial(variant) if variant else None
  if chosen is None:
    return {}, []
  metric = data.get_task(plan.tuning.task).primary_metric
  rows, summary = {}, []
  for gram, dim in (("exact", None), ("sketched", plan.sketch_dim)):
    extra = {} if dim is None else {"optimizer.sketch_dim": dim}
    settings = ctx.tuning_settings(ctx.overrides(variant), chosen["trial"]) | extra
    found = [
        ctx.store.run(f"sketch_check:{variant}:{gram}:seed={seed}", {**settings, "seed": seed})
        for seed in plan.seeds
    ]
    found = [r for r in found if r is not None]
    if not found:
      continue
    group = Group(variant, ctx.label(variant), chosen["trial"], found)
    rows[gram] = {
        **group.describe(),
        "gram": gram,
        "sketch_dim": dim,
        "steps": plan.tuning.steps,
        "seeds": len(found),
        **group.stats("holdout_accuracy", "holdout", metric),
        "collapsed_seeds": sum(bool(collapsed(r, "holdout")) for r in found),
        "step_seconds": group.step_seconds(),
    }
    condition = f"{_gram(dim)}, tuning budget"
    values = [(metric, "holdout_accuracy")]
    summary += summary_rows(
        "sketch",
        rows[gram],
        group,
        values,
        task=plan.tuning.task,
        split="holdout",
        condition=condition,
    )
  return rows, summary


def markdown(study: dict) -> str:
  gram = (
      "Gram",
      lambda r: "exact" if r["sketch_dim"] is None else f"sketched, k = {r['sketch_dim']}",
  )
  one_class = ("one-class seeds", get("collapsed_seeds", lambda n: "—" if n is None else n))
  timed = lambda r: f"{r['timed_step_ratio']:.2f}×" if r.get("timed_step_ratio") else "—"
  step = [("s/step (these runs)", get("step_seconds")), ("× exact step (timed apart)", timed)]
  parts = []
  if study["tables"]["sketch"]:
    columns = [OPTIMIZER, LR, DAMPING, gram, SEEDS]
    columns += [("SST-2 dev acc (%)", spread("dev_accuracy", "dev_accuracy_std"))]
    parts.append(table(study["tables"]["sketch"], columns + [one_class, RAN_ON, *step]))
  check = study["tables"].get("sketch_tuning_budget") or []
  if check:
    columns = [OPTIMIZER, LR, DAMPING, gram, SEEDS]
    columns += [
        ("held-out SST-2 train acc (%)", spread("holdout_accuracy", "holdout_accuracy_std"))
    ]
    parts.append(
        f"At the tuning budget ({check[0]['steps']} steps, scored on the tuning's held-out "
        "training examples; the exact runs of the tuning seeds are the tuning runs), "
        "one proximal variant at the trial its tuning chose, before the study's own choice "
        "exists:\n\n" + table(check, columns + [one_class, RAN_ON, *step])
    )
  parts.append(
      "The same settings and seeds; only the coefficients c come from the estimated Gram "
      "(docs/method.md §2.9). s/step is the study's runs' own, which shared the machine; "
      "× exact step is the sketched step's time over the exact one's, both timed in one "
      "process, interleaved, by `python -m experiments.bench_optimizers` "
      "(`bench_optimizers.md`; — before it has timed them); "
      "`experiments/results/bench_step.md` times the sketch against the exact Gram's parts."
  )
  return "\n\n".join(parts)
