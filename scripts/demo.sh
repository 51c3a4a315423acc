#!/usr/bin/env bash
# Sets up ./.venv (scripts/setup.sh) and runs the main job (videonsa/demo.py); extra arguments go to it,
# e.g. --model Enxin/VideoNSA --video clip.mp4
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# transformers >= 5.25 loads Hub kernels by default through the `kernels` package, which the package index used by
# setup.sh lacks (requirements-dev.txt); they are CUDA-only and the tiny demo runs without them.
export USE_HUB_KERNELS="${USE_HUB_KERNELS:-NO}"
exec .venv/bin/python -m videonsa.demo "$@"
