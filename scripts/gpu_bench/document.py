"""The last step: ``benchmark-gpu.md``, ``.json`` and ``.png`` from what the other steps left."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_bench.common import Settings, say, use_site
from gpu_bench.synthetic import GPU_SWEEP


def doc(s: Settings, args: argparse.Namespace) -> list[Path]:
    """benchmark-gpu.{md,json,png} from the steps' results here, merged with ``--from`` files."""
    use_site(s)
    from harness.bench.doc import combine, write

    folder = s.work / "synthetic"
    index = json.loads((folder / "index.json").read_text()) if (folder / "index.json").is_file() else {}
    reports = [json.loads((folder / n / "report.json").read_text()) for n in index.get("order", [])]
    real_doc = json.loads((s.work / "real.json").read_text()) if (s.work / "real.json").is_file() else None
    skipped = dict(index.get("skipped", {}))
    for extra in args.from_json or []:
        earlier = json.loads(Path(extra).read_text())
        seen = {(r.get("synthetic") or {}).get("name") for r in reports}
        reports += [r for r in earlier.get("synthetic", []) if (r.get("synthetic") or {}).get("name") not in seen]
        real_doc = real_doc or earlier.get("real")
        skipped = {**earlier.get("skipped", {}), **skipped}
    skipped = {k: v for k, v in skipped.items() if k not in {(r.get("synthetic") or {}).get("name") for r in reports}}
    run_settings = index.get("settings") or {"device": s.device, "sweep": GPU_SWEEP, "new_tokens": 32, "rounds": 2,
                                             "warmup": 1}
    how = ("scripts/gpu-bench.sh synthetic (harness-bench --config NAME --device {device} --sweep {sweep} "
           "--new-tokens {new_tokens} --rounds {rounds} --warmup {warmup}, one process per architecture) and "
           "scripts/gpu-bench.sh real".format(**run_settings)
           + (" [DRY RUN on CPU: tiny config, one prompt; not GPU figures]" if s.dry_run else ""))
    combined = combine(reports, real=real_doc, how=how)
    combined["skipped"] = skipped
    written = write(combined, s.out)
    say("wrote " + ", ".join(str(p) for p in written))
    return written
