#!/usr/bin/env bash
# The GPU half of the harness (issue 19), one step per call: pack | install | synthetic | receive | real | doc | all.
# The plan (what travels in which device call, and why) is the header of scripts/gpu_bench.py;
# `scripts/gpu-bench.sh all --dry-run` runs every step on CPU (tests/test_gpu_bench.py does, in CI).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$here/scripts/gpu_bench.py" "$@"
