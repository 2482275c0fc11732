#!/usr/bin/env bash
# Installs what the default job needs into ./.venv, then runs it (offline: MiniLM on the
# tweet-sentiment corpus, the study's best proximal variant vs AdamW vs SGD+momentum; about a
# quarter of an hour on a CPU). Arguments go to experiments/default_job.py.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh train
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m experiments.default_job "$@"
