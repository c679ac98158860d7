"""Constructed regressions judged by the gate itself: items failed per variant, against the committed goldens.

``harness-calibrate --regressions`` scores regressions against the noise it measures; this runs
each one through the real thing a user runs, ``pytest SUITE`` with the gate's default rule (one
pass, and a real decode wherever the pass does not decide), against ``golden/``. Each regression
is a modified copy of the registry's default model or of its registry adapter
(``harness.calibrate.regressions``), loaded under the default model's registry name so its goldens
are the ones compared. A row says how many items failed per variant, and any that errored (an
error is not a verdict: it is listed, never counted as caught).

    python bench/regressions.py                                   # lora_b:1.1,lora_b:0.9 on generation.yaml
    python bench/regressions.py --regressions weights:0.01 --variants fp16,nf4

Measure alone on the machine; the run time grows with what the regression moves (every moved item
is decoded).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OUTCOME = re.compile(r"^(?P<outcome>FAILED|ERROR) (?P<node>\S+?)(\[(?P<variant>[\w-]+)\])?( - |$)")
MODEL_LEVEL = "model"  # an item without a variant (tokenizer, chat template)


def count_outcomes(stdout: str) -> tuple[Counter[str], Counter[str]]:
    """Failed and errored items per variant, from pytest's short summary (``-rfE``)."""
    failed: Counter[str] = Counter()
    errored: Counter[str] = Counter()
    for line in stdout.splitlines():
        match = OUTCOME.match(line)
        if match:
            counts = failed if match.group("outcome") == "FAILED" else errored
            counts[match.group("variant") or MODEL_LEVEL] += 1
    return failed, errored


def _run(suite: str, registry: Path, variants: str) -> tuple[Counter[str], Counter[str], str, float]:
    """Failed and errored items per variant, pytest's last line, and the wall seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfE", suite,
                           "--registry", str(registry), "--golden-dir", str(REPO / "golden"),
                           "--variants", variants], cwd=REPO, text=True, capture_output=True)
    seconds = time.perf_counter() - start
    failed, errored = count_outcomes(done.stdout)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()[-300:]
    return failed, errored, last, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regressions", default="lora_b:1.1,lora_b:0.9",
                        help="KIND:VALUE list (harness-calibrate's --regressions syntax)")
    parser.add_argument("--suite", default="suites/generation.yaml")
    parser.add_argument("--variants", default=None,
                        help="default: fp16-lora,nf4-lora for adapter regressions, all four otherwise")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "docs"))
    from generate import default_model
    from harness.calibrate.regressions import apply, parse
    from harness.models.registry import load_registry
    from harness.models.sources import adapter_folder

    name, model, settings = default_model()
    adapter = adapter_folder(None, load_registry(REPO / "models.yaml").models[name].adapter, REPO)
    rows = []
    with tempfile.TemporaryDirectory(prefix="harness-regressions-") as tmp:
        for regression in parse(args.regressions):
            variants = args.variants or ("fp16-lora,nf4-lora" if regression.kind == "lora_b"
                                         else "fp16,fp16-lora,nf4,nf4-lora")
            work = Path(tmp) / f"{regression.kind}-{regression.value}"
            changed_model, changed_adapter = apply(regression, model=model, adapter=adapter, workdir=work)
            registry = work / "models.yaml"
            entry = {**settings, "path": str(changed_model)}
            if changed_adapter or adapter:
                entry["adapter"] = str(changed_adapter or adapter)
            registry.write_text(json.dumps({"default": name, "models": {name: entry}}))
            failed, errored, last, seconds = _run(args.suite, registry, variants)
            columns = variants.split(",") + [MODEL_LEVEL] * bool(failed[MODEL_LEVEL] or errored[MODEL_LEVEL])
            cells = " / ".join(f"{failed[v]}" + (f" (+{errored[v]} errored)" if errored[v] else "") for v in columns)
            rows.append(f"| {regression.kind}:{regression.value:g} | {variants} | {cells} | {seconds:.0f} s | {last} |")
            print(rows[-1], flush=True)
    print("\n| regression | variants | items failed (in the variants' order) | wall | pytest |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
