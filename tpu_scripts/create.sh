#!/usr/bin/env bash
# Creates a Cloud TPU VM: one host (e.g. v4-8) or a pod slice of several hosts (e.g. v4-32).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR_TYPE="v4-8"
RUNTIME_VERSION="tpu-ubuntu2204-base"
PROVISIONING=""
EXTRA=()

usage() {
  cat <<USAGE
Usage: $(basename "$0") --name NAME --zone ZONE [options] [-- extra gcloud flags]

Creates a TPU VM with 'gcloud compute tpus tpu-vm create'. A pod slice (e.g. v4-32: four
hosts of four chips) is one TPU VM with several workers; the other scripts reach all of them.

Options:
  --accelerator-type TYPE  v4-8 (one host, default), v4-16, v4-32, ... (a pod slice)
  --runtime-version VER    TPU software version (default $RUNTIME_VERSION; v5e:
                           v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e)
  --spot                   Spot VM: cheaper, may be preempted at any time
  --preemptible            preemptible VM (the older form of --spot)
  -- ARGS                  passed to gcloud as they are (e.g. --network=NET)

$COMMON_FLAGS_HELP

Example:
  $(basename "$0") --name nearprox-pod --zone us-central2-b --accelerator-type v4-32 --spot
USAGE
}

while [[ $# -gt 0 ]]; do
  common_flag "$@"
  if [[ "$SHIFT_BY" -gt 0 ]]; then shift "$SHIFT_BY"; continue; fi
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --accelerator-type | --accelerator-type=*)
      ACCELERATOR_TYPE="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --runtime-version | --runtime-version=* | --version | --version=*)
      RUNTIME_VERSION="$(flag_value "$@")"; shift "$(flag_shift "$1")" ;;
    --spot | --preemptible)
      [[ -z "$PROVISIONING" || "$PROVISIONING" == "$1" ]] ||
        die "--spot and --preemptible exclude each other"
      PROVISIONING="$1"; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

require_tpu
[[ "$ACCELERATOR_TYPE" =~ ^v[0-9]+[a-z]*(-lite)?(pod)?-[0-9]+$ ]] ||
  die "--accelerator-type looks wrong: '$ACCELERATOR_TYPE' (expected e.g. v4-8, v4-32, v5litepod-8)"
tpu_flags

cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}"
  "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
if [[ -n "$PROVISIONING" ]]; then
  cmd+=("$PROVISIONING")
fi
cmd+=("${EXTRA[@]}")
run "${cmd[@]}"
