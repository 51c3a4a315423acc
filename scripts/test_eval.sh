#!/usr/bin/env bash
# Sets up ./.venv-eval (scripts/setup_eval.sh, which sets up ./.venv first if needed) and runs the lmms-eval tests
# in it. Extra arguments go to pytest. Under CI=true a missing lmms-eval fails these tests instead of skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_eval.sh
exec "${EVAL_VENV:-.venv-eval}/bin/python" -m pytest -q tests/test_eval.py "$@"
