#!/usr/bin/env bash
# The GPU half of the harness, for your GPU host: pack | install | synthetic | receive | real | doc | all.
# docs/gpu.md says how to run it online or offline; `--help` lists every option.
# `scripts/gpu-bench.sh all --dry-run` runs every step on CPU (tests/test_gpu_bench.py does, in CI).
# PYTHON picks the interpreter (default python3).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$here:$here/scripts${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m gpu_bench "$@"
