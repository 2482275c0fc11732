#!/usr/bin/env bash
# Installs what the default job needs into ./.venv, then runs it (offline: MiniLM on the
# tweet-sentiment corpus, proximal SGD vs plain SGD; a few minutes on a CPU).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh train
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m experiments.default_job "$@"
