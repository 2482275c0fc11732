"""The training system end to end: CLI, parallel modes, resume, preemption, hosts."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from nearprox.text import data, models
from nearprox.training import metrics_writer, task_io, train
from tests.tiny_sst2 import tiny_config, write_sst2

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "experiments" / "configs" / "tiny.py"


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory):
  return write_sst2(tmp_path_factory.mktemp("glue"))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
  monkeypatch.setenv("NEARPROX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def flat_params(params):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(params)])


def train_command(*flags: str) -> list[str]:
  """The training CLI with the tiny config and ``flags``."""
  return [sys.executable, "-m", "nearprox.training.train", f"--config={TINY_CONFIG}", *flags]


def test_cli_trains_minilm_past_the_majority_class_and_exports(glue_dir, tmp_path):
  """`python -m nearprox.training.train` with proximal SGD on MiniLM: a real run, end to end."""
  workdir = tmp_path / "run"
  command = train_command(
      f"--workdir={workdir}",
      "--config.model.name=minilm",
      "--config.task=sst2",
      f"--config.data_dir={glue_dir}",
      "--config.num_train_steps=12",
      "--config.optimizer.learning_rate=0.05",
      "--config.export_hf=True",
      "--config.parallel=jit",
  )
  # The platform as a user's shell leaves it (no JAX_PLATFORMS), so JAX probes its backends.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"XLA_FLAGS": ""}
  result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resolved config:" in result.stdout and "proximal_sgd" in result.stdout
  for noise in ("Unable to initialize backend", "PyTorch was not found"):
    assert noise not in result.stderr, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  dev_labels = data.load_task("sst2", "dev", glue_dir).labels
  majority = max(np.mean(dev_labels), 1 - np.mean(dev_labels))
  assert report["dev"]["accuracy"] > majority + 0.15, (report, majority)
  # Metrics: JSON lines (with the Gram statistics) and TensorBoard events.
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("train/gram/effective_rank" in r for r in records)
  # The L2 term of the objective (default weight 1e-4 on kernels) is logged beside the loss.
  assert all(r["train/l2_penalty"] > 0 for r in records if "train/loss" in r)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  # The exported Hugging Face directory loads back with the same predictions.
  model, params, tokenizer = models.load_pretrained(report["hf_model"], num_labels=2)
  encoded = data.encode(data.load_task("sst2", "dev", glue_dir), tokenizer, 16)
  logits = model.apply(
      {"params": params}, encoded.input_ids, encoded.attention_mask, encoded.token_type_ids
  ).logits
  np.testing.assert_allclose(
      np.mean(np.argmax(logits, -1) == encoded.labels), report["dev"]["accuracy"], atol=1e-6
  )


def run_preempted(config, workdir, after_steps, monkeypatch):
  """Trains until SIGTERM arrives while batch ``after_steps`` is fetched."""
  real_batches = train.train_batches

  def preempting(*args):
    for i, batch in enumerate(real_batches(*args)):
      if i == after_steps - 1:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  with monkeypatch.context() as patch:
    patch.setattr(train, "train_batches", preempting)
    return train.train_and_evaluate(config, workdir)


@pytest.mark.parametrize("optimizer", ["proximal_sgd", "adamw"])
def test_preempted_run_saves_and_resumes_exactly(glue_dir, tmp_path, optimizer, monkeypatch):
  """SIGTERM after 3 of 6 steps saves a checkpoint; resuming gives the straight run's params."""
  config = tiny_config(
      glue_dir,
      **{
          "optimizer.name": optimizer,
          "num_train_steps": 6,
          "checkpoint_every": 100,
          "parallel": "jit",
          "objective.kind": "fgm",
          "optimizer.momentum": 0.9,
      },
  )
  straight = train.train_and_evaluate(config, tmp_path / "straight")
  first = run_preempted(config, tmp_path / "resumed", 3, monkeypatch)
  assert first["preempted"] and first["steps"] == 3
  assert (tmp_path / "resumed" / "checkpoints" / "3").is_dir()
  resumed = train.train_and_evaluate(config, tmp_path / "resumed")
  assert resumed["steps"] == 6 and not resumed["preempted"]
  assert straight["diverged_at_step"] is None and resumed["diverged_at_step"] is None
  np.testing.assert_array_equal(flat_params(resumed["params"]), flat_params(straight["params"]))
  assert resumed["dev"] == straight["dev"]


def test_sigterm_during_the_final_evaluation_resumes_at_the_last_step(
    glue_dir, tmp_path, monkeypatch
):
  """The last step is checkpointed before the final evaluation; SIGTERM there reports the run
  as preempted without scores, and the rerun evaluates the saved state (no step trained
  again), logging each final score once."""
  config = tiny_config(
      glue_dir,
      # 6 steps: the config of the other jit runs here and in test_run_store (one compile).
      **{"num_train_steps": 6, "eval_every": 100, "checkpoint_every": 100, "parallel": "jit"},
  )
  straight = train.train_and_evaluate(config, tmp_path / "straight")
  real_evaluate = train.evaluate

  def preempting(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return real_evaluate(*args)

  monkeypatch.setattr(train, "evaluate", preempting)
  stopped = train.train_and_evaluate(config, tmp_path / "run")
  assert stopped["preempted"] and stopped["steps"] == 6 and "dev" not in stopped
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["6"]
  monkeypatch.setattr(train, "evaluate", real_evaluate)
  resumed = train.train_and_evaluate(config, tmp_path / "run")
  assert (resumed["start_step"], resumed["steps"], resumed["preempted"]) == (6, 6, False)
  assert resumed["dev"] == straight["dev"]
  log = metrics_writer.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  assert [r["step"] for r in log if "dev/accuracy" in r] == [6]


def test_checkpoints_by_time_as_well_as_by_step(tmp_path):
  """With ``minutes``, a save is due at the first step that many minutes after the last save
  or after the start (not at once: not at the first step, nor right after resuming from an
  old checkpoint), besides every ``every`` steps."""
  import jax.numpy as jnp

  from nearprox.training.orbax_checkpoints import Checkpoints

  state = {"w": jnp.ones(3)}
  by_step = Checkpoints(tmp_path / "steps", every=4, keep=5)
  assert [s for s in range(1, 10) if by_step.should_save(s)] == [4, 8]
  by_time = Checkpoints(tmp_path / "time", every=10**9, keep=5, minutes=1 / 60)
  assert not by_time.should_save(1)  # less than a second after the start
  time.sleep(1.2)
  assert by_time.should_save(2)
  by_time.save(2, state)
  by_time.wait()
  assert not by_time.should_save(3)  # less than a second after the save
  time.sleep(1.2)
  assert by_time.should_save(4)
  resumed = Checkpoints(tmp_path / "time", every=10**9, keep=5, minutes=1 / 60)
  assert resumed.latest_step() == 2 and not resumed.should_save(3)  # its save is old, its start not
  with pytest.raises(ValueError, match="checkpoint_minutes must be > 0"):
    Checkpoints(tmp_path / "bad", every=4, keep=5, minutes=0)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    glue_dir, tmp_path, caplog, monkeypatch
):
  config = tiny_config(
      glue_dir,
      **{"num_train_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3, "parallel": "jit"},
  )
  straight = train.train_and_evaluate(config, tmp_path / "straight")
  run_preempted(config, tmp_path / "run", 4, monkeypatch)
  latest = tmp_path / "run" / "checkpoints" / "4"
  files = [path for path in latest.rglob("*") if path.is_file()]
  assert files
  for path in files:
    path.write_bytes(b"garbage")
  with caplog.at_level(logging.WARNING):
    report = train.train_and_evaluate(config, tmp_path / "run")
  assert "checkpoint at step 4" in caplog.text and "unreadable" in caplog.text
  # Resumed from step 2 and trained steps 3-6 again: the straight run's parameters.
  assert report["steps"] == 6
  np.testing.assert_array_equal(flat_params(report["params"]), flat_params(straight["params"]))
  # The broken checkpoint was deleted, so step 4 was saved again (orbax skips a step at or
  # below its newest one).
  assert all(path.read_bytes() != b"garbage" for path in latest.rglob("*") if path.is_file())
  assert sorted(int(p.name) for p in latest.parent.iterdir() if p.name.isdigit()) == [2, 4, 6]


@pytest.mark.parametrize("gram", ["global", "local"])
def test_pmap_shard_map_and_single_device_agree(glue_dir, tmp_path, gram):
  assert jax.device_count() == 8
  results = {}
  modes = ["jit", "pmap", "shard_map"] if gram == "global" else ["pmap", "shard_map"]
  for mode in modes:
    config = tiny_config(
        glue_dir,
        **{
            "parallel": mode,
            "optimizer.gram": gram,
            # The jit run is test_preempted_run_saves_and_resumes_exactly's (one compile).
            "num_train_steps": 6,
            "checkpoint_every": 100,
            "objective.kind": "fgm",
        },
    )
    results[mode] = train.train_and_evaluate(config, tmp_path / mode)
  reference = flat_params(results[modes[0]]["params"])
  for mode in modes[1:]:
    np.testing.assert_allclose(
        flat_params(results[mode]["params"]), reference, rtol=1e-4, atol=1e-6
    )
    assert results[mode]["dev"] == results[modes[0]]["dev"]


def test_baseline_optimizer_agrees_across_devices(glue_dir, tmp_path):
  results = {}
  for mode in ("jit", "shard_map"):
    config = tiny_config(
        glue_dir,
        **{
            "parallel": mode,
            "optimizer.name": "sgd",
            "num_train_steps": 2,
            "checkpoint_every": 100,
        },
    )
    results[mode] = flat_params(train.train_and_evaluate(config, tmp_path / mode)["params"])
  np.testing.assert_allclose(results["shard_map"], results["jit"], rtol=1e-4, atol=1e-6)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(command: list[str]) -> list[subprocess.Popen]:
  """``command`` as processes 0 and 1 of one JAX job (4 CPU devices each, gloo)."""
  port = _free_port()
  return [
      subprocess.Popen(
          command,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
          env={
              **os.environ,
              "JAX_PLATFORMS": "cpu",
              "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
              "NEARPROX_COORDINATOR": f"127.0.0.1:{port}",
              "NEARPROX_NUM_PROCESSES": "2",
              "NEARPROX_PROCESS_ID": str(i),
          },
      )
      for i in range(2)
  ]


def finish_two_processes(workers: list[subprocess.Popen], timeout: float = 600) -> list[dict]:
  """Each process's report (the JSON the train CLI prints last), once both exited 0."""
  try:
    outputs = [w.communicate(timeout=timeout) for w in workers]
  except subprocess.TimeoutExpired:
    for worker in workers:
      worker.kill()
    pytest.fail(f"the two processes did not finish within {timeout} s (one waits for the other)")
  for worker, (_, stderr) in zip(workers, outputs):
    assert worker.returncode == 0, stderr[-3000:]
  return [json.loads(stdout[stdout.rindex("\n{") + 1 :]) for stdout, _ in outputs]


def test_two_processes_agree_with_one(glue_dir, tmp_path):
  """Two JAX processes (4 CPU devices each, gloo collectives) = one process with 8."""
  common = train_command(
      f"--config.data_dir={glue_dir}",
      "--config.task=sst2",
      "--config.num_train_steps=3",
      "--config.checkpoint_every=100",
      "--config.optimizer.gram=global",
      "--config.export_hf=True",
  )
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  single = subprocess.run(
      common + [f"--workdir={tmp_path / 'one'}"],
      capture_output=True,
      text=True,
      timeout=600,
      env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
  )
  assert single.returncode == 0, single.stderr[-3000:]
  finish_two_processes(start_two_processes(common + [f"--workdir={tmp_path / 'two'}"]))
  one = json.loads((tmp_path / "one" / "report.json").read_text())
  two = json.loads((tmp_path / "two" / "report.json").read_text())
  assert one["dev"] == two["dev"]
  _, params_one, _ = models.load_pretrained(one["hf_model"], num_labels=2)
  _, params_two, _ = models.load_pretrained(two["hf_model"], num_labels=2)
  np.testing.assert_allclose(flat_params(params_two), flat_params(params_one), rtol=1e-4, atol=1e-6)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(glue_dir, tmp_path):
  """A preemption notice to process 1 alone: JAX's preemption service stops both processes
  at the same step, both save that checkpoint (none waits at a collective), and a rerun of
  both resumes there."""
  workdir = tmp_path / "run"
  command = train_command(
      f"--config.data_dir={glue_dir}",
      "--config.task=sst2",
      # The optimizer plays no part in stopping: SGD, whose step compiles much faster than
      # the proximal step in each of the four processes (test_two_processes_agree_with_one
      # trains the proximal step on two processes).
      "--config.optimizer.name=sgd",
      "--config.log_every=1",
      "--config.eval_every=1000000",
      "--config.checkpoint_every=1000000",
      f"--workdir={workdir}",
  )
  workers = start_two_processes(command + ["--config.num_train_steps=100000"])
  deadline = time.time() + 300
  while not any(row["step"] >= 5 for row in metrics_writer.read_jsonl(workdir / "metrics.jsonl")):
    assert time.time() < deadline and all(w.poll() is None for w in workers), "no training"
    time.sleep(0.2)
  workers[1].send_signal(signal.SIGTERM)
  reports = finish_two_processes(workers, timeout=180)
  stopped = reports[0]["steps"]
  assert [r["preempted"] for r in reports] == [True, True]
  assert [r["steps"] for r in reports] == [stopped, stopped] and 5 < stopped < 100000
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [stopped]
  resumed = finish_two_processes(
      start_two_processes(command + [f"--config.num_train_steps={stopped + 2}"])
  )
  for report in resumed:
    assert (report["start_step"], report["steps"], report["preempted"]) == (
        stopped,
        stopped + 2,
        False,
    )


def test_evaluation_masks_the_padded_last_batch(glue_dir):
  """37 dev examples in batches of 16: the 11 padded rows never reach the metrics."""
  config = tiny_config(glue_dir, parallel="jit")
  task = data.get_task("sst2")
  model, params, tokenizer = task_io.create_model(config, task.num_labels, jax.random.key(0))
  arrays = data.encode(data.load_task("sst2", "dev", glue_dir), tokenizer, 16).arrays()
  runner = train.parallel.Runner("jit")
  logits_fn = models.bert_logits_fn(model)
  runner.compile(lambda *a: None, lambda s, b: train.eval_step(s.params, b, logits_fn=logits_fn))
  state = train.TrainState(0, params, None)
  got, counts = task_io.evaluate(runner, state, arrays, task, batch_size=16)
  logits = model.apply(
      {"params": params}, arrays["input_ids"], arrays["attention_mask"], arrays["token_type_ids"]
  ).logits
  assert got == task.metrics(arrays["labels"], np.asarray(logits))
  assert counts == np.bincount(np.argmax(logits, -1), minlength=2).tolist()


def test_label_noise_flips_the_requested_fraction():
  labels = np.arange(1000) % 3
  noisy = task_io.flip_labels(labels, 0.2, 3, seed=0)
  assert np.sum(noisy != labels) == 200 and set(np.unique(noisy)) == {0, 1, 2}
  np.testing.assert_array_equal(noisy, task_io.flip_labels(labels, 0.2, 3, seed=0))


def test_holdout_is_a_fixed_slice_of_train_and_hides_the_reported_splits(glue_dir):
  """Tuning runs: the same 20 of 96 training rows for every seed, clean labels, no dev."""
  tokenizer = models.load_tokenizer(models.minilm_dir())
  full = task_io.load_splits(tiny_config(glue_dir), tokenizer)["train"]
  splits = [
      task_io.load_splits(
          tiny_config(glue_dir, holdout_examples=20, seed=seed, label_noise=0.5), tokenizer
      )
      for seed in (0, 1)
  ]
  assert set(splits[0]) == {"train", "holdout"}
  for split in splits:
    assert len(split["holdout"]["labels"]) == 20 and len(split["train"]["labels"]) == 76
  np.testing.assert_array_equal(
      splits[0]["holdout"]["input_ids"], splits[1]["holdout"]["input_ids"]
  )
  rows = {tuple(r) for r in full["input_ids"].tolist()}
  held = {tuple(r) for r in splits[0]["holdout"]["input_ids"].tolist()}
  rest = {tuple(r) for r in splits[0]["train"]["input_ids"].tolist()}
  assert held <= rows and rest <= rows and not held & rest
  # The held-out labels are the file's labels: label noise only touches what is trained on.
  by_row = {tuple(r): y for r, y in zip(full["input_ids"].tolist(), full["labels"].tolist())}
  assert [by_row[tuple(r)] for r in splits[0]["holdout"]["input_ids"].tolist()] == list(
      splits[0]["holdout"]["labels"]
  )
  with pytest.raises(ValueError, match="holdout_examples"):
    task_io.load_splits(tiny_config(glue_dir, holdout_examples=96), tokenizer)


@pytest.mark.parametrize(
    "override,match",
    [
        ({"optimizer.name": "adafactor"}, "optimizer.name"),
        ({"parallel": "threads"}, "parallel"),
        ({"label_noise": 1.5}, "label_noise"),
        ({"task": "imdb"}, "unknown task"),
        ({"objective.kind": "fgsm"}, "kind"),
        ({"optimizer.name": "proximal_sgd", "optimizer.damping": 0.0}, "damping"),
        ({"optimizer.name": "proximal_sgd", "optimizer.filter": "lowpass"}, "filter"),
        ({"optimizer.name": "proximal_norm_sgd", "optimizer.damping": -1.0}, "damping"),
    ],
)
def test_bad_configs_are_clear_errors(glue_dir, tmp_path, override, match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny_config(glue_dir, **override), tmp_path / "run")


def test_a_diverged_run_stops_at_its_non_finite_update_and_is_scored(glue_dir, tmp_path, caplog):
  """A non-finite update leaves every later parameter non-finite: training stops at that step
  (its loss logged, the state saved, an error naming the step) instead of running the rest
  on NaN, and the final evaluation scores the diverged model, so the run still counts."""
  config = tiny_config(
      glue_dir,
      **{
          "optimizer.name": "sgd",
          "optimizer.learning_rate": 1e12,
          "num_train_steps": 8,
          "eval_every": 100,
          "checkpoint_every": 100,
          "parallel": "jit",
      },
  )
  with caplog.at_level(logging.ERROR):
    report = train.train_and_evaluate(config, tmp_path / "run")
  step = report["diverged_at_step"]
  assert step is not None and report["steps"] == step < 8 and not report["preempted"]
  assert f"training diverged at step {step}" in caplog.text
  assert 0 <= report["dev"]["accuracy"] <= 1
  assert not np.all(np.isfinite(flat_params(report["params"])))
  log = metrics_writer.read_jsonl(tmp_path / "run" / "metrics.jsonl")
  losses = [(r["step"], r["train/loss"]) for r in log if "train/loss" in r]
  assert losses[-1][0] == step and not np.isfinite(losses[-1][1])
  assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == [str(step)]


def test_metric_log_resumes_at_the_checkpoint_step(tmp_path):
  """A resumed writer keeps the rows up to its step, drops later ones and a partly written
  last line, and appends after them; without ``from_step`` it only appends."""
  path = tmp_path / "metrics.jsonl"
  rows = [json.dumps({"step": s, "train/loss": 1.0 / s}) for s in (2, 4, 6)]
  path.write_text("\n".join(rows) + '\n{"step": 8, "train/lo')
  assert [r["step"] for r in metrics_writer.read_jsonl(path)] == [2, 4, 6]
  writer = metrics_writer.MetricWriter(tmp_path, from_step=4)
  writer.write_scalars(6, {"train/loss": 0.5})
  writer.close()
  assert [(r["step"], r["train/loss"]) for r in metrics_writer.read_jsonl(path)] == [
      (2, 0.5),
      (4, 0.25),
      (6, 0.5),
  ]
  # TensorBoard: the resumed writer's event file holds the event on which TensorBoard hides
  # the earlier processes' events from step 5 on.
  (events,) = (tmp_path / "tensorboard").iterdir()
  assert read_session_starts(events) == [5]
  writer = metrics_writer.MetricWriter(tmp_path)
  writer.write_scalars(8, {"train/loss": 0.1})
  writer.close()
  assert [r["step"] for r in metrics_writer.read_jsonl(path)] == [2, 4, 6, 8]
  path.write_text(path.read_text() + "not json\n" + rows[0] + "\n")
  with pytest.raises(json.JSONDecodeError):
    metrics_writer.read_jsonl(path)  # a broken line before the last is an error


def read_session_starts(event_file: Path) -> list[int]:
  """The steps of the SessionLog.START events in a TensorBoard event file (TFRecords: length,
  its CRC, the serialized Event, its CRC)."""
  import struct

  from tensorboardX.proto import event_pb2

  raw, starts, offset = event_file.read_bytes(), [], 0
  while offset < len(raw):
    (length,) = struct.unpack_from("<Q", raw, offset)
    event = event_pb2.Event.FromString(raw[offset + 12 : offset + 12 + length])
    offset += 12 + length + 4
    if event.HasField("session_log") and event.session_log.status == event.session_log.START:
      starts.append(event.step)
  return starts
