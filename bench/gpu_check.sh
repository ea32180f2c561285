#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): one table, CUDA = CPU checks; under 8 minutes on one GPU.
#   bash bench/gpu_check.sh [OUT.json]     (needs the project installed: pip install -e ".[dev]")
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PY" bench/gpu_check.py --out "${1:-gpu_check.json}"
