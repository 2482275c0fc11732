"""experiments/workers.py: worker processes sharing a run store (restarted while runs land,
stopped by SIGTERM at the deadline or on a signal to the invocation, pinned to their own CPUs),
and the flags an invocation passes to its workers.
"""

import os
import signal
import sys

import pytest

from experiments import workers

FAKE_WORKER = """
import os, pathlib, sys, time
runs = pathlib.Path(sys.argv[1])
with open(runs.parent / "invocations.log", "a") as log:
  log.write(" ".join(sys.argv[2:]) + "\\n")
first = [runs / f"{i}.json" for i in range(3)]
# The second stage (runs 3-5) opens once the first is complete, like a tuning choice.
todo = first if not all(p.exists() for p in first) else [runs / f"{i}.json" for i in (3, 4, 5)]
for path in todo:
  try:
    os.close(os.open(f"{path}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  except FileExistsError:
    continue
  time.sleep(0.2)
  path.write_text("{}")
"""


def test_workers_are_restarted_while_runs_land_and_stop_when_idle(tmp_path):
  import time

  runs_dir = tmp_path / "runs"
  runs_dir.mkdir()
  command = [sys.executable, "-c", FAKE_WORKER, str(runs_dir)]
  workers.run_workers(command, 3, runs_dir, time.time() + 120, poll_seconds=0.05)
  assert sorted(p.name for p in runs_dir.glob("*.json")) == [f"{i}.json" for i in range(6)]
  invocations = (tmp_path / "invocations.log").read_text().splitlines()
  assert 6 <= len(invocations) <= 15  # the second stage needed restarts; idle ones stopped
  assert all(line.startswith("--stop_after=") for line in invocations)

  # After the deadline nothing starts.
  (tmp_path / "invocations.log").unlink()
  workers.run_workers(command, 3, tmp_path / "other", time.time() - 1)
  assert not (tmp_path / "invocations.log").exists()


TRAINING_WORKER = """
import os, pathlib, signal, sys, time
def stop(*_):  # what a run in training does: save a checkpoint, exit with EX_TEMPFAIL
  (pathlib.Path(sys.argv[1]) / f"{os.getpid()}.checkpoint").write_text("saved")
  sys.exit(75)
signal.signal(signal.SIGTERM, stop)
(pathlib.Path(sys.argv[1]) / f"{os.getpid()}.training").write_text("")
time.sleep(120)
"""


def test_workers_still_training_at_the_deadline_are_stopped_by_sigterm(tmp_path):
  import time

  logs, started = [], time.time()
  command = [sys.executable, "-c", TRAINING_WORKER, str(tmp_path)]
  workers.run_workers(command, 2, tmp_path / "runs", started + 5, logs.append, poll_seconds=0.05)
  assert time.time() - started < 60  # not the workers' 120 s
  assert len(list(tmp_path.glob("*.training"))) == 2
  assert len(list(tmp_path.glob("*.checkpoint"))) == 2
  assert len(logs) == 1 and "SIGTERM to 2 running worker(s)" in logs[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_invocation_stops_its_workers_with_sigterm(tmp_path, signum):
  """SIGTERM, or Ctrl-C's SIGINT, to the process running the workers: each worker gets
  SIGTERM (its run checkpoints), none starts again, and run_workers says it was signalled."""
  import threading
  import time

  logs, started = [], time.time()
  command = [sys.executable, "-c", TRAINING_WORKER, str(tmp_path)]

  def signal_once_both_train():
    end = time.time() + 60
    while time.time() < end:
      if len(list(tmp_path.glob("*.training"))) == 2:
        os.kill(os.getpid(), signum)
        return
      time.sleep(0.02)

  threading.Thread(target=signal_once_both_train, daemon=True).start()
  handler_before = signal.getsignal(signum)
  assert workers.run_workers(command, 2, tmp_path / "runs", None, logs.append, poll_seconds=0.05)
  assert time.time() - started < 60  # not the workers' 120 s
  assert len(list(tmp_path.glob("*.training"))) == 2  # nobody started again
  assert len(list(tmp_path.glob("*.checkpoint"))) == 2
  assert logs == [
      f"[workers] {signal.Signals(signum).name} received: SIGTERM to 2 running worker(s); their "
      "runs save a checkpoint and resume from it in the next invocation"
  ]
  assert signal.getsignal(signum) == handler_before


PREEMPTED_ONCE_WORKER = """
import os, pathlib, sys
runs = pathlib.Path(sys.argv[1])
with open(runs.parent / "invocations.log", "a") as log:
  log.write(f"{os.getpid()}\\n")
try:  # the first worker to start is sent SIGTERM alone: it checkpoints and exits with 75
  os.close(os.open(runs.parent / "preempted", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
  sys.exit(75)
except FileExistsError:
  pass
runs.mkdir(exist_ok=True)
for name in ("0", "1"):
  path = runs / f"{name}.json"
  if not path.exists():
    path.write_text("{}")
    break
"""


def test_a_worker_stopped_by_its_own_sigterm_is_not_started_again(tmp_path):
  """The other worker's runs landing would wake an idle worker, but not a halted one."""
  runs_dir = tmp_path / "runs"
  runs_dir.mkdir()
  logs = []
  command = [sys.executable, "-c", PREEMPTED_ONCE_WORKER, str(runs_dir)]
  assert not workers.run_workers(command, 2, runs_dir, None, logs.append, poll_seconds=0.05)
  assert sorted(p.name for p in runs_dir.glob("*.json")) == ["0.json", "1.json"]
  # One halted pass, then the other worker's: 0.json, 1.json, nothing left (idle).
  assert len((tmp_path / "invocations.log").read_text().splitlines()) == 4
  assert len(logs) == 1 and "stopped by a SIGTERM sent to it" in logs[0]


PINNED_WORKER = """
import os, pathlib, sys
out = pathlib.Path(sys.argv[1]) / f"{os.getpid()}.cpus"
out.write_text(",".join(map(str, sorted(os.sched_getaffinity(0)))))
"""


def test_cpu_shares_split_the_allowed_cpus_without_overlap(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 8})
  assert workers.cpu_shares(1) == [[4, 5, 6, 7, 8]]
  assert workers.cpu_shares(2) == [[4, 5], [6, 7, 8]]
  assert workers.cpu_shares(5) == [[4], [5], [6], [7], [8]]
  with pytest.raises(ValueError, match="6 workers to 5 CPUs"):
    workers.cpu_shares(6)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin two workers")
def test_pinned_workers_each_run_on_their_own_cpus(tmp_path):
  import time

  workers.run_workers(
      [sys.executable, "-c", PINNED_WORKER, str(tmp_path)],
      2,
      tmp_path / "runs",
      time.time() + 120,
      poll_seconds=0.05,
      pin=True,
  )
  seen = sorted(p.read_text() for p in tmp_path.glob("*.cpus"))
  assert seen == sorted(",".join(map(str, share)) for share in workers.cpu_shares(2))


def test_worker_flags_drop_the_parents_own():
  from experiments import reproduce

  argv = ["--mode=full", "--workers=8", "--stop_after=30", "--readme=/x", "--plan.seeds=0,1"]
  assert reproduce.worker_flags(argv) == ["--mode=full", "--plan.seeds=0,1"]
  with pytest.raises(Exception, match="--stop_after=value"):
    reproduce.worker_flags(["--stop_after", "30"])
