# shellcheck shell=bash disable=SC2034  # variables here are read by the scripts that source this
# Shared helpers of the nearprox TPU scripts; sourced, never run.
#
# Every script accepts the TPU flags below (defaults from the environment), --dry-run
# (print every command, run none) and --help. Commands are printed as "+ cmd args",
# shell-quoted, so a dry run can be pasted into a terminal.

TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
# Where the repository lives on every worker (relative to the remote home directory).
REMOTE_DIR="${NEARPROX_REMOTE_DIR:-nearprox}"

[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_.-]+$ ]] || {
  echo "NEARPROX_REMOTE_DIR must be a plain directory name, got '$REMOTE_DIR'" >&2
  exit 2
}

die() {
  echo "$(basename "$0"): error: $*" >&2
  exit 2
}

# POSIX shell quoting: the word itself when it is plainly safe, else in single quotes.
# (Not printf %q, whose $'...' form for newlines other tools cannot read back.)
shell_quote() {
  local word="$1"
  if [[ "$word" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# Shell-quotes its arguments into one line of words.
quote_args() {
  local out=""
  local arg
  for arg in "$@"; do
    out+="$(shell_quote "$arg") "
  done
  echo "${out% }"
}

# Prints a command the way a shell would read it back, after a "+".
print_cmd() {
  echo "+ $(quote_args "$@")"
}

# Runs a command, or only prints it under --dry-run (printed to stderr when it runs).
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd "$@"
  else
    print_cmd "$@" >&2
    "$@"
  fi
}

# Runs a command with stdout and stderr streamed to the console and appended to a file.
run_logged() {
  local log_file="$1"
  shift
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "$(print_cmd "$@") 2>&1 | tee -a $(shell_quote "$log_file")"
  else
    mkdir -p "$(dirname "$log_file")"
    print_cmd "$@" >&2
    echo "logging to $log_file" >&2
    "$@" 2>&1 | tee -a "$log_file"
  fi
}

# Takes the value of a "--flag value" or "--flag=value" argument.
# Usage: flag_value "$@"  -> prints the value; the caller shifts 1 or 2 (see flag_shift).
flag_value() {
  if [[ "$1" == *=* ]]; then
    echo "${1#*=}"
  elif [[ $# -ge 2 && "$2" != --* ]]; then
    echo "$2"
  else
    die "${1} needs a value"
  fi
}

flag_shift() {
  if [[ "$1" == *=* ]]; then echo 1; else echo 2; fi
}

# Checks the TPU flags every script needs and that gcloud is there (unless dry-running).
require_tpu() {
  [[ -n "$TPU_NAME" ]] || die "--name is required (or set TPU_NAME)"
  [[ -n "$TPU_ZONE" ]] || die "--zone is required (or set TPU_ZONE)"
  if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)"
  fi
}

# The --zone/--project flags of every gcloud tpu-vm command, in the array TPU_FLAGS.
tpu_flags() {
  TPU_FLAGS=("--zone=$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    TPU_FLAGS+=("--project=$TPU_PROJECT")
  fi
}

# Handles a flag every script shares; sets SHIFT_BY (0 when "$1" is not one of them).
common_flag() {
  SHIFT_BY=0
  case "$1" in
    --name | --name=*) TPU_NAME="$(flag_value "$@")" ;;
    --zone | --zone=*) TPU_ZONE="$(flag_value "$@")" ;;
    --project | --project=*) TPU_PROJECT="$(flag_value "$@")" ;;
    --dry-run) DRY_RUN=1; SHIFT_BY=1; return ;;
    *) return ;;
  esac
  SHIFT_BY="$(flag_shift "$1")"
}

COMMON_FLAGS_HELP="TPU flags (every script):
  --name NAME        TPU VM name (default \$TPU_NAME)
  --zone ZONE        zone, e.g. us-central2-b (default \$TPU_ZONE)
  --project PROJECT  Google Cloud project (default \$TPU_PROJECT, else gcloud's config)
  --dry-run          print every command instead of running it
  -h, --help         this help"
