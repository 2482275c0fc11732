#!/usr/bin/env bash
# Installs what the tests need into ./.venv, checks format (pyink) and lint (ruff), then runs
# the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh test
.venv/bin/pyink --check --quiet .
.venv/bin/ruff check --quiet .
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest tests -n 2 --durations=20 "$@"
