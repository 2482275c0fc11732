"""Study 4: local vs global Gram on host devices (each run in a process with that many
host devices), accuracy and step time."""

from __future__ import annotations

from experiments.report import OPTIMIZER, RAN_ON, SEEDS, get, spread, table
from experiments.studies.core import STUDY_TASK, comparison, summary_rows
from experiments.tuning import Context

TITLE = "Local vs global Gram on host devices"


def run(ctx: Context) -> dict:
  plan = ctx.plan
  rows, summary = {}, {}
  for name in plan.multidevice_variants:
    extra = {"parallel": "shard_map"}
    if name in ("local", "global"):
      extra["optimizer.gram"] = name
    group = ctx.group(
        f"multidevice-{name}",
        STUDY_TASK,
        name if name not in ("local", "global") else "best_filter",
        plan.multidevice_seeds,
        extra,
        devices=plan.multidevice_count,
    )
    if group is not None:
      rows[name] = {
          **group.describe(),
          "gram": name if name in ("local", "global") else "—",
          "devices": plan.multidevice_count,
          "seeds": len(group.results),
          **group.stats("dev_accuracy", "dev", "accuracy"),
          "step_seconds": group.step_seconds(),
      }
      gram = f"{name} Gram, " if name in ("local", "global") else ""
      condition = f"{gram}{plan.multidevice_count} host devices"
      values = [("accuracy", "dev_accuracy")]
      summary[name] = summary_rows("multidevice", rows[name], group, values, condition=condition)
  base = next((rows[n]["step_seconds"] for n in rows if n not in ("local", "global")), None)
  for row in rows.values():
    row["step_ratio_to_sgd"] = row["step_seconds"] / base if base else float("nan")
  comparisons = []
  if "local" in rows and "global" in rows:
    subject = {**rows["global"], "variant": "the global Gram"}
    baseline = {**rows["local"], "variant": "the per-device (local) Gram"}
    comparisons.append(
        comparison(
            subject,
            baseline,
            "dev_accuracy",
            study="multidevice",
            condition=f"SST-2 dev acc., {plan.multidevice_count} host devices",
        )
    )
  title = f"Local vs global Gram on {plan.multidevice_count} host devices"
  return {
      "title": title,
      "tables": {"multidevice": list(rows.values()), "summary": sum(summary.values(), [])},
      "comparisons": comparisons,
  }


def markdown(study: dict) -> str:
  columns = [
      OPTIMIZER,
      ("Gram", get("gram", str)),
      ("devices", get("devices", str)),
      SEEDS,
      ("SST-2 dev acc (%)", spread("dev_accuracy", "dev_accuracy_std")),
      RAN_ON,
      ("s/step", get("step_seconds")),
      ("× SGD (8 dev.)", get("step_ratio_to_sgd")),
  ]
  return table(study["tables"]["multidevice"], columns) + (
      "\n\nHost (CPU) devices share the same cores, so step times measure the extra work "
      "and communication of each mode, not a speed-up."
  )
