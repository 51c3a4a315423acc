#!/usr/bin/env bash
# Sets up ./.venv and ./.venv-tf517 (scripts/setup.sh) and runs the CPU test suite under the newest pinned
# transformers, then the model, generation and quantization tests again under the oldest supported one (5.17), then
# the lmms-eval tests in their own environment (scripts/test_eval.sh: lmms-eval pins packages the main set-up cannot
# take).
# Extra arguments go to pytest; with arguments, only the first run happens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# transformers >= 5.25 loads Hub kernels by default, through the `kernels` package the index lacks
# (requirements-dev.txt); they are CUDA-only, so the CPU suite does without them.
export USE_HUB_KERNELS=NO
run() {
  local status=0
  "$@" || status=$?
  if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure of the suite, not a pass" >&2
    return 1
  fi
  return "$status"
}
status=0
run .venv/bin/python -m pytest -q --ignore=tests/test_eval.py "$@" || status=$?
if [ "$#" -eq 0 ]; then
  echo "== the model, generation and quantization tests under the oldest supported transformers (.venv-tf517)"
  run env PYTHONPATH="$PWD/.venv-tf517" .venv/bin/python -m pytest -q tests/test_model.py tests/test_generation.py tests/test_quantization.py || status=$?
  echo "== the lmms-eval tests (.venv-eval)"
  bash scripts/test_eval.sh || status=$?
fi
exit "$status"
