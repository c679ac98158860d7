"""The command line of ``scripts/gpu-bench.sh``: one step, or all of them in order."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import gpu_bench
from gpu_bench.bundle import BNB_KEEP, install, pack, receive
from gpu_bench.common import BUNDLE, PYTHON, REPO, WHEELS, WORK, Settings, StepFailed, say, use_site
from gpu_bench.document import doc
from gpu_bench.real import real
from gpu_bench.synthetic import GPU_CONFIGS, GPU_SWEEP, synthetic

STEPS = ("pack", "install", "synthetic", "receive", "real", "doc", "all")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu-bench.sh", description=gpu_bench.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=STEPS)
    p.add_argument("--dry-run", action="store_true", help="every step on this CPU: tiny config, one prompt, temp folders")
    p.add_argument("--out", default=None,
                   help="where results are written (default: $GPU_BENCH_OUT, else gpu-bench-out/ in the repository)")
    p.add_argument("--work", default=None, help=f"state kept between steps (default {WORK}; dry run: a temp folder)")
    p.add_argument("--bundle", default=None, help=f"pack, install, receive: the bundle folder (default {BUNDLE})")
    p.add_argument("--wheels", default=None, help=f"pack: the downloaded wheels (default {WHEELS})")
    p.add_argument("--max-part-mb", type=float, default=None,
                   help="pack: the largest file your transfer allows, in MiB; larger files are cut into parts")
    p.add_argument("--python", default=PYTHON,
                   help=f"pack: the GPU host's python version the wheels were downloaded for (default {PYTHON})")
    p.add_argument("--keep-bnb", default=BNB_KEEP,
                   help=f"pack: bitsandbytes libraries to keep, a regex on the version part (default {BNB_KEEP!r})")
    p.add_argument("--configs", default=None, help="synthetic: comma list of architectures (default: "
                                                   + ",".join(GPU_CONFIGS) + ")")
    p.add_argument("--sweep", default=None, help=f"synthetic: batch x prompt shapes (default {GPU_SWEEP})")
    p.add_argument("--new-tokens", type=int, default=None, help="synthetic: new tokens per shape (default 32)")
    p.add_argument("--rounds", type=int, default=None, help="synthetic: timed rounds per shape (default 2)")
    p.add_argument("--deadline", type=float, default=1800.0,
                   help="synthetic: seconds for all architectures; none starts that would not fit (default 1800)")
    p.add_argument("--min-arch-seconds", type=float, default=100.0,
                   help="synthetic: seconds an 8B architecture needs, scaled by size (default 100)")
    p.add_argument("--grace", type=float, default=120.0,
                   help="synthetic: seconds an architecture may run past --deadline before it is stopped (default 120)")
    p.add_argument("--bandwidth", type=float, default=None, help="synthetic: peak GB/s if the card is not in the table")
    p.add_argument("--variants", default=None, help="real: variants (default all four; dry run: fp16-lora)")
    p.add_argument("--conditions", default=None,
                   help="real: same-device conditions (default kernels,repeat; dry run: kernels)")
    p.add_argument("--from", dest="from_json", action="append", default=None,
                   help="doc: merge an earlier benchmark-gpu.json (another run, another host) into the document")
    return p


def run_step(step: str, s: Settings, args: argparse.Namespace) -> None:
    """One step; ``synthetic`` run on its own writes the document too, so that its figures are readable at once."""
    if step == "pack":
        pack(s, wheels=Path(args.wheels) if args.wheels else WHEELS, keep_bnb=args.keep_bnb,
             max_part_mb=args.max_part_mb, python=args.python)
    elif step == "install":
        install(s)
    elif step == "synthetic":
        synthetic(s, args)
        if args.step == "synthetic":
            doc(s, args)
    elif step == "receive":
        receive(s)
    elif step == "real":
        real(s, args)
    elif step == "doc":
        doc(s, args)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    work = Path(args.work) if args.work else (Path(tempfile.mkdtemp(prefix="gpu-bench-dry-")) if args.dry_run else WORK)
    out = Path(args.out or os.environ.get("GPU_BENCH_OUT") or REPO / "gpu-bench-out")
    s = Settings(dry_run=args.dry_run, out=out.resolve(), work=work.resolve(),
                 bundle_dir=Path(args.bundle).resolve() if args.bundle else BUNDLE)
    s.out.mkdir(parents=True, exist_ok=True)
    s.work.mkdir(parents=True, exist_ok=True)
    use_site(s)
    steps = ["pack", "install", "synthetic", "receive", "real"] if args.step == "all" else [args.step]
    started = time.monotonic()
    try:
        for step in steps:
            say(f"== {step}{' (dry run)' if s.dry_run else ''}")
            t0 = time.monotonic()
            run_step(step, s, args)
            say(f"== {step} done in {time.monotonic() - t0:.0f} s")
        if args.step == "all":
            doc(s, args)
    except StepFailed as exc:
        say(f"FAILED: {exc}")
        return 3
    say(f"finished in {time.monotonic() - started:.0f} s; outputs in {s.out}")
    return 0
