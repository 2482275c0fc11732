#!/usr/bin/env bash
# Deletes a TPU VM (all workers of a pod slice), which stops its billing.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

YES=0

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [--yes] [options]

Deletes the TPU VM with 'gcloud compute tpus tpu-vm delete'. Its disks go with it: copy
results out first (a workdir on a mounted bucket already is outside).

Options:
  --yes            do not ask for confirmation (gcloud --quiet)

$COMMON_FLAGS_HELP
USAGE
}

while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ "$SHIFT_BY" -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --yes | -y) YES=1; shift ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require_tpu
tpu_flags
cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}")
if [[ "$YES" == 1 ]]; then
  cmd+=(--quiet)
fi
run "${cmd[@]}"
