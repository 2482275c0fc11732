"""The default job (`bash run.sh` → ``python -m experiments.default_job``).

It reads the optimizer study's choices from a ``chosen.json`` (``tuning.Context.chosen``),
nothing of the study's run store; falls back to ``FALLBACK`` (and says so) when the file is
absent or lacks a choice; names the file when it is malformed; and plots training loss and dev
accuracy against step and dev accuracy against training seconds, one legend outside the axes.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import default_job
from nearprox.training import train
from tests.tiny_sst2 import write_sst2

REPO = Path(__file__).resolve().parents[1]

# A made-up study's decisions, in tuning.Context.chosen's layout.
CHOSEN = {
    "mode": "made_up",
    "tuning": {"task": "sst2", "steps": 10, "seeds": [0]},
    "aliases": {"best_filter": "proximal_ef", "best_proximal": "proximal_norm"},
    "variants": {
        "proximal_ef": {
            "label": "proximal SGD, EF",
            "overrides": {"optimizer.name": "proximal_sgd", "optimizer.filter": "natural"},
        },
        "proximal_norm": {
            "label": "normalized proximal SGD",
            "overrides": {
                "optimizer.name": "proximal_norm_sgd",
                "optimizer.learning_rate": 0.07,
                "optimizer.damping": 0.3,
            },
        },
        "adamw": {
            "label": "AdamW",
            "overrides": {"optimizer.name": "adamw", "optimizer.learning_rate": 3e-3},
        },
        "sgd_momentum": {
            "label": "SGD+momentum",
            "overrides": {
                "optimizer.name": "sgd",
                "optimizer.momentum": 0.8,
                "optimizer.learning_rate": 0.02,
            },
        },
    },
}

# Runs the job's __main__ in a process where importing the run store (experiments.runs) or the
# tuning that replays it fails: the job must not need them.
WITHOUT_RUN_STORE = (
    "import runpy, sys; "
    "sys.modules['experiments.runs'] = sys.modules['experiments.tuning'] = None; "
    "sys.argv[0] = 'default_job'; "
    "runpy.run_module('experiments.default_job', run_name='__main__', alter_sys=True)"
)


def run_job(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-c", WITHOUT_RUN_STORE, *flags],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
      env={**os.environ, "XLA_FLAGS": ""},
  )


def write_chosen(path: Path, chosen=CHOSEN) -> Path:
  path.write_text(chosen if isinstance(chosen, str) else json.dumps(chosen))
  return path


def test_default_job_trains_the_chosen_settings_and_plots(tmp_path):
  """The job on the tiny model, with a made-up chosen.json and no run store to import."""
  chosen = write_chosen(tmp_path / "chosen.json")
  completed = run_job(
      f"--workdir={tmp_path / 'job'}",
      f"--chosen={chosen}",
      "--config.model.name=tiny",
      "--config.task=sst2",
      f"--config.data_dir={write_sst2(tmp_path / 'glue')}",
      "--config.num_train_steps=6",
      "--config.log_every=2",
      "--config.eval_every=2",
      "--config.batch_size=8",
      "--config.max_length=16",
      "--config.max_eval_examples=16",
      "--config.export_hf=False",
      "--config.parallel=jit",
  )
  assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
  log = completed.stdout
  assert f"Settings: chosen by the optimizer study's tuning, read from {chosen}:" in log
  assert '"optimizer.learning_rate": 0.07, "optimizer.damping": 0.3' in log
  summary = json.loads((tmp_path / "job" / "summary.json").read_text())
  assert list(summary) == [
      "normalized proximal SGD (tuned)",
      "AdamW (tuned)",
      "SGD+momentum (tuned)",
  ]
  assert [r["optimizer"] for r in summary.values()] == ["proximal_norm_sgd", "adamw", "sgd"]
  assert all(r["steps"] == 6 and r["objective"] == "fgm" for r in summary.values())
  sgd = summary["SGD+momentum (tuned)"]
  assert "=== report ===" in log and f"{sgd['dev']['accuracy']:16.4f}" in log
  assert (tmp_path / "job" / "comparison.png").stat().st_size > 0
  rows = [json.loads(line) for line in (Path(sgd["workdir"]) / "metrics.jsonl").open()]
  assert [r["step"] for r in rows if "dev/accuracy" in r] == [2, 4, 6]


def test_the_chosen_overrides_reach_the_runs(tmp_path, monkeypatch):
  """Each run trains the job config with its variant's overrides, the alias resolved."""
  trained = {}

  def train_and_evaluate(config, workdir):
    trained[workdir.name] = config
    return {"params": None, "preempted": False}

  monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
  configs, lines = default_job.settings(default_job.job_config(), write_chosen(tmp_path / "c"))
  assert lines[0].startswith("Settings: chosen by the optimizer study's tuning")
  default_job.run(configs, tmp_path)
  assert list(trained) == ["0_proximal_norm_sgd", "1_adamw", "2_sgd"]
  proximal, adamw, sgd = trained.values()
  assert (proximal.optimizer.learning_rate, proximal.optimizer.damping) == (0.07, 0.3)
  assert (adamw.optimizer.learning_rate, sgd.optimizer.learning_rate) == (3e-3, 0.02)
  assert sgd.optimizer.momentum == 0.8
  assert all(c.num_train_steps == 100 and c.eval_every == 20 for c in trained.values())


def test_the_committed_chosen_json_decides_all_three_runs():
  choices, fallback = default_job.study_choices(default_job.CHOSEN)
  assert fallback is None
  assert [label for label, _ in choices][1:] == ["AdamW (tuned)", "SGD+momentum (tuned)"]
  proximal = choices[0][1]
  assert proximal["optimizer.name"].startswith("proximal")
  assert {"optimizer.learning_rate", "optimizer.damping"} <= set(proximal)
  default_job.settings(default_job.job_config(), default_job.CHOSEN)  # valid overrides


@pytest.mark.parametrize(
    "change",
    [
        None,  # no file
        lambda c: c["aliases"].update(best_proximal=None),  # its tuning is not complete
        lambda c: c["variants"].pop("sgd_momentum"),
    ],
)
def test_without_a_choice_the_job_runs_the_fallback_and_says_so(tmp_path, change):
  path = tmp_path / "chosen.json"
  if change:
    chosen = json.loads(json.dumps(CHOSEN))
    change(chosen)
    write_chosen(path, chosen)
  configs, lines = default_job.settings(default_job.job_config(), path)
  assert list(configs) == [label for label, _ in default_job.FALLBACK]
  assert lines[0].startswith("Settings: the default ones (FALLBACK")
  assert str(path) in lines[0]
  assert ("does not exist" if change is None else "has no choice yet for") in lines[0]
  assert [c.optimizer.name for c in configs.values()] == ["proximal_sgd", "adamw", "sgd"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"variants": {', "is not valid JSON"),
        ("[1, 2]", 'expected an object with "aliases" and "variants"'),
        ({"aliases": {}, "variants": {"adamw": "AdamW"}}, "variant 'adamw' needs a \"label\""),
        (
            {**CHOSEN, "aliases": {"best_proximal": ["proximal_norm"]}},
            "alias 'best_proximal' names",
        ),
    ],
)
def test_a_malformed_chosen_json_is_an_error_that_names_it(tmp_path, content, message):
  path = write_chosen(tmp_path / "chosen.json", content)
  with pytest.raises(ValueError, match=f"^{re.escape(str(path))}.*{re.escape(message)}"):
    default_job.study_choices(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"optimizer.nmae": "sgd"}, "'optimizer.nmae' names no field"),
        ({"seed.x": 1}, "'seed.x' names no field"),
        ({"optimizer.learning_rate": "fast"}, "'optimizer.learning_rate'='fast'"),
    ],
)
def test_an_override_the_job_config_lacks_is_an_error_that_names_the_file(
    tmp_path, override, message
):
  chosen = json.loads(json.dumps(CHOSEN))
  chosen["variants"]["adamw"]["overrides"].update(override)
  path = write_chosen(tmp_path / "chosen.json", chosen)
  with pytest.raises(ValueError, match=f"^{re.escape(f'{path}: override {message}')}"):
    default_job.settings(default_job.job_config(), path)


def test_the_job_stops_on_a_malformed_chosen_json_before_training(tmp_path):
  path = write_chosen(tmp_path / "chosen.json", "not json")
  completed = run_job(f"--workdir={tmp_path / 'job'}", f"--chosen={path}")
  assert completed.returncode != 0
  assert f"error: {path} is not valid JSON" in completed.stderr
  assert not (tmp_path / "job").exists()


def test_the_job_does_not_import_the_run_store():
  code = "import sys, experiments.default_job; print('experiments.runs' in sys.modules)"
  out = subprocess.run(
      [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "False"


def write_metrics(workdir: Path, step_time: float, dev_every=20, steps=100, log_every=10):
  """A run's metrics.jsonl as train.py writes it (a final dev row written twice: a rerun)."""
  workdir.mkdir(parents=True)
  rows = []
  for step in range(1, steps + 1):
    if step % log_every == 0:
      rows.append({"step": step, "train/loss": 1 / step, "train/step_time": step_time})
    if step % dev_every == 0:
      rows.append({"step": step, "dev/accuracy": 0.5 + step / 1000})
  rows.append({"step": steps, "dev/accuracy": 0.5 + steps / 1000})
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_plot_has_three_panels_one_legend_outside_them_and_the_dev_curves(tmp_path):
  labels = ["proximal SGD, iEF (natural, iEF weights) → AdamW (tuned)", "AdamW", "SGD"]
  workdirs = {label: tmp_path / str(i) for i, label in enumerate(labels)}
  for i, workdir in enumerate(workdirs.values()):
    write_metrics(workdir, step_time=0.5 * (i + 1), dev_every=15 if i == 2 else 20)
  fig = default_job.figure(workdirs)
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  loss_ax, step_ax, time_ax = fig.axes
  assert len(fig.axes) == 3 and not any(ax.get_legend() for ax in fig.axes)
  (legend,) = fig.legends
  assert [t.get_text() for t in legend.get_texts()] == labels
  box = legend.get_window_extent(renderer).transformed(fig.transFigure.inverted())
  assert 0 <= box.x0 and box.x1 <= 1 and 0 <= box.y0 and box.y1 <= 1  # in the figure
  for ax in fig.axes:
    assert not box.overlaps(ax.get_tightbbox(renderer).transformed(fig.transFigure.inverted()))
  assert "training seconds" in time_ax.get_xlabel() and "evaluation" in time_ax.get_xlabel()
  for ax in (step_ax, time_ax):
    assert [len(line.get_xdata()) for line in ax.get_lines()] == [5, 5, 7]
  np.testing.assert_array_equal(step_ax.get_lines()[0].get_xdata(), [20, 40, 60, 80, 100])
  # Training seconds: the summed step times (0.5, 1.0 and 1.5 s a step) up to each dev step.
  np.testing.assert_allclose(time_ax.get_lines()[1].get_xdata(), [20, 40, 60, 80, 100])
  np.testing.assert_allclose(
      time_ax.get_lines()[2].get_xdata(), 1.5 * np.array([15, 30, 45, 60, 75, 90, 100])
  )
  default_job.plot(workdirs, tmp_path / "comparison.png")
  assert (tmp_path / "comparison.png").stat().st_size > 0


def test_the_report_keeps_its_columns_aligned_with_long_labels(tmp_path):
  """Labels longer than a column are listed above the table, which numbers its columns."""
  labels = ["proximal SGD, iEF (natural, iEF weights) → AdamW (tuned)", "AdamW (tuned)", "SGD"]
  reports = {
      label: {"dev": {"accuracy": 0.5 + i / 10}, "train_step_seconds": 1.0, "hf_model": None}
      for i, label in enumerate(labels)
  }
  lines = default_job.report_lines(reports, {label: tmp_path for label in labels})
  assert lines[1:4] == [f"({i}) {label}" for i, label in enumerate(labels, 1)]
  table = lines[5:8]
  assert table[0].split() == ["(1)", "(2)", "(3)"] and len({len(row) for row in table}) == 1
  assert table[1].split()[-3:] == ["0.5000", "0.6000", "0.7000"]
