#!/usr/bin/env bash
# Starts the same training command on every worker of a TPU VM and streams its output.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

CONFIG=""
WORKDIR=""
LOG_FILE=""
DETACH=0
WORKER="all"
ENV_VARS=()
TRAIN_ARGS=()

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE --config CFG --workdir DIR [options] [-- ARGS]

Runs, on every worker at once (a pod slice needs all hosts to start together),
  cd ~/$REMOTE_DIR && .venv/bin/python -m nearprox.training.train --config CFG --workdir DIR ARGS
with the output of all workers streamed to this console and appended to a local log file
(each worker also keeps ~/$REMOTE_DIR/logs/train.log). The run gets
NEARPROX_DISTRIBUTED=auto, so nearprox.training.train calls jax.distributed.initialize(), which on
a TPU slice finds the other hosts by itself: no coordinator address is needed. On a pod
slice give a --workdir every host can write (a gcsfuse-mounted bucket).

Options:
  --config CFG     config file, e.g. experiments/configs/default.py (relative to the repo)
  --workdir DIR    checkpoints and metrics (a mounted bucket on a pod slice)
  --log-file FILE  local log (default runs/tpu_logs/NAME-YYYYmmdd-HHMMSS.log)
  --env KEY=VALUE  environment variable for the run on every worker (repeatable)
  --detach         start in the background on the workers (nohup) and return; follow with
                   logs.sh, stop with stop.sh. Use it for long runs: without it the run
                   ends when this terminal's connection does
  --worker W       workers to run on (default all)
  -- ARGS          passed to nearprox.training.train unchanged (e.g. --config.learning_rate=3e-5)

$COMMON_FLAGS_HELP

Example:
  $(basename "$0") --name nearprox-pod --zone us-central2-b \\
      --config experiments/configs/default.py --workdir /mnt/nearprox-runs/tweets -- --config.seed=1
USAGE
}

while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ "$SHIFT_BY" -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --config | --config=*) CONFIG="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --workdir | --workdir=*) WORKDIR="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --log-file | --log-file=*) LOG_FILE="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --env | --env=*)
      pair="$(flag_value "$@")"; shift "$(flag_shift "$1")"
      [[ "$pair" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, got '$pair'"
      ENV_VARS+=("$pair") ;;
    --detach) DETACH=1; shift ;;
    --worker | --worker=*) WORKER="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown argument: $1 (see --help; arguments for nearprox.training.train go after --)" ;;
  esac
done

require_tpu
[[ -n "$CONFIG" ]] || die "--config is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
tpu_flags
if [[ -z "$LOG_FILE" ]]; then
  LOG_FILE="runs/tpu_logs/$TPU_NAME-$(date +%Y%m%d-%H%M%S).log"
fi

config_file="$(dirname "${BASH_SOURCE[0]}")/../${CONFIG%%:*}"
if [[ ! -f "$config_file" ]]; then
  echo "warning: ${CONFIG%%:*} is not in this checkout; the workers must have it" >&2
fi

# NEARPROX_DISTRIBUTED=auto: nearprox.training.train calls jax.distributed.initialize(), which finds
# the other hosts of a TPU slice by itself. PYTHONUNBUFFERED: lines appear as they happen.
# --env values come last, so they override these.
train_cmd="$(quote_args env NEARPROX_DISTRIBUTED=auto PYTHONUNBUFFERED=1 "${ENV_VARS[@]}" \
  .venv/bin/python -m nearprox.training.train \
  --config "$CONFIG" --workdir "$WORKDIR" "${TRAIN_ARGS[@]}")"
if [[ "$DETACH" == 1 ]]; then
  remote_script="cd ~/$REMOTE_DIR && mkdir -p logs
nohup $train_cmd > logs/train.log 2>&1 < /dev/null &
echo \$! > logs/train.pid
echo \"worker \$(hostname): started pid \$(cat logs/train.pid), log ~/$REMOTE_DIR/logs/train.log\""
else
  remote_script="set -o pipefail
cd ~/$REMOTE_DIR && mkdir -p logs
$train_cmd 2>&1 | tee logs/train.log"
fi

run_logged "$LOG_FILE" gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--worker=$WORKER" \
  "${TPU_FLAGS[@]}" "--command=$remote_script"
