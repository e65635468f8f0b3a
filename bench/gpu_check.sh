#!/usr/bin/env bash
# Every path that differs on CUDA, on one GPU in under 8 minutes, as PASS / FAIL / INFO lines.
#
#   bash bench/gpu_check.sh          # on a machine with a GPU; downloads nothing
#   bash bench/gpu_check.sh --cpu    # the same checks on a CPU with tiny shapes (CI runs this)
#   bash bench/gpu_check.sh --only packed greedy --keep /tmp/gc   # some checks; keep their files
#
# The checks are in bench/gpu_check.py; docs/gpu.md says what each one is for. Exit status 1
# when any check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if [ "${1:-}" != "--cpu" ] && command -v nvidia-smi > /dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
exec python3 bench/gpu_check.py "$@"
