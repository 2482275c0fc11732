"""Time to accuracy (issue 40, part 3): ``plan.tta_variants`` (AdamW, the tuned proximal
variant, the best peer) and the sketched Gram of ``plan.tta_sketched``, at their tuned
settings, ``plan.seeds`` seeds, on ``plan.tta_task`` with the dev split evaluated every
``plan.tta_eval_every`` steps.

Targets: ``plan.tta_target_fractions`` of AdamW's final mean dev score (1.0: AdamW's final
accuracy; 0.97: 97% of it). A variant's steps to a target are the first evaluated step where
its seed-mean dev curve reaches it; its wall-clock time is those steps times its training
step's seconds from experiments/bench_optimizers.py's record (one process, interleaved,
:data:`core.STEP_COST_FILE`), never from the runs' own step times, which shared the machine.
Without a timed step for a variant (or a record of another shape) its time is missing.
Evaluation time is not counted: every optimizer evaluates alike.
"""

from __future__ import annotations

from pathlib import Path

from experiments.report import LR, OPTIMIZER, SEEDS, get, num, pct, pyplot, save_figure, spread
from experiments.report import table as markdown_table
from experiments.studies.core import (
    SKETCHED,
    dev_curve,
    mean_curve,
    step_cost,
    steps_to_target,
    summary_rows,
)
from experiments.tuning import Context
from nearprox.text import data

TITLE = "Time to accuracy"
PLAN = {
    "tta_task": "sst2",
    "tta_baseline": "adamw",  # whose final mean dev score sets the targets
    "tta_eval_every": 20,
    "tta_variants": ("adamw", "best_proximal", "best_peer"),
    "tta_sketched": ("best_proximal",),
    "tta_target_fractions": (1.0, 0.97),
    "tta_time_ratio_target": 0.7,  # issue 40: sketched ≤ 0.7× the baseline's time to its accuracy
}


def timed_step(record: dict | None, key: str, config: dict) -> float | None:
  """The seconds of ``key``'s training step in bench_optimizers' ``record`` when it timed the
  runs' shape (task, batch size, tokens); None otherwise."""
  if not record:
    return None
  shape = (record["task"], record["batch_size"], record["max_length"])
  if shape != (config["task"], config["batch_size"], config["max_length"]):
    return None
  return next((r["step_seconds"] for r in record["rows"] if r["variant"] == key), None)


def first_step_at(curve: list[tuple[int, float]], target: float) -> int | None:
  """The first step of ``curve`` whose value reaches ``target`` (None: never)."""
  return next((int(s) for s, value in curve if value >= target - 1e-12), None)


def run(ctx: Context) -> dict:
  plan = ctx.plan
  task = plan.tta_task
  metric = data.get_task(task).primary_metric
  extra = {"eval_every": plan.tta_eval_every}
  groups = []  # (key in bench_optimizers' record, gram, group)
  for name in plan.tta_variants:
    for gram in ("exact", "sketched") if name in plan.tta_sketched else ("exact",):
      more = {"optimizer.sketch_dim": plan.sketch_dim} if gram == "sketched" else {}
      group = ctx.group("time_to_accuracy", task, name, extra={**extra, **more})
      if group is not None:
        key = group.variant + (SKETCHED if gram == "sketched" else "")
        groups.append((key, gram, group))
  adamw = next((g for key, _, g in groups if key == plan.tta_baseline), None)
  if adamw is None:
    return {"tables": {"time_to_accuracy": []}, "curves": {}}
  final_mean = adamw.stat("dev", metric)[0]
  targets = {f"{f:g}": f * final_mean for f in plan.tta_target_fractions}
  record = step_cost(ctx)
  rows, curves = [], {}
  for key, gram, group in groups:
    curve = mean_curve([dev_curve(r, metric) for r in group.results])
    seconds = timed_step(record, key, group.results[0]["config"])
    row = {
        "task": task,
        **group.describe(),
        "gram": gram if gram == "exact" else f"sketched, k = {plan.sketch_dim}",
        "seeds": len(group.results),
        "metric": metric,
        **group.stats("dev_final", "dev", metric),
        "timed_step_seconds": seconds,
    }
    for name, target in targets.items():
      steps = first_step_at(curve, target)
      reached = [steps_to_target(r, metric, target) for r in group.results]
      row[f"target_{name}"] = target
      row[f"steps_{name}"] = steps
      row[f"seeds_reaching_{name}"] = sum(s is not None for s in reached)
      row[f"seconds_{name}"] = None if steps is None or seconds is None else steps * seconds
    rows.append(row)
    curves[group.label + ("" if gram == "exact" else f", {row['gram']}")] = {
        "dev": curve,
        "step_seconds": seconds,
    }
  base = rows[[key for key, _, _ in groups].index(plan.tta_baseline)]
  for row in rows:
    for name in targets:
      mine, theirs = row[f"seconds_{name}"], base[f"seconds_{name}"]
      row[f"time_ratio_{name}"] = None if mine is None or not theirs else mine / theirs
  summary = []
  for (_, _, group), row in zip(groups, rows):
    values = [(metric, "dev_final")]
    for name in targets:
      reach = f"{name}× {base['variant']}'s final mean dev {metric}"
      values += [
          (f"steps to {reach}", f"steps_{name}"),
          (f"seconds to {reach}", f"seconds_{name}"),
          (f"time to {reach}, ratio to {base['variant']}'s", f"time_ratio_{name}"),
      ]
    gram = f", Gram: {row['gram']}" if group.variant.startswith("proximal") else ""
    condition = f"dev every {plan.tta_eval_every} steps{gram}"
    summary += summary_rows("time_to_accuracy", row, group, values, condition=condition)
  tables = {"time_to_accuracy": rows, "summary": summary}
  return {"tables": tables, "curves": curves, "time_ratio_target": plan.tta_time_ratio_target}


def _cell(value, fmt=num) -> str:
  return "missing" if value is None else fmt(value)


def markdown(study: dict) -> str:
  rows = study["tables"]["time_to_accuracy"]
  names = [k[len("steps_") :] for k in rows[0] if k.startswith("steps_")]
  columns = [
      OPTIMIZER,
      LR,
      ("Gram", lambda r: r["gram"] if r["optimizer"].startswith("proximal") else "—"),
      SEEDS,
      ("final dev (%)", spread("dev_final", "dev_final_std")),
      ("s/step (timed apart)", get("timed_step_seconds", lambda s: _cell(s))),
  ]
  for name in names:
    target = f"{pct(rows[0][f'target_{name}'])}%"
    columns += [
        (f"steps to {target}", lambda r, n=name: _steps(r, n)),
        (f"seconds to {target}", get(f"seconds_{name}", lambda s: _cell(s, lambda x: f"{x:.0f}"))),
        (
            f"× the baseline's time to {target}",
            get(f"time_ratio_{name}", lambda x: _cell(x, _ratio)),
        ),
    ]
  first = names[0]
  text = markdown_table(rows, columns) + (
      f"\n\nTargets: {', '.join(n for n in names)} × the baseline's (AdamW's) final mean dev {rows[0]['metric']}."
      " Steps: the first evaluation where the seed-mean dev curve reaches the target (in "
      "brackets, the seeds whose own curve does). Seconds: steps × the training step timed "
      "by `python -m experiments.bench_optimizers` in one process (evaluation not counted); "
      "missing where it has not timed that step."
  )
  sketched = [r for r in rows if r["gram"] != "exact" and r.get(f"time_ratio_{first}") is not None]
  goal = study.get("time_ratio_target")
  for row in sketched:
    ratio = row[f"time_ratio_{first}"]
    verdict = "met" if goal is not None and ratio <= goal else "not met"
    text += (
        f"\n\n{row['variant']}, {row['gram']}: {_ratio(ratio)} AdamW's wall-clock to "
        f"{pct(row[f'target_{first}'])}% (target ≤ {goal:g}×: {verdict})."
    )
  return text + "\n\n![time to accuracy](PLOT:time_to_accuracy.png)"


def _ratio(x: float) -> str:
  return f"{x:.2f}×"


def _steps(row: dict, name: str) -> str:
  steps = row[f"steps_{name}"]
  text = "not reached" if steps is None else str(steps)
  return f"{text} ({row[f'seeds_reaching_{name}']}/{row['seeds']})"


def plots(study: dict, out: Path) -> list[Path]:
  """Seed-mean dev accuracy against wall-clock (steps × timed step seconds)."""
  timed = {k: c for k, c in study["curves"].items() if c["step_seconds"] and c["dev"]}
  if not timed:
    return []
  fig, ax = pyplot().subplots(figsize=(6, 4))
  for label, curve in timed.items():
    steps, values = zip(*curve["dev"])
    ax.plot([s * curve["step_seconds"] for s in steps], values, marker=".", label=label)
  for name, target in _targets(study).items():
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax.annotate(f"{name} × AdamW", (0, target), fontsize=7, color="gray")
  ax.set(xlabel="training wall-clock (s, timed step × steps)", ylabel="dev accuracy")
  task = data.get_task(study["tables"]["time_to_accuracy"][0]["task"]).display_name
  ax.set_title(f"{task} dev accuracy vs wall-clock (mean over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save_figure(fig, out / "time_to_accuracy.png")


def _targets(study: dict) -> dict[str, float]:
  rows = study["tables"]["time_to_accuracy"]
  return {k[len("target_") :]: v for k, v in rows[0].items() if k.startswith("target_")}
