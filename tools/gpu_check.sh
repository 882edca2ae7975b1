#!/usr/bin/env bash
# `make gpu-check`: on a fresh GPU machine with no network (H100/H200; see README, GPU check),
# installs the wheels of tools/gpu_wheels.sh, builds the CUDA op, runs the CUDA tests and the op
# and model benchmarks, and writes output/gpu_check.json. Runs no pip download, no venv: the
# machine's own python3 (with torch) is used. Extra arguments go to tools/gpu_check.py
# (e.g. --dry-run, --budget-s 450).
#
#   PYTHON=python3            the interpreter (it must have torch)
#   GPU_WHEELS=.gpu_wheels    the wheels folder (carried to the machine)
#   GPU_SITE=/tmp/detr_variants_site   where they are installed (put on PYTHONPATH)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
exec "$PYTHON" tools/gpu_check.py --python "$(command -v "$PYTHON")" \
  --wheels "${GPU_WHEELS:-.gpu_wheels}" --site "${GPU_SITE:-/tmp/detr_variants_site}" "$@"
