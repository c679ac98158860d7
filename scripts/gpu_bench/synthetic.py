"""Step (a): ``harness-bench --config NAME`` per architecture, random weights, each in its own process.

One process per architecture keeps each CUDA peak clean. The architectures run largest-value
first, so that ``--deadline`` cuts the least useful ones: none starts that would not finish in time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from gpu_bench.common import Settings, archive, out_log, run, say

GPU_CONFIGS = ("qwen2-0.5b", "llama-3-8b", "phi-3-mini", "qwen2-7b", "smollm2-135m")
GPU_SWEEP = "1x128,8x512,32x1024"
DRY_CONFIGS = ("tiny-llama",)
DRY_SWEEP = "1x16,2x32"


def work_dir_for_models(s: Settings, largest: int) -> Path:
    """A RAM disk where one fits the largest random model (no disk round trip), else the work folder."""
    if not s.dry_run:
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > 1.2 * largest:
            return shm / "gpu-bench-models"
    return s.work / "models"


def synthetic(s: Settings, args: argparse.Namespace) -> None:
    """fp16 / NF4 / ±LoRA per architecture over a batch x prompt sweep; reports under the work folder."""
    from harness.models.synthetic import load_config, parameter_count

    configs = [c for c in (args.configs.split(",") if args.configs else (DRY_CONFIGS if s.dry_run else GPU_CONFIGS))
               if c]
    params = {c: parameter_count(load_config(c)[1]) for c in configs}
    models = work_dir_for_models(s, 2 * max(params.values()))
    folder = s.work / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    settings = {"device": s.device, "sweep": args.sweep or (DRY_SWEEP if s.dry_run else GPU_SWEEP),
                "new_tokens": args.new_tokens or (4 if s.dry_run else 32), "rounds": args.rounds or (1 if s.dry_run else 2),
                "warmup": 1}
    index: dict[str, Any] = {"order": [], "skipped": {}, "deadline_s": args.deadline, "settings": settings}
    for name in configs:
        left = args.deadline - (time.monotonic() - start)
        needed = args.min_arch_seconds * max(0.3, params[name] / 8e9)
        if left < needed:
            index["skipped"][name] = f"not started: {left:.0f} s left of --deadline {args.deadline:g} s"
            say(f"{name}: {index['skipped'][name]}")
            continue
        out = folder / name
        if out.exists():
            shutil.rmtree(out)
        cmd = [sys.executable, "-m", "harness.bench.run", "--config", name, "--device", s.device, "--out", str(out),
               "--work-dir", str(models), "--sweep", settings["sweep"], "--new-tokens", str(settings["new_tokens"]),
               "--rounds", str(settings["rounds"]), "--warmup", str(settings["warmup"])]
        if s.dry_run:
            cmd += ["--prompt", "The capital of France is", "--workload-tokens", "2", "--workload-batch", "1"]
        if args.bandwidth:
            cmd += ["--bandwidth", str(args.bandwidth)]
        code = run(cmd, s=s, log=out_log(s), timeout=left + args.grace)
        report = out / "report.json"
        if report.is_file():
            index["order"].append(name)
        else:
            index["skipped"][name] = f"no report (exit {code}{', ran past the deadline' if code == 124 else ''})"
        shutil.rmtree(models, ignore_errors=True)
    (folder / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    say(f"synthetic: {len(index['order'])} architectures measured, {len(index['skipped'])} not")
    archive(s.out / "synthetic.tar.gz", folder, ("*/report.md", "*/report.json", "*/memory.png", "index.json"))
