#!/usr/bin/env bash
# Creates ./.venv with the pinned stack (newest transformers), and ./.venv-tf517 with the oldest supported
# transformers for a second test run. Safe to re-run: satisfied requirements are skipped.
#
# torch: PyPI's default (CUDA-enabled) build of 2.13.0, which runs on CPU-only machines too. It is chosen over a
# CPU-only wheel because transformers' video processors need torchvision, and PyPI's torchvision 0.28.0 imports
# only against that build. `--isolated` makes pip ignore machine-wide pip settings (find-links to a local
# `+cpu` wheel, which would otherwise win). Download ~4.8 GB the first time.
# triton: the CPU tests run the bundled kernels in Triton's interpreter, pinned to the GPU machine's 3.6.0
# (Triton's API changes between releases); torch 2.13 asks for 3.7.1, hence the --no-deps override.
# transformers: its pin declares a dependency the package index lacks (see requirements-dev.txt), so it is installed
# without dependencies after everything else; `pip check` then confirms that nothing but that one is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# (the filter drops pip's notes about this machine's file:// package mirrors, which are noise here)
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.13.0') and torchvision.__version__.startswith('0.28.0')))" 2>/dev/null; then
  pip install --isolated -q torch==2.13.0 torchvision==0.28.0
fi
transformers_pin=$(grep -E '^transformers==' requirements-dev.txt | cut -d' ' -f1)
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
grep -hvE '^[[:space:]]*(-r[[:space:]]|transformers[^-_a-z])' requirements.txt requirements-dev.txt > "$requirements"
pip install -q -r "$requirements"
pip install -q --no-deps "$transformers_pin"
pip install -q --no-deps triton==3.6.0
# the project itself, editable: the Hub modules at the root and the videonsa tools package (console scripts)
pip install -q --no-deps --no-build-isolation -e .
missing=$(.venv/bin/python -m pip check 2>&1 | grep -vE "^(transformers [0-9.]+ requires kernels|torch [0-9.]+ has requirement triton|No broken)" || true)
if [ -n "$missing" ]; then
  echo "set-up: unmet dependencies:" >&2
  echo "$missing" >&2
  exit 1
fi

# The oldest supported transformers, in a folder of its own (its versions shadow .venv's on PYTHONPATH).
oldest=$(grep -E '^transformers==' requirements-tf517.txt | cut -d= -f3 | cut -d' ' -f1)
if ! PYTHONPATH=.venv-tf517 .venv/bin/python -c "import transformers, sys; sys.exit(transformers.__version__ != '$oldest')" 2>/dev/null; then
  rm -rf .venv-tf517
  pip install -q --no-deps --target .venv-tf517 -r requirements-tf517.txt
fi
PYTHONPATH=.venv-tf517 .venv/bin/python -c "from transformers import Qwen2_5_VLForConditionalGeneration; import transformers, huggingface_hub; print(f'set-up ok (oldest): transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}')"
# bitsandbytes' import on CPUs with AVX512-BF16 logs a warning when it cannot fetch an optional Hub kernel (no Hub access
# or no trust for it) and falls back to its own CPU kernel: nothing to act on, so the check keeps it quiet
.venv/bin/python -c "import logging; logging.getLogger('bitsandbytes').setLevel(logging.ERROR); import torch, torchvision, transformers, triton, bitsandbytes; print(f'set-up ok: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, triton {triton.__version__}, bitsandbytes {bitsandbytes.__version__}')"
