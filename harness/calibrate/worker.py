"""A perturbation set by an environment variable (``ATEN_CPU_CAPABILITY``, ``OMP_NUM_THREADS``) runs here.

Such settings are read once, when torch starts, so the parent writes a job file and
starts ``python -m harness.calibrate.run --worker JOB``, which loads the variant as the
parent did and scores the same paths.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.judge.noise import Item, Scored, forced, paths_from_json, paths_to_json

if TYPE_CHECKING:
    from harness.calibrate.context import Context


def in_subprocess(ctx: Context, variant: Any, paths: list[list[int]], setting: str) -> list[Scored]:
    """Score the paths in a fresh Python whose environment has ``setting`` (NAME=VALUE)."""
    name, sep, value = setting.partition("=")
    if not sep or not name:
        raise ValueError(f"--env {setting!r}: expected NAME=VALUE")
    job = {
        "name": ctx.resolved.name, "path": str(ctx.resolved.path), "source": ctx.resolved.source,
        "entry": ctx.resolved.entry.model_dump(), "adapter": str(ctx.resolved.adapter) if ctx.resolved.adapter else None,
        "device": ctx.device.name.split(":")[0], "variant": variant.key, "attn": ctx.reference_attn,
        "items": [asdict(it) for it in ctx.items], "paths": paths,
    }
    with tempfile.TemporaryDirectory(prefix="harness-calibrate-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "harness.calibrate.run", "--worker", str(job_file)],
                              env={**os.environ, name: value}, capture_output=True, text=True, check=False)
        out_file = job_file.with_suffix(".out.json")
        if proc.returncode != 0 or not out_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"worker with {setting} failed: {tail[0]}")
        return paths_from_json(json.loads(out_file.read_text())["paths"])


def run_job(job_file: Path) -> int:
    """Inside the fresh process: load the variant as the parent did and score the paths."""
    from harness.models.devices import pick_device
    from harness.models.pool import ModelPool
    from harness.models.registry import ModelEntry
    from harness.models.sources import ResolvedModel
    from harness.models.variants import VariantSpec

    job = json.loads(job_file.read_text())
    resolved = ResolvedModel(job["name"], Path(job["path"]), ModelEntry(**job["entry"]), job["source"],
                             Path(job["adapter"]) if job["adapter"] else None)
    pool = ModelPool(resolved=resolved, device=pick_device(job["device"]), attn_implementation=job["attn"])
    items = [Item(d["name"], tuple(d["prompt_ids"]), d["max_new_tokens"]) for d in job["items"]]
    paths = forced(pool.get(VariantSpec.from_key(job["variant"])).model, pool.tokenizer, items, job["paths"])
    job_file.with_suffix(".out.json").write_text(json.dumps({"paths": paths_to_json(paths)}))
    return 0

