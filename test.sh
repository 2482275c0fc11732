#!/usr/bin/env bash
# Installs what the tests need into ./.venv, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh test
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests -n 2 "$@"
