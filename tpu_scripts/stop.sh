#!/usr/bin/env bash
# Stops a run started with launch.sh --detach on every worker (the TPU VM keeps running).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [options]

Sends SIGTERM to the process recorded in ~/$REMOTE_DIR/logs/train.pid on every worker.
A process still holding the TPU blocks the next launch, so stop a run before starting
another on the same VM.

$COMMON_FLAGS_HELP
USAGE
}

while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ "$SHIFT_BY" -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require_tpu
tpu_flags
remote_script="pid_file=~/$REMOTE_DIR/logs/train.pid
if [ -f \"\$pid_file\" ] && kill \"\$(cat \"\$pid_file\")\" 2>/dev/null; then
  echo \"worker \$(hostname): stopped pid \$(cat \"\$pid_file\")\"
else
  echo \"worker \$(hostname): no running training process\"
fi
rm -f \"\$pid_file\""
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${TPU_FLAGS[@]}" \
  "--command=$remote_script"
