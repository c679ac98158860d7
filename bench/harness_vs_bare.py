"""What judging costs: the harness on a greedy suite against the bare script doing its generations.

Runs, in turn (bare first in odd pairs, harness first in even ones, so drift of the machine falls
on both), ``python bench/bare_greedy.py SUITE`` and ``python -m pytest SUITE`` on the same
variants, each a fresh process timed wall to wall (imports and model loads included in both), and
prints each pair and the median ratio harness ÷ bare. ``--out`` writes the figures as JSON with
the machine they were taken on; ``bench/harness-vs-bare.json`` is the committed baseline.
Measure alone on the machine: another busy process changes both sides unequally.

    python bench/harness_vs_bare.py --pairs 3 --out bench/harness-vs-bare.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> float:
    """Wall seconds of one fresh process; a failing run is an error, not a figure."""
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"harness_vs_bare.py: {' '.join(argv)} exited {proc.returncode}:\n"
                         + proc.stdout[-3000:] + proc.stderr[-2000:])
    return seconds


def _has_avx512() -> bool | None:
    """Whether the CPU has AVX-512 (NF4's bfloat16 compute is several times slower without it)."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="suites/generation.yaml")
    parser.add_argument("--variants", default="fp16,nf4")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    bare = [sys.executable, "bench/bare_greedy.py", args.suite, "--variants", args.variants]
    harness = [sys.executable, "-m", "pytest", args.suite, "--variants", args.variants, "-q", "-p", "no:cacheprovider"]
    pairs = []
    for index in range(args.pairs):
        order = [("bare", bare), ("harness", harness)]
        if index % 2:
            order.reverse()
        pair = {name: round(timed(cmd), 2) for name, cmd in order}
        pair["ratio"] = round(pair["harness"] / pair["bare"], 3)
        pairs.append(pair)
        print(f"pair {index + 1}: harness {pair['harness']:.1f} s, bare {pair['bare']:.1f} s, "
              f"ratio {pair['ratio']:.3f}", flush=True)
    median = statistics.median(p["ratio"] for p in pairs)
    print(f"harness ÷ bare on {args.suite} ({args.variants}): median {median:.3f} over {len(pairs)} pair(s)")
    if args.out:
        import torch

        args.out.write_text(json.dumps({
            "suite": args.suite, "variants": args.variants, "pairs": pairs, "median_ratio": round(median, 3),
            "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "avx512": _has_avx512(),
                        "torch": torch.__version__, "python": platform.python_version()},
            "command": {"bare": " ".join(bare[1:]), "harness": " ".join(harness[1:])},
        }, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
