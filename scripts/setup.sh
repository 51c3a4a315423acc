#!/usr/bin/env bash
# Creates ./.venv with the pinned stack. Safe to re-run: satisfied requirements are skipped.
#
# torch: PyPI's default (CUDA-enabled) build of 2.13.0, which runs on CPU-only machines too. It is chosen over a
# CPU-only wheel because transformers' video processors need torchvision, and PyPI's torchvision 0.28.0 imports
# only against that build. `--isolated` makes pip ignore machine-wide pip settings (find-links to a local
# `+cpu` wheel, which would otherwise win). Download ~4.8 GB the first time.
# triton: the CPU tests run the bundled kernels in Triton's interpreter, pinned to the GPU machine's 3.6.0
# (Triton's API changes between releases); torch 2.13 asks for 3.7.1, hence the --no-deps override.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# (the filter drops pip's notes about this machine's file:// package mirrors, which are noise here)
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! .venv/bin/python -c "import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith('2.13.0') and torchvision.__version__.startswith('0.28.0')))" 2>/dev/null; then
  pip install --isolated -q torch==2.13.0 torchvision==0.28.0
fi
pip install -q -r requirements-dev.txt
pip install -q --no-deps triton==3.6.0
# the project itself, editable: the Hub modules at the root and the videonsa tools package (console scripts)
pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -c "import torch, torchvision, transformers, triton; print(f'set-up ok: torch {torch.__version__}, torchvision {torchvision.__version__}, transformers {transformers.__version__}, triton {triton.__version__}')"
