#!/usr/bin/env bash
# One-GPU check in <= 8 minutes: paper-size BiMAC step in bf16 (samples/s, MFU against the GPU's
# bf16 peak) and loader images/s on photo_1024 with CPU decode and with GPU decode, one worker per
# core (at most 16). Writes runs/bench/gpu_check.json.
#   bash benchmarks/gpu_check.sh             # on a GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # the same code on CPU, tiny model, 64 images
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}"
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
