"""``python -m gpu_bench`` (``scripts/gpu-bench.sh`` puts ``scripts/`` on the path)."""

from gpu_bench.cli import main

raise SystemExit(main())
