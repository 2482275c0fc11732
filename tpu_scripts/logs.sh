#!/usr/bin/env bash
# Follows the training log on the workers of a TPU VM (for runs started with launch.sh).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="0"
LOG_FILE=""
FOLLOW=1

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [options]

Prints ~/$REMOTE_DIR/logs/train.log of the chosen workers and keeps following it (tail -F),
streamed to this console and appended to a local log file. Stop with Ctrl-C; the run
goes on.

Options:
  --worker W       0 (default: process 0 writes the metrics), a number, or all
  --log-file FILE  local log (default runs/tpu_logs/NAME-logs.log)
  --no-follow      print the log once and return

$COMMON_FLAGS_HELP
USAGE
}

while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ "$SHIFT_BY" -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --worker | --worker=*) WORKER="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --log-file | --log-file=*) LOG_FILE="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --no-follow) FOLLOW=0; shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require_tpu
tpu_flags
LOG_FILE="${LOG_FILE:-runs/tpu_logs/$TPU_NAME-logs.log}"
if [[ "$FOLLOW" == 1 ]]; then
  remote_script="tail -n +1 -F ~/$REMOTE_DIR/logs/train.log"
else
  remote_script="cat ~/$REMOTE_DIR/logs/train.log"
fi
run_logged "$LOG_FILE" gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--worker=$WORKER" \
  "${TPU_FLAGS[@]}" "--command=$remote_script"
