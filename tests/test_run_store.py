"""The run store (experiments/runs.py), one run's process (experiments/run_process.py) and
the Ray runner (experiments/ray_runner.py): run keys, reuse of a run asked for with and
without an attack, resuming from checkpoints (after SIGTERM, during the attack, furthest along
first, stopped through the STOP file), progress lines, and runs trained as Ray tasks (in
parallel, multi-device through the runtime environment, a failing run logged and skipped).
"""

import json
import os
import signal
import time
import warnings
from pathlib import Path

import ml_collections
import pytest

from experiments import ray_runner, run_process, runs
from tests.tiny_sst2 import tiny_config, write_sst2

REPO = Path(__file__).resolve().parents[1]


def fake_run(config, key, devices=1, attack=None, **fields):
  """A run record with the fields the store reads (``run_process.execute`` writes more)."""
  rows = [{"epsilon": e, "accuracy": 0.5} for e in attack.epsilons] if attack else None
  result = {"key": key, "config": config.to_dict(), "devices": devices, "attack": rows}
  result |= {"wall_seconds": 1, "report": {"train_step_seconds": 0.5}}
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
  # A tuple field (length_buckets) comes back from a run record's JSON as a list.
  stored = ml_collections.ConfigDict(json.loads(json.dumps(config.to_dict())))
  assert isinstance(stored.length_buckets, list) and runs.run_key(stored, 1, None) == key
  bucketed = runs.apply_overrides(config, {"length_buckets": (16, 64)})
  stored = ml_collections.ConfigDict(json.loads(json.dumps(bucketed.to_dict())))
  assert runs.run_key(stored, 1, None) == runs.run_key(bucketed, 1, None) != key


def test_every_stored_run_is_named_by_the_key_of_its_stored_config():
  """A request without robustness evaluation finds an attacked twin by the key of the twin's
  stored config (:meth:`runs.RunStore.run`): that key must be the one its request had."""
  stored = sorted((REPO / "experiments" / "results").glob("*/runs/*.json"))
  assert stored
  for path in stored:
    result = json.loads(path.read_text())
    config = ml_collections.ConfigDict(result["config"])
    if result["attack"] is None:
      assert runs.run_key(config, result["devices"], None) == path.stem, path


def test_a_run_asked_for_with_and_without_an_attack_is_trained_once(tmp_path):
  """The adversarial study's clean runs are the optimizer study's runs plus an evaluation of
  the final parameters: in one pass, the request without the attack is not trained when one
  with it is pending; the next pass answers it with the attacked record; a run stored without
  the attack stays the answer to requests without it."""
  from experiments.configs import full

  attack = run_process.Attack((0.0, 0.1), 2, 8)
  config, out = full.get_config(), tmp_path / "out"
  key = lambda seed, a: runs.run_key(runs.apply_overrides(config, {"seed": seed}), 1, a)
  runs.RunStore(config, out).save(fake_run(config, key(1, None)) | {"config": {}})
  store = runs.RunStore(config, out)
  assert store.run("opt0", {"seed": 0}) is None
  assert store.run("opt1", {"seed": 1})["config"] == {}  # stored without the attack
  assert [store.run(f"adv{s}", {"seed": s}, attack=attack) for s in (0, 1)] == [None, None]
  assert store.planned_attacks == {key(s, None): attack for s in (0, 1)}
  assert [(r.label, r.key) for r in store.to_train()] == [
      ("adv0", key(0, attack)),
      ("adv1", key(1, attack)),
  ]
  for request in store.to_train():
    store.save(fake_run(request.config, request.key, attack=attack))
  later = runs.RunStore(config, out)
  assert later.run("opt0", {"seed": 0})["key"] == key(0, attack)  # one run answers both
  assert later.run("opt1", {"seed": 1})["config"] == {}
  assert later.requested == [key(0, attack), key(1, None)] and later.missing == {}
  assert later.to_train() == []


def test_failed_runs_are_missing_but_not_asked_for_again(tmp_path):
  from experiments.configs import full

  config = full.get_config()
  key = runs.run_key(runs.apply_overrides(config, {"seed": 5}), 1, None)
  store = runs.RunStore(config, tmp_path, failed={key: "opt5"})
  assert store.run("opt5", {"seed": 5}) is None
  assert store.missing == {key: "opt5 (failed)"} and store.to_train() == []


def test_a_runs_expected_time_is_that_of_the_stored_runs_most_like_it(tmp_path):
  """The median wall time of the runs with its label but another seed, else of those with its
  task, optimizer, steps and batch size; None when no stored run is like it."""
  from experiments.configs import full

  config, out = full.get_config(), tmp_path / "out"
  saved = runs.RunStore(config, out)
  for seed, seconds in ((0, 100), (1, 300), (2, 200)):
    settings = runs.apply_overrides(config, {"seed": seed})
    saved.save(
        fake_run(settings, f"a{seed}", label=f"opt:sst2:adamw:seed={seed}", wall_seconds=seconds)
    )
  other = runs.apply_overrides(config, {"optimizer.learning_rate": 0.5})
  saved.save(fake_run(other, "b", label="tune:sst2:adamw:lr=0.5:seed=0", wall_seconds=1000))
  store = runs.RunStore(config, out)
  store.run("opt:sst2:adamw:seed=3", {"seed": 3})
  store.run("tune:sst2:adamw:lr=0.1:seed=0", {"optimizer.learning_rate": 0.1})
  store.run("opt:sst2:adamw:steps=50:seed=0", {"num_train_steps": 50})
  expected = [store.expected_seconds(r) for r in store.to_train()]
  assert expected == [200, 250, None]  # its label's; its setup's (100, 200, 300, 1000); none


def test_a_run_that_would_not_end_before_the_deadline_is_deferred_not_started(tmp_path):
  """The task body (without Ray): a run expected to outlast the time left returns at once,
  creating nothing in the workdir, and says how long it needs."""
  from experiments.configs import full

  store = runs.RunStore(full.get_config(), tmp_path / "out")
  store.run("opt:sst2:adamw:seed=0", {})
  (request,) = store.to_train()
  task = ray_runner._train_task._function
  answer = task(request, str(tmp_path / "work"), time.time() + 600, 3600.0)
  assert answer["status"] == "deferred"
  assert "about 60 min, 10 min left" in answer["message"]
  assert not (tmp_path / "work" / request.key).exists()


def test_stopped_runs_go_first_furthest_along_first(tmp_path):
  """Runs with a checkpoint in the workdir go first, the one with the most of its steps
  trained first (a folder that is not a step is no checkpoint); the rest keep their order."""
  from experiments.configs import full

  store = runs.RunStore(full.get_config(), tmp_path / "out")
  for seed in range(4):
    store.run(f"opt{seed}", {"seed": seed, "num_train_steps": 100 * (seed + 1)})
  store.run("qa", {"task": "squad"})
  key = {r.label: r.key for r in store.to_train()}
  work = tmp_path / "work"
  for label, step in (("opt1", 100), ("opt2", 240), ("opt3", 10)):
    (work / key[label] / "checkpoints" / str(step)).mkdir(parents=True)
  (work / key["opt0"] / "checkpoints" / "tmp").mkdir(parents=True)
  ordered = [(r.label, step) for r, step in ray_runner.in_order(store.to_train(), work)]
  # 240 of 300 steps, 100 of 200, 10 of 400.
  assert ordered == [("opt2", 240), ("opt1", 100), ("opt3", 10), ("opt0", 0), ("qa", 0)]
  # --first: after the checkpointed runs, the labels asked for come first.
  ordered = [r.label for r, _ in ray_runner.in_order(store.to_train(), work, first=["qa"])]
  assert ordered == ["opt2", "opt1", "opt3", "qa", "opt0"]


def test_a_pass_trains_the_runs_asked_first_alone_while_any_is_left(tmp_path):
  """--first: a pass holds only those runs (the runs they decide join the next pass ahead of
  the rest); once none is left, every run."""
  from experiments.configs import full

  store = runs.RunStore(full.get_config(), tmp_path)
  for seed in range(2):
    store.run(f"tune:eq8:seed={seed}", {"seed": seed})
    store.run(f"tune:muon:seed={seed}", {"seed": seed, "optimizer.name": "muon"})
  labels = lambda requests: [r.label for r in requests]
  requests = store.to_train()
  assert labels(ray_runner.this_pass(requests, ["eq8"])) == ["tune:eq8:seed=0", "tune:eq8:seed=1"]
  assert labels(ray_runner.this_pass(requests, ["lion"])) == labels(requests)
  assert labels(ray_runner.this_pass(requests, [])) == labels(requests)


def test_runs_of_a_large_batch_reserve_the_memory_the_plan_declares(tmp_path):
  """A plan's memory_gib_by_batch_size becomes the Ray memory option of those runs only."""
  from experiments.configs import full
  from experiments.reproduce import run_memory_gib

  plan = full.get_plan()
  store = runs.RunStore(full.get_config(), tmp_path)
  for batch_size in (32, 512):
    store.run(f"B={batch_size}", {"batch_size": batch_size})
  small, large = store.to_train()
  assert (run_memory_gib(plan, small), run_memory_gib(plan, large)) == (0.0, 14.0)
  options = [
      ray_runner.task_options(r, 1.0, 0.0, 2, run_memory_gib(plan, r)) for r in (small, large)
  ]
  assert "memory" not in options[0] and options[1]["memory"] == 14 * 2**30
  assert options[1]["num_cpus"] == 1.0 and options[1]["runtime_env"] == options[0]["runtime_env"]
  assert run_memory_gib(ml_collections.ConfigDict(), large) == 0.0  # a plan without the field


def test_one_cpu_runs_get_single_threaded_xla_kernels(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8")
  flags = lambda *args: ray_runner.runtime_env(*args)["env_vars"]["XLA_FLAGS"].split()
  one = flags(1, 1.0)
  assert set(ray_runner.SINGLE_THREAD_XLA_FLAGS) <= set(one)
  assert "--xla_dump_to=/tmp/x" in one and "--xla_force_host_platform_device_count=1" in one
  assert not set(ray_runner.SINGLE_THREAD_XLA_FLAGS) & set(flags(1, 2.0))  # a run with 2 CPUs
  two_devices = flags(2, 1.0)  # host devices: the pool as it was
  assert "--xla_force_host_platform_device_count=2" in two_devices
  assert not set(ray_runner.SINGLE_THREAD_XLA_FLAGS) & set(two_devices)
  # The run's record says so (run_process.machine()), so step times compare within one kind.
  assert run_process.xla_cpu_threads() is None
  monkeypatch.setenv("XLA_FLAGS", " ".join(one))
  assert run_process.xla_cpu_threads() == 1


def test_progress_lines_read_the_latest_training_row(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  assert ray_runner.progress_line("opt0", metrics, 600) is None
  rows = [{"step": 20, "train/step_time": 3.0}, {"step": 40, "train/step_time": 3.0}]
  rows.append({"step": 40, "dev/accuracy": 0.5})
  metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 60, "train/st')
  assert ray_runner.progress_line("opt0", metrics, 600) == (
      "[progress] opt0: step 40/600, 3.00 s/step, about 28 min of training left"
  )


def test_the_stop_file_checkpoints_a_run_that_the_next_call_resumes(tmp_path, monkeypatch):
  """The task body (without Ray): a STOP file written while the run trains makes it send
  itself SIGTERM, save a checkpoint and answer "stopped"; a queued task answers "not
  started"; without the file the same request resumes from the checkpoint and finishes."""
  from nearprox.training import train

  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  config = tiny_config(
      write_sst2(tmp_path / "glue", n_train=32, n_dev=16),
      **{"num_train_steps": 6, "log_every": 1, "eval_every": 100, "checkpoint_every": 100},
  )
  config.parallel = "jit"
  store = runs.RunStore(config, tmp_path / "out")
  store.run("stoppable", {})
  (request,) = store.to_train()
  work = tmp_path / "work"
  real_batches = train.train_batches

  def stop_at_step_3(*args):
    for i, batch in enumerate(real_batches(*args)):
      if i == 2:
        (work / ray_runner.STOP_FILE).touch()
        signal.pause()  # until the watcher's SIGTERM (it polls every 2 s)
      yield batch

  monkeypatch.setattr(train, "train_batches", stop_at_step_3)
  handler = signal.getsignal(signal.SIGTERM)
  task = ray_runner._train_task._function  # the body Ray runs in a worker
  try:
    assert task(request, str(work))["status"] == "stopped"
    assert task(request, str(work)) == {"status": "not started"}
    assert ray_runner.saved_step(work, request.key) == 3
    (work / ray_runner.STOP_FILE).unlink()
    monkeypatch.setattr(train, "train_batches", real_batches)
    answer = task(request, str(work))
  finally:
    signal.signal(signal.SIGTERM, handler)
  assert answer["status"] == "done"
  report = answer["result"]["report"]
  assert (report["start_step"], report["steps"]) == (3, 6)


@pytest.fixture(scope="module")
def local_ray():
  import ray

  # Its workers run at the tests' own priority (RAY_worker_niceness in tests/conftest.py).
  with warnings.catch_warnings():
    # ray.init starts its daemons with subprocess (fork, then exec at once): JAX's warning
    # about fork in a threaded process concerns children that go on running Python.
    warnings.filterwarnings("ignore", r"os\.fork\(\) was called", RuntimeWarning)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
  yield
  ray.shutdown()


def test_ray_trains_the_pending_runs_and_stores_each(tmp_path, local_ray, monkeypatch):
  """Two runs as Ray tasks: one on one device, one on two host devices (XLA_FLAGS from the
  runtime environment: its record says 2 devices); a run that fails is logged and skipped
  while the others are stored."""
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path / "cache"))
  config = tiny_config(
      write_sst2(tmp_path / "glue", n_train=32, n_dev=16),
      **{"num_train_steps": 2, "eval_every": 100, "checkpoint_every": 100},
  )
  store = runs.RunStore(config, tmp_path / "out")
  store.run("one device", {"parallel": "jit"})
  store.run("two devices", {"parallel": "shard_map", "optimizer.gram": "global"}, devices=2)
  store.run("broken", {"data_dir": str(tmp_path / "nowhere"), "seed": 1})
  logs = []
  outcome = ray_runner.train(
      store.to_train(), store, workdir=tmp_path / "work", max_retries=0, log=logs.append
  )
  assert [store.pending[k].label for k in outcome.trained] in (
      ["one device", "two devices"],
      ["two devices", "one device"],
  )
  assert list(outcome.failed.values()) == ["broken"] and outcome.interrupted is None
  assert any(line.startswith("[failed] broken") for line in logs)
  later = runs.RunStore(config, tmp_path / "out")
  one = later.run("one device", {"parallel": "jit"})
  two = later.run("two devices", {"parallel": "shard_map", "optimizer.gram": "global"}, devices=2)
  assert (one["machine"]["devices"], two["machine"]["devices"]) == (1, 2)
  assert two["report"]["steps"] == 2
  # [done] says the run's own wall time (what its record stores), not the time since queued.
  [done] = [line for line in logs if line.startswith("[done] one device:")]
  assert done.endswith(f", {one['wall_seconds']:.0f}s")
  assert later.run("broken", {"data_dir": str(tmp_path / "nowhere"), "seed": 1}) is None
  assert [r.label for r in later.to_train()] == ["broken"]  # asked for again by a new pass


def test_ray_defers_the_runs_that_would_not_end_before_the_deadline(tmp_path, local_ray):
  """With a deadline and expected times, a run that would outlast it is deferred (its slot
  freed at once, nothing trained); a run resumed half-way is expected to need half its time."""
  from experiments.configs import full

  store = runs.RunStore(full.get_config(), tmp_path / "out")
  store.run("fresh", {"seed": 0})
  store.run("half-way", {"seed": 1})
  key = {r.label: r.key for r in store.to_train()}
  (tmp_path / "work" / key["half-way"] / "checkpoints" / "300").mkdir(parents=True)
  logs = []
  outcome = ray_runner.train(
      store.to_train(),
      store,
      workdir=tmp_path / "work",
      deadline=time.time() + 1800,
      expected_seconds=lambda request: 7200.0,
      log=logs.append,
  )
  assert sorted(outcome.deferred) == sorted(key.values()) and not outcome.trained
  deferred = sorted(line for line in logs if line.startswith("[deferred]"))
  assert [line.split(" min,")[0] for line in deferred] == [
      "[deferred] fresh: expected to take about 120",
      "[deferred] half-way: expected to take about 60",
  ]


def test_after_the_deadline_the_driver_waits_for_the_checkpoint_without_spinning(
    tmp_path, local_ray, monkeypatch
):
  """Past the deadline a run takes a while to save its checkpoint; meanwhile the driver
  reports progress once per interval, not in a loop (it once logged 34,370 progress lines)."""
  import ray

  from experiments.configs import full

  stop_file = str(tmp_path / "work" / ray_runner.STOP_FILE)

  @ray.remote(num_cpus=0)
  def checkpoints_slowly(request, workdir, deadline, expected):
    del workdir, deadline, expected
    while not os.path.exists(stop_file):
      time.sleep(0.05)
    time.sleep(2.0)  # saving the checkpoint
    return {"status": "stopped", "message": f"{request.label}: checkpoint at step 10"}

  monkeypatch.setattr(ray_runner, "_train_task", checkpoints_slowly)
  store = runs.RunStore(full.get_config(), tmp_path / "out")
  store.run("slow", {"seed": 0})
  # The run has started (its folder exists), whenever its worker does on a busy machine.
  run = tmp_path / "work" / store.to_train()[0].key
  run.mkdir(parents=True)
  (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "train/step_time": 2.0}) + "\n")
  logs, start = [], time.time()
  outcome = ray_runner.train(
      store.to_train(),
      store,
      workdir=tmp_path / "work",
      deadline=start + 1.0,
      progress_seconds=0.5,
      log=logs.append,
  )
  elapsed = time.time() - start
  assert outcome.interrupted == "the deadline" and len(outcome.stopped) == 1
  assert logs[-1] == "[stopped] slow: checkpoint at step 10"
  progress = [line for line in logs if line.startswith("[progress] slow: step 10/600")]
  assert 1 <= len(progress) <= elapsed / 0.5 + 1, (len(progress), elapsed)


def test_a_stop_cancels_the_tasks_of_runs_that_never_started(tmp_path, local_ray):
  """A run without a folder in the workdir never started: its queued task is cancelled, not
  left to start a worker only to find the STOP file; a started run's task is kept."""
  import types

  import ray

  sleeper = ray.remote(num_cpus=0)(lambda: time.sleep(60))
  (tmp_path / "started").mkdir()
  started, unstarted = sleeper.remote(), sleeper.remote()
  pending = {
      started: types.SimpleNamespace(key="started"),
      unstarted: types.SimpleNamespace(key="unstarted"),
  }
  ray_runner._drop_unstarted(pending, tmp_path)
  assert list(pending) == [started]
  with pytest.raises(ray.exceptions.TaskCancelledError):
    ray.get(unstarted, timeout=30)
  ray.cancel(started, force=True)


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
  real_batches = train.train_batches

  def preempting(*args):
    for i, batch in enumerate(real_batches(*args)):
      if i == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(train, "train_batches", preempting)
  workdir = tmp_path / "work" / "k1"
  with pytest.raises(run_process.RunPreempted, match="stopped by SIGTERM at step 3"):
    run_process.execute(config, workdir, None, "stopped", "k1", 1)
  monkeypatch.setattr(train, "train_batches", real_batches)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
  shutil.rmtree(workdir / "checkpoints" / "3")  # as if killed before the SIGTERM save

  result = run_process.execute(config, workdir, None, "stopped", "k1", 1)
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
      **{"num_train_steps": 6, "eval_every": 100, "checkpoint_every": 100, "parallel": "jit"},
  )
  attack = run_process.Attack(epsilons=(0.0, 0.1), num_steps=1, examples=8)
  attacked = []

  def sigterm_then_attack(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return [{"epsilon": 0.0, "accuracy": 1.0}]

  monkeypatch.setattr(run_process, "_attack", sigterm_then_attack)
  workdir = tmp_path / "work" / "k2"
  with pytest.raises(run_process.RunPreempted, match="stopped by SIGTERM at step 6"):
    run_process.execute(config, workdir, attack, "attacked", "k2", 1)
  monkeypatch.setattr(
      run_process, "_attack", lambda *args: attacked.append(args) or [{"epsilon": 0.0}]
  )
  result = run_process.execute(config, workdir, attack, "attacked", "k2", 1)
  assert len(attacked) == 1 and result["attack"] == [{"epsilon": 0.0}]
  assert [(s["from_step"], s["to_step"]) for s in result["segments"]] == [(0, 6), (6, 6)]
  assert result["report"]["train_step_seconds"] == result["segments"][0]["train_step_seconds"]


def test_a_deferred_run_is_not_asked_for_again_and_the_invocation_says_so(tmp_path, monkeypatch):
  """train_missing (experiments/reproduce.py): a run deferred in a pass is left out of the
  next passes, which still train what else the studies ask for; the invocation then ends as
  stopped by --stop_after, so its exit says that runs are left to train."""
  import types

  from experiments import reproduce
  from experiments.configs import full

  config = full.get_config()
  for name, value in {
      "_WORKDIR": str(tmp_path / "work"),
      "_MODE": "full",
      "_FIRST": [],
      "_CPUS_PER_RUN": 1.0,
      "_GPUS_PER_RUN": 0.0,
      "_MAX_RETRIES": 0,
      "_ONLY_WHAT_ENDS": True,
  }.items():
    monkeypatch.setattr(reproduce, name, types.SimpleNamespace(value=value))

  def studies(plan, store, only):  # a tuning: its reported run is asked for once it is stored
    store.run("long", {"seed": 0})
    if store.run("tune", {"seed": 1}) is not None:
      store.run("reported", {"seed": 2})

  passes = []

  def train(requests, store, expected_seconds, **options):
    passes.append([r.label for r in requests])
    assert expected_seconds is not None and options["deadline"] == 123.0
    outcome = ray_runner.Outcome()
    for request in requests:
      if request.label == "long":
        outcome.deferred.append(request.key)
      else:
        store.save(fake_run(request.config, request.key, label=request.label))
        outcome.trained.append(request.key)
    return outcome

  monkeypatch.setattr(reproduce, "run_studies", studies)
  monkeypatch.setattr(ray_runner, "train", train)
  stopped = reproduce.train_missing(None, config, tmp_path / "out", ["any"], 123.0)
  assert passes == [["long", "tune"], ["reported"]]
  assert stopped == "--stop_after (1 run(s) deferred: they would not end before it)"
