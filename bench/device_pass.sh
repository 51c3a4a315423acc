#!/usr/bin/env bash
# One check-and-benchmark pass on a CUDA machine (the H200 of docs/benchmarks.md), results under $OUT:
# GPU tests of the code paths this pass measures, then bench_memory.py's cells (what fits under 80 GB and 24 GB caps,
# bf16 / FP8 / int8 / NF4 and the dense baseline, accuracy of each format against bf16).
#   OUT=/tmp/out bash bench/device_pass.sh
# bitsandbytes is installed from .wheels/ (git-ignored; scripts/setup.sh's pin, downloaded with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 bitsandbytes==0.50.2 -d .wheels`)
# when the machine lacks it and has no network.
set -u
OUT=${OUT:?set OUT to a results folder}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} USE_HUB_KERNELS=NO
if ! python -c "import bitsandbytes" 2>/dev/null && compgen -G ".wheels/bitsandbytes-*.whl" >/dev/null; then
  python -m pip install -q --no-deps --no-index --target /tmp/bnb .wheels/bitsandbytes-*.whl && export PYTHONPATH=/tmp/bnb:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
[ "${TESTS_TIMEOUT:-200}" = 0 ] || timeout "${TESTS_TIMEOUT:-200}" python -m pytest -q -p no:cacheprovider tests/gpu/test_quantization_gpu.py \
  "tests/gpu/test_kernels_gpu.py::test_hybrid_in_query_chunks_equals_one_piece[40000]" tests/gpu/test_model_gpu.py \
  2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
# expandable segments: long prompts allocate many large, differently sized buffers, which the caching allocator
# otherwise keeps in separate segments (the README recommends it on small cards)
PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True} timeout "${BENCH_TIMEOUT:-420}" \
  python bench/bench_memory.py --pixels-on cpu --cells ${CELLS:-bf16@24GB/4096:65536,81920 bf16@80GB:131072,327680 \
  nf4@24GB/4096:131072,163840 int8@24GB/4096:65536} --out "$OUT/bench_memory.md" 2>&1 | grep -vE "Warning|warn\(" | tail -40
