"""Tests of tpu_scripts/: --dry-run prints the right gcloud commands; shellcheck-clean."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tpu_scripts"
ENTRY_POINTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh"]
TPU = ["--name", "np-test", "--zone", "us-central2-b", "--project", "proj-1"]


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env.update(extra)
  return env


def run_script(name, *args, env=None, check=True):
  result = subprocess.run(
      ["bash", str(SCRIPTS / name), *args],
      capture_output=True,
      text=True,
      env=env or _env(),
      cwd=REPO,
      timeout=60,
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def printed_commands(stdout):
  """Each "+ ..." command of a dry run as (argv, text after the command: pipes)."""
  commands, current = [], None
  for line in stdout.splitlines(keepends=True):
    if line.startswith("+ "):
      if current is not None:
        commands.append(current)
      current = line[2:]
    elif current is not None:
      current += line
  if current is not None:
    commands.append(current)
  parsed = []
  for text in commands:
    words = shlex.split(text)
    cut = words.index("2>&1") if "2>&1" in words else len(words)
    parsed.append((words[:cut], words[cut:]))
  return parsed


def gcloud_commands(stdout):
  return [(argv, rest) for argv, rest in printed_commands(stdout) if argv[0] == "gcloud"]


def flag(argv, name):
  values = [word.split("=", 1)[1] for word in argv if word.startswith(f"--{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_and_strict_mode(script):
  result = run_script(script, "--help")
  assert result.stdout.startswith("Usage: ") and "--dry-run" in result.stdout
  path = SCRIPTS / script
  assert path.stat().st_mode & stat.S_IXUSR
  assert "\nset -euo pipefail\n" in path.read_text()


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_required_flags_and_unknown_arguments(script):
  result = run_script(script, "--zone", "z", "--dry-run", check=False)
  assert result.returncode == 2 and "--name is required" in result.stderr
  result = run_script(script, *TPU, "--dry-run", "--bogus", check=False)
  assert result.returncode == 2 and "unknown argument: --bogus" in result.stderr
  assert result.stdout == ""


def test_create_single_host_and_pod_slice():
  out = run_script("create.sh", *TPU, "--dry-run").stdout
  [(argv, _)] = gcloud_commands(out)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "np-test"]
  assert flag(argv, "zone") == "us-central2-b" and flag(argv, "project") == "proj-1"
  assert flag(argv, "accelerator-type") == "v4-8"
  assert flag(argv, "version") == "tpu-ubuntu2204-base"
  assert "--spot" not in argv and "--preemptible" not in argv

  out = run_script(
      "create.sh",
      *TPU,
      "--accelerator-type=v4-32",
      "--runtime-version",
      "v2-alpha-tpuv5",
      "--spot",
      "--dry-run",
      "--",
      "--network=net-a",
  ).stdout
  [(argv, _)] = gcloud_commands(out)
  assert flag(argv, "accelerator-type") == "v4-32" and flag(argv, "version") == "v2-alpha-tpuv5"
  assert "--spot" in argv and argv[-1] == "--network=net-a"
  out = run_script("create.sh", *TPU, "--preemptible", "--dry-run").stdout
  assert "--preemptible" in gcloud_commands(out)[0][0]


def test_create_rejects_bad_combinations():
  result = run_script("create.sh", *TPU, "--spot", "--preemptible", "--dry-run", check=False)
  assert result.returncode == 2 and "exclude each other" in result.stderr
  result = run_script("create.sh", *TPU, "--accelerator-type", "tpu4", "--dry-run", check=False)
  assert result.returncode == 2 and "--accelerator-type" in result.stderr
  result = run_script("create.sh", "--name", "--zone", "z", check=False)
  assert result.returncode == 2 and "--name needs a value" in result.stderr


def test_environment_defaults_and_no_project():
  out = run_script("delete.sh", "--dry-run", env=_env(TPU_NAME="env-tpu", TPU_ZONE="eu-z")).stdout
  [(argv, _)] = gcloud_commands(out)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "env-tpu", "--zone=eu-z"]
  out = run_script("delete.sh", *TPU, "--yes", "--dry-run").stdout
  assert gcloud_commands(out)[0][0][-1] == "--quiet"


def test_setup_copies_and_installs_on_all_workers():
  out = run_script("setup.sh", *TPU, "--dry-run").stdout
  assert printed_commands(out)[0][0][:2] == ["git", "-C"]  # the packing step
  (scp, _), (ssh, _) = gcloud_commands(out)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5].endswith(".tar.gz") and scp[6] == "np-test:~/nearprox-src.tar.gz"
  assert flag(scp, "worker") == "all" and flag(scp, "zone") == "us-central2-b"
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "np-test"]
  assert flag(ssh, "worker") == "all" and flag(ssh, "project") == "proj-1"
  script = flag(ssh, "command")
  lines = [shlex.split(line) for line in script.splitlines()]
  assert [".venv/bin/pip", "install", "-q", "-e", ".[train]"] in lines
  assert [".venv/bin/pip", "install", "-q", "-U", "jax[tpu]>=0.6,<0.11"] in lines
  assert "python3.11 -m venv .venv" in script
  assert "import jax" in script  # the device check, on all workers only

  out = run_script(
      "setup.sh", *TPU, "--worker", "0", "--jax-spec", "jax[tpu]==0.10.2", "--dry-run"
  ).stdout
  ssh = gcloud_commands(out)[1][0]
  assert flag(ssh, "worker") == "0" and "import jax" not in flag(ssh, "command")
  assert "'jax[tpu]==0.10.2'" in flag(ssh, "command")


@pytest.fixture
def fake_gcloud(tmp_path):
  """A gcloud on PATH that records its arguments (JSON lines) and prints a line."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  log = tmp_path / "gcloud_calls.jsonl"
  script = bin_dir / "gcloud"
  script.write_text(
      f"#!{sys.executable}\nimport json, sys\n"
      f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
      "print('fake gcloud output', flush=True)\n"
  )
  script.chmod(0o755)
  env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
  calls = lambda: [json.loads(line) for line in log.read_text().splitlines()]
  return env, calls


def test_setup_packs_the_working_tree(fake_gcloud, tmp_path):
  if (
      subprocess.run(
          ["git", "-C", str(REPO), "rev-parse", "--git-dir"], capture_output=True
      ).returncode
      != 0
  ):
    pytest.skip("not a git working tree")
  env, calls = fake_gcloud
  run_script("setup.sh", *TPU, env=env)
  scp, ssh = calls()
  archive = Path(scp[4])
  assert archive.parent == tmp_path and ssh[:4] == ["compute", "tpus", "tpu-vm", "ssh"]
  with tarfile.open(archive) as tar:
    names = set(tar.getnames())
  assert {"pyproject.toml", "tpu_scripts/setup.sh", "nearprox/text/data/__init__.py"} <= names
  assert not any(name.startswith((".venv/", ".git/")) or "__pycache__" in name for name in names)


def test_launch_runs_train_on_all_workers():
  out = run_script(
      "launch.sh",
      *TPU,
      "--config",
      "experiments/configs/sst2.py",
      "--workdir",
      "gs://bucket/run 1",
      "--env",
      "NEARPROX_GLUE_DIR=/data/glue",
      "--log-file",
      "runs/x.log",
      "--dry-run",
      "--",
      "--config.seed=3",
      "two words",
  ).stdout
  [(ssh, rest)] = gcloud_commands(out)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "np-test"]
  assert flag(ssh, "worker") == "all"
  assert rest == ["2>&1", "|", "tee", "-a", "runs/x.log"]
  lines = flag(ssh, "command").splitlines()
  train = shlex.split(lines[-1])
  python = train.index(".venv/bin/python")
  assert train[:python] == [
      "env",
      "NEARPROX_DISTRIBUTED=auto",
      "PYTHONUNBUFFERED=1",
      "NEARPROX_GLUE_DIR=/data/glue",
  ]
  assert train[python : python + 9] == [
      ".venv/bin/python",
      "-m",
      "nearprox.training.train",
      "--config",
      "experiments/configs/sst2.py",
      "--workdir",
      "gs://bucket/run 1",
      "--config.seed=3",
      "two words",
  ]
  assert train[python + 9 :] == ["2>&1", "|", "tee", "logs/train.log"]
  assert "cd ~/nearprox" in lines[1]

  out = run_script(
      "launch.sh", *TPU, "--config", "c.py", "--workdir", "w", "--detach", "--dry-run"
  ).stdout
  script = flag(gcloud_commands(out)[0][0], "command")
  assert (
      "nohup env NEARPROX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 .venv/bin/python -m "
      "nearprox.training.train"
  ) in script
  assert "logs/train.pid" in script
  result = run_script("launch.sh", *TPU, "--workdir", "w", "--dry-run", check=False)
  assert result.returncode == 2 and "--config is required" in result.stderr


def test_launch_streams_output_to_console_and_log(fake_gcloud, tmp_path):
  env, calls = fake_gcloud
  log = tmp_path / "logs" / "run.log"
  result = run_script(
      "launch.sh", *TPU, "--config", "c.py", "--workdir", "w", "--log-file", str(log), env=env
  )
  assert "fake gcloud output" in result.stdout
  assert "fake gcloud output" in log.read_text()
  [call] = calls()
  assert call[:5] == ["compute", "tpus", "tpu-vm", "ssh", "np-test"]


def test_logs_and_stop():
  out = run_script("logs.sh", *TPU, "--dry-run").stdout
  [(ssh, rest)] = gcloud_commands(out)
  assert flag(ssh, "worker") == "0"
  assert flag(ssh, "command") == "tail -n +1 -F ~/nearprox/logs/train.log"
  assert rest[:4] == ["2>&1", "|", "tee", "-a"]
  out = run_script("logs.sh", *TPU, "--worker=all", "--no-follow", "--dry-run").stdout
  ssh = gcloud_commands(out)[0][0]
  assert flag(ssh, "worker") == "all" and flag(ssh, "command").startswith("cat ")
  out = run_script("stop.sh", *TPU, "--dry-run").stdout
  ssh = gcloud_commands(out)[0][0]
  assert flag(ssh, "worker") == "all" and "train.pid" in flag(ssh, "command")


def test_refuses_to_run_without_gcloud(tmp_path):
  bin_dir = tmp_path / "bin"  # a PATH with only the tools the scripts need, no gcloud
  bin_dir.mkdir()
  for tool in ("bash", "dirname", "basename"):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  result = subprocess.run(
      [str(bin_dir / "bash"), str(SCRIPTS / "delete.sh"), *TPU],
      capture_output=True,
      text=True,
      env=_env(PATH=str(bin_dir)),
      timeout=60,
  )
  assert result.returncode == 2 and "gcloud not found" in result.stderr


def test_shellcheck_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
  scripts = sorted(str(path) for path in SCRIPTS.glob("*.sh"))
  result = subprocess.run(
      ["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO, timeout=120
  )
  assert result.returncode == 0, result.stdout + result.stderr
