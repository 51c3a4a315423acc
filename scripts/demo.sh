#!/usr/bin/env bash
# Sets up ./.venv (scripts/setup.sh) and runs the main job (videonsa/demo.py); extra arguments go to it,
# e.g. --model Enxin/VideoNSA --video clip.mp4
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m videonsa.demo "$@"
