"""The run store (experiments/runs.py, experiments/run_process.py): run keys, reuse of a run
asked for with and without an attack, resuming from checkpoints (furthest along first, after
SIGTERM, during the attack, in a multi-device subprocess), progress lines, the deadline rule
that starts only runs whose shape ends in time, and workers sharing one store.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from experiments import run_process, runs, studies, tuning
from tests.tiny_sst2 import tiny_config, write_sst2

REPO = Path(__file__).resolve().parents[1]


def fake_run(config, key, devices=1, attack=None, **fields):
  """A run file with the fields the executor reads (``run_process.execute`` writes more)."""
  rows = [{"epsilon": e, "accuracy": 0.5} for e in attack.epsilons] if attack else None
  result = {"key": key, "config": config.to_dict(), "devices": devices, "attack": rows}
  result |= {
      "wall_seconds": 1,
      "report": {"train_step_seconds": 0.5},
      "machine": run_process.machine(),
  }
  return result | fields


def test_run_keys_survive_new_config_fields_but_not_new_values(monkeypatch):
  from experiments.configs import default, full

  config = full.get_config()
  key = runs.run_key(config, 1, None)
  assert key == runs.run_key(full.get_config(), 1, None)
  # A feature added later: a new field whose default keeps the old behaviour.
  original = default.get_config

  def with_new_field():
    config = original()
    config.optimizer.new_option = 0
    return config

  monkeypatch.setattr(default, "get_config", with_new_field)
  extended = full.get_config()
  assert extended.optimizer.new_option == 0
  assert runs.run_key(extended, 1, None) == key
  extended.optimizer.new_option = 1
  assert runs.run_key(extended, 1, None) != key
  changed = full.get_config()
  changed.optimizer.learning_rate = 0.5
  assert runs.run_key(changed, 1, None) != key
  assert runs.run_key(config, 8, None) != key
  # Where the data is and how often to checkpoint do not decide the numbers.
  elsewhere = runs.apply_overrides(
      config, {"data_dir": "/elsewhere", "progress": False, "checkpoint_minutes": 1.0}
  )
  assert runs.run_key(elsewhere, 1, None) == key


def test_every_stored_run_is_named_by_the_key_of_its_stored_config():
  """A request without robustness evaluation finds an attacked twin by the key of the twin's
  stored config (:meth:`runs.Executor.run`): that key must be the one its request had."""
  stored = sorted((REPO / "experiments" / "results").glob("*/runs/*.json"))
  assert stored
  for path in stored:
    result = json.loads(path.read_text())
    config = ml_collections.ConfigDict(result["config"])
    if result["attack"] is None:
      assert runs.run_key(config, result["devices"], None) == path.stem, path


def test_a_run_asked_for_with_and_without_an_attack_is_trained_once(tmp_path, monkeypatch):
  """The adversarial study's clean runs are the optimizer study's runs plus an evaluation of
  the final parameters: the pass that trains nothing records the attack, the first request
  (without it) trains the run with it, the second finds it; a later invocation that only asks
  without the attack reads the attacked run; a run stored without the attack stays the
  answer to requests without it."""
  from experiments import reproduce
  from experiments.configs import full

  trained = []

  def fake_execute(config, workdir, attack, label, key, devices):
    trained.append((label, attack))
    return fake_run(config, key, devices, attack)

  monkeypatch.setattr(run_process, "execute", fake_execute)
  attack = run_process.Attack((0.0, 0.1), 2, 8)
  asked = {}

  def optimizers(ctx):
    asked["plain"] = [ctx.ex.run(f"opt{s}", {"seed": s}) for s in (0, 1)]

  def adversarial(ctx):
    asked["attacked"] = [ctx.ex.run(f"adv{s}", {"seed": s}, attack=attack) for s in (0, 1)]

  monkeypatch.setattr(studies, "FUNCTIONS", {"optimizers": optimizers, "adversarial": adversarial})
  plan = full.get_plan()
  plan.studies = ("optimizers", "adversarial")
  out = tmp_path / "out"
  key = lambda seed, a: runs.run_key(runs.apply_overrides(full.get_config(), {"seed": seed}), 1, a)
  run_process.write_json(  # seed 1 was stored without the attack before
      out / "runs" / f"{key(1, None)}.json",
      fake_run(full.get_config(), key(1, None)) | {"config": {}},
  )
  executor = runs.Executor(full.get_config(), out, tmp_path / "work", log=lambda _: None)
  unstored = reproduce.plan_runs(plan, executor)
  assert trained == [] and executor.planned_attacks == {key(s, None): attack for s in (0, 1)}
  assert {k: asked_by for k, (asked_by, _) in unstored.items()} == {
      key(0, None): {"optimizers"},
      key(0, attack): {"adversarial"},
      key(1, attack): {"adversarial"},
  }
  assert unstored[key(1, attack)][1] == ("adv1", {"seed": 1}, 1, attack)
  optimizers(tuning.Context(plan, executor))
  adversarial(tuning.Context(plan, executor))
  assert trained == [("opt0", attack), ("adv1", attack)]
  assert asked["plain"][0] == asked["attacked"][0]  # one run answers both
  assert asked["plain"][0]["key"] == key(0, attack) and asked["plain"][1]["config"] == {}
  assert asked["attacked"][1]["key"] == key(1, attack)
  stored = sorted(p.stem for p in (out / "runs").glob("*.json"))
  assert stored == sorted([key(0, attack), key(1, None), key(1, attack)])
  later = runs.Executor(full.get_config(), out, tmp_path / "work", allow_new=False)
  assert later.run("opt0", {"seed": 0})["key"] == key(0, attack)
  assert later.run("opt1", {"seed": 1})["config"] == {}
  assert later.requested == [key(0, attack), key(1, None)] and later.missing == {}


def test_runs_stopped_with_a_checkpoint_resume_first_furthest_along_first(tmp_path, monkeypatch):
  """Before anything new trains, the runs a SIGTERM stopped resume (those a study of --only
  asks for), the one with the most of its steps trained first."""
  from experiments import reproduce
  from experiments.configs import full

  trained = []

  def fake_execute(config, workdir, attack, label, key, devices):
    trained.append(label)
    return fake_run(config, key, devices, attack)

  monkeypatch.setattr(run_process, "execute", fake_execute)

  def optimizers(ctx):
    for seed in range(4):
      ctx.ex.run(f"opt{seed}", {"seed": seed, "num_train_steps": 100 * (seed + 1)})

  def squad(ctx):
    ctx.ex.run("qa", {"task": "squad"})

  monkeypatch.setattr(studies, "FUNCTIONS", {"optimizers": optimizers, "squad": squad})
  plan = full.get_plan()
  plan.studies = ("optimizers", "squad")
  work, logs = tmp_path / "work", []
  executor = runs.Executor(full.get_config(), tmp_path / "out", work, log=logs.append)
  unstored = reproduce.plan_runs(plan, executor)
  assert [request[0] for _, request in unstored.values()] == ["opt0", "opt1", "opt2", "opt3", "qa"]
  key = {request[0]: k for k, (_, request) in unstored.items()}
  for label, step in (("opt1", 100), ("opt2", 240), ("opt3", 10), ("qa", 5)):
    (work / key[label] / "checkpoints" / str(step)).mkdir(parents=True)
  (work / key["opt0"] / "checkpoints" / "tmp").mkdir(parents=True)  # not a step: no checkpoint
  reproduce.resume_stopped(unstored, ["optimizers"], executor)
  # 240 of 300 steps, 100 of 200, 10 of 400; qa's study is not in --only.
  assert trained == ["opt2", "opt1", "opt3"]
  started = [line for line in logs if line.startswith("[run]")]
  assert started == [
      f"[run] {label} ({key[label]}, from its checkpoint at step {step}) ..."
      for label, step in (("opt2", 240), ("opt1", 100), ("opt3", 10))
  ]
  assert executor.saved_step(key["qa"]) == 5 and executor.saved_step(key["opt0"]) == 0


def test_a_run_in_training_logs_its_progress(tmp_path, monkeypatch):
  """While a run trains, the log gets its latest step, step time and training time left at
  most once per logged step; the trainer's rows are read as they land, a half-written line
  is skipped, and nothing is logged after the run ends."""
  import time

  from experiments.configs import full

  def fake_execute(config, workdir, attack, label, key, devices):
    workdir.mkdir(parents=True)
    with open(workdir / "metrics.jsonl", "a") as metrics:
      for step in (20, 40):
        time.sleep(0.5)
        metrics.write(json.dumps({"step": step, "train/step_time": 3.0}) + "\n")
        metrics.write(json.dumps({"step": step, "dev/accuracy": 0.5}) + "\n")
        metrics.flush()
      metrics.write('{"step": 60, "train/st')  # being written
      metrics.flush()
      time.sleep(0.5)
    return fake_run(config, key, devices, attack)

  monkeypatch.setattr(run_process, "execute", fake_execute)
  logs = []
  executor = runs.Executor(
      full.get_config(), tmp_path / "out", tmp_path / "work", log=logs.append, progress_seconds=0.1
  )
  executor.run("opt0", {"seed": 0})
  progress = [line for line in logs if line.startswith("[progress]")]
  assert progress == [
      "[progress] opt0: step 20/600, 3.00 s/step, about 29 min of training left",
      "[progress] opt0: step 40/600, 3.00 s/step, about 28 min of training left",
  ]
  assert logs[-1].startswith("[done] opt0")


def test_a_run_starts_only_if_runs_of_its_shape_ended_in_the_time_left(tmp_path, monkeypatch):
  """With a deadline, a run starts only if the stored runs of its shape (other seeds and rates,
  this kind of machine, this host's runs when it has some) took, at the median, no longer than
  the time left (scaled to the steps its checkpoint has not trained); a run of a shape never
  stored starts until the deadline, and none after it."""
  import time

  from experiments.configs import full

  trained = []

  def fake_execute(config, workdir, attack, label, key, devices):
    trained.append(label)
    result = {"config": config.to_dict(), "devices": devices, "attack": None, "wall_seconds": 1}
    return result | {"key": key, "report": {"train_step_seconds": 0.5}, "machine": here}

  monkeypatch.setattr(run_process, "execute", fake_execute)
  out = tmp_path / "out"
  here = run_process.machine()
  elsewhere = {**here, "cpus": here["cpus"] + 7}
  faster_host = {**here, "platform": "Linux-faster-x86_64"}  # the same kind of machine
  stored = [(0, 1e-4, 900, here), (1, 1e-4, 1000, here), (2, 3e-4, 5000, here)]
  stored += [(seed, 1e-4, 10, faster_host) for seed in (5, 6, 7, 8, 12)]  # this host's count
  for seed, lr, wall, machine in stored + [(3, 1e-4, 10, elsewhere), (4, 1e-4, 10, here)]:
    overrides = {"optimizer.name": "adamw", "optimizer.learning_rate": lr, "seed": seed}
    if seed == 4:  # another shape: a longer run
      overrides["num_train_steps"] = 10_000
    if seed == 12:  # a shape stored on another host only: its time there is the estimate
      overrides |= {"optimizer.name": "sgd", "num_train_steps": 20_000}
      wall = 5000
    config = runs.apply_overrides(full.get_config(), overrides)
    result = {"config": config.to_dict(), "devices": 1, "attack": None, "wall_seconds": wall}
    if seed == 1:  # stored before a field was added (at its default: the same shape)
      del result["config"]["optimizer"]["sketch_dim"]
    run_process.write_json(
        out / "runs" / f"{runs.run_key(config, 1, None)}.json", result | {"machine": machine}
    )
  executor = runs.Executor(full.get_config(), out, tmp_path / "work")
  adamw = {"optimizer.name": "adamw", "optimizer.learning_rate": 2e-4, "seed": 9}
  executor.deadline = time.time() + 600  # the median run of its shape took 1000 s
  assert executor.run("adamw", adamw) is None and trained == []
  assert "adamw" in executor.missing.values()
  long_sgd = {"optimizer.name": "sgd", "num_train_steps": 20_000, "seed": 9}
  assert executor.run("long sgd", long_sgd) is None and trained == []
  assert executor.run("sgd", {"optimizer.name": "sgd", "seed": 9}) is not None  # a new shape
  executor.missing.clear()
  resumed = {**adamw, "seed": 10}  # 450 of its 600 steps are checkpointed: 250 s to go
  key = runs.run_key(runs.apply_overrides(full.get_config(), resumed), 1, None)
  (tmp_path / "work" / key / "checkpoints" / "450").mkdir(parents=True)
  assert executor.run("resumed", resumed) is not None and trained == ["sgd", "resumed"]
  executor.deadline = time.time() + 1200
  assert executor.run("adamw", adamw) is not None and trained == ["sgd", "resumed", "adamw"]
  executor.deadline = time.time() - 1
  assert executor.run("late", {"optimizer.name": "sgd", "seed": 11}) is None
  assert trained == ["sgd", "resumed", "adamw"]


def test_workers_sharing_a_run_store_train_each_run_once(tmp_path, monkeypatch):
  """``--claim_runs``: a run claimed by a live process is left to it; a claim whose process
  died on this host is taken over; the claim goes once the run file exists."""
  import socket

  from experiments.configs import full

  trained = []

  def fake_execute(config, workdir, attack, label, key, devices):
    trained.append(label)
    return fake_run(config, key, devices)

  monkeypatch.setattr(run_process, "execute", fake_execute)
  claims = tmp_path / "claims"
  executor = runs.Executor(full.get_config(), tmp_path / "out", tmp_path, claims=claims)
  config = lambda seed: runs.apply_overrides(full.get_config(), {"seed": seed})
  key = lambda seed: runs.run_key(config(seed), 1, None)
  claims.mkdir()
  host = socket.gethostname()
  (claims / f"{key(0)}.claim").write_text(f"{host} {os.getppid()}")  # a live process
  (claims / f"{key(1)}.claim").write_text(f"other-host {os.getpid()}")  # can't tell: leave it
  dead = subprocess.Popen(["true"])  # a pid that no longer runs
  dead.wait()
  (claims / f"{key(2)}.claim").write_text(f"{host} {dead.pid}")

  assert executor.run("seed0", {"seed": 0}) is None
  assert executor.run("seed1", {"seed": 1}) is None
  assert executor.missing[key(0)] == "seed0 (running in another process)"
  assert executor.run("seed2", {"seed": 2})["key"] == key(2)
  assert executor.run("seed3", {"seed": 3})["key"] == key(3)
  assert trained == ["seed2", "seed3"]
  assert sorted(p.name for p in claims.iterdir()) == sorted([f"{key(0)}.claim", f"{key(1)}.claim"])
  # Once the other process has stored its run, every worker reads it instead of training.
  run_process.write_json(tmp_path / "out" / "runs" / f"{key(0)}.json", fake_run(config(0), key(0)))
  fresh = runs.Executor(full.get_config(), tmp_path / "out", tmp_path, claims=claims)
  assert fresh.run("seed0", {"seed": 0})["key"] == key(0)
  assert trained == ["seed2", "seed3"]
  # A run another machine stored while this one trained it: the first stays, ours is kept aside.
  first = fake_run(config(4), key(4), report={"train_step_seconds": 0.1})

  def stored_meanwhile(config, workdir, attack, label, key, devices):
    run_process.write_json(tmp_path / "out" / "runs" / f"{key}.json", first)
    return fake_run(config, key, devices, machine={**run_process.machine(), "device_kind": "cpu"})

  monkeypatch.setattr(run_process, "execute", stored_meanwhile)
  assert fresh.run("seed4", {"seed": 4}) == first
  (twin,) = (tmp_path / "out" / "duplicates").glob(f"{key(4)}.cpu.*.json")
  assert json.loads(twin.read_text())["report"]["train_step_seconds"] == 0.5


def test_a_run_stopped_by_sigterm_resumes_from_its_checkpoint(tmp_path, monkeypatch):
  """SIGTERM stops a run after 3 of 6 steps; the rerun resumes from the latest checkpoint
  (step 2 here: the one at step 3 is removed), drops the log rows past it, and stores the
  straight run's numbers with both processes' segments and their summed times."""
  import shutil
  import signal

  from nearprox.training import train

  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  config = tiny_config(
      write_sst2(tmp_path / "glue", n_train=32, n_dev=16),
      **{"num_train_steps": 6, "log_every": 1, "eval_every": 100, "checkpoint_every": 2},
  )
  config.parallel = "jit"
  straight = run_process.execute(config, tmp_path / "straight", None, "straight", "k0", 1)
  executor = runs.Executor(config, tmp_path / "out", tmp_path / "work")
  real_batches = train.train_batches

  def preempting(*args):
    for i, batch in enumerate(real_batches(*args)):
      if i == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(train, "train_batches", preempting)
  with pytest.raises(SystemExit, match="stopped by SIGTERM at step 3"):
    executor.run("stopped", {})
  monkeypatch.setattr(train, "train_batches", real_batches)
  (workdir,) = [p for p in (tmp_path / "work").iterdir() if p.is_dir()]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
  shutil.rmtree(workdir / "checkpoints" / "3")  # as if killed before the SIGTERM save

  result = runs.Executor(config, tmp_path / "out", tmp_path / "work").run("stopped", {})
  assert (result["report"]["start_step"], result["report"]["steps"]) == (2, 6)
  assert result["report"]["dev"] == straight["report"]["dev"]
  steps = lambda history: [row["step"] for row in history if "train/loss" in row]
  assert steps(result["history"]) == steps(straight["history"]) == [1, 2, 3, 4, 5, 6]
  segments = result["segments"]
  assert [(s["from_step"], s["to_step"]) for s in segments] == [(0, 3), (2, 6)]
  # Step time and machine: those of the segment that trained the most steps (4 of them).
  assert result["report"]["train_step_seconds"] == segments[1]["train_step_seconds"] > 0
  assert result["machine"] == segments[1]["machine"]
  assert result["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in segments))
  assert result["cpu_seconds"] == pytest.approx(sum(s["cpu_seconds"] for s in segments))
  assert not workdir.exists()  # the stored run leaves no scratch behind


def test_sigterm_during_the_attack_resumes_at_the_last_step(tmp_path, monkeypatch):
  """SIGTERM while the trained run is attacked stops it without a result; the rerun resumes
  from the last step's checkpoint (nothing trained again) and attacks there."""
  import signal

  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  config = tiny_config(
      write_sst2(tmp_path / "glue", n_train=32, n_dev=16),
      **{"num_train_steps": 4, "eval_every": 100, "checkpoint_every": 100, "parallel": "jit"},
  )
  attack = run_process.Attack(epsilons=(0.0, 0.1), num_steps=1, examples=8)
  attacked = []

  def sigterm_then_attack(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return [{"epsilon": 0.0, "accuracy": 1.0}]

  monkeypatch.setattr(run_process, "_attack", sigterm_then_attack)
  executor = runs.Executor(config, tmp_path / "out", tmp_path / "work")
  with pytest.raises(SystemExit, match="stopped by SIGTERM at step 4"):
    executor.run("attacked", {}, attack=attack)
  monkeypatch.setattr(
      run_process, "_attack", lambda *args: attacked.append(args) or [{"epsilon": 0.0}]
  )
  result = runs.Executor(config, tmp_path / "out", tmp_path / "work").run(
      "attacked", {}, attack=attack
  )
  assert len(attacked) == 1 and result["attack"] == [{"epsilon": 0.0}]
  assert [(s["from_step"], s["to_step"]) for s in result["segments"]] == [(0, 4), (4, 4)]
  assert result["report"]["train_step_seconds"] == result["segments"][0]["train_step_seconds"]


def test_sigterm_reaches_a_multi_device_run_s_subprocess(tmp_path, monkeypatch):
  """A multi-device run trains in a child process: SIGTERM to the parent is passed on to it,
  and the child's "stopped, checkpoint saved" exit becomes RunPreempted, not a failure."""
  import signal
  import threading

  from experiments.configs import full

  started = tmp_path / "started"
  child = tmp_path / "child.py"
  child.write_text(
      f"#!{sys.executable}\n"
      "import pathlib, signal, sys, time\n"
      "def stop(*_):\n"
      "  print('run x stopped by SIGTERM at step 3', file=sys.stderr)\n"
      f"  sys.exit({run_process.PREEMPTED_EXIT_CODE})\n"
      "signal.signal(signal.SIGTERM, stop)\n"
      f"pathlib.Path({str(started)!r}).touch()\n"
      "time.sleep(60)\n"
  )
  child.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(child))  # the run_spec command's interpreter

  def terminate_parent_once_the_child_runs():
    while not started.exists():
      threading.Event().wait(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

  handler = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=terminate_parent_once_the_child_runs, daemon=True).start()
  executor = runs.Executor(full.get_config(), tmp_path / "out", tmp_path / "work")
  with pytest.raises(run_process.RunPreempted, match="stopped by SIGTERM at step 3"):
    executor.run("two devices", {}, devices=2)
  assert signal.getsignal(signal.SIGTERM) is handler  # the parent's own handler is back
