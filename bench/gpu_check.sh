#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): one table, CUDA = CPU checks, and (on 2 or more GPUs) one
# worker against two pinned one per GPU; under 10 minutes on one or two GPUs.
#   bash bench/gpu_check.sh [OUT.json] [--sections two-workers ...]   (needs: pip install -e ".[dev]")
# Fewer than 2 GPUs: the two-worker section prints "two workers: skipped: needs 2 GPUs, ..." and the rest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT="${1:-gpu_check.json}"
shift $(( $# > 0 ? 1 : 0 ))
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || true
exec timeout 600 "$PY" bench/gpu_check.py --out "$OUT" "$@"
