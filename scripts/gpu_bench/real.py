"""Step (b): the embedded model's goldens recorded on CUDA and the measured cross-device factor.

Three children share the card at once (a 135M model each; no timing is taken in this step):
recording ``golden/<model>/<cuda-class>/`` for the variants (``--snapshot-update``), judging the
CPU goldens on CUDA (``--golden-device cpu``, today's cross-device tolerance), and
``harness-calibrate --device cuda`` scoring the CPU goldens against the card's own noise. Once the
new goldens exist, the reverse (them scored on the host's CPU) overlaps the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_bench.common import MODEL, REPO, SUITE, Settings, archive, child_env, out_log, pytest_cmd, say, sha256, use_site

# same-device noise is measured on paths as long as the goldens' (generation.yaml: up to 40 tokens),
# since noise grows along a path and the cross-device figures use the goldens' whole paths
GOLDEN_TOKENS = 64
# the dry run's real-model step: the adapter variant (16-bit: NF4 on CPU is slow, and the synthetic step
# and the harness's own tests load NF4), one kernel swap
DRY_VARIANTS = "fp16-lora"
DRY_CONDITIONS = "kernels"


def dry_suite(s: Settings) -> Path:
    """One greedy check of the real suite (same suite name, so the repository's CPU golden applies)."""
    import yaml

    data = yaml.safe_load((REPO / SUITE).read_text(encoding="utf-8"))
    data["checks"] = [c for c in data["checks"] if c["id"] == "capital-raw"]
    path = s.work / "suites" / Path(SUITE).name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def stage_goldens(source: Path, klass: str, dest: Path, *, own_class: str) -> str:
    """A golden folder holding only ``klass`` (and the tokenizer goldens), so that a run on a device
    of another class judges against it; named ``<klass>-recorded`` where that is this device's own class."""
    alias = klass if klass != own_class else f"{klass}-recorded"
    if dest.exists():
        shutil.rmtree(dest)
    model = dest / MODEL
    model.mkdir(parents=True)
    shutil.copytree(source / MODEL / klass, model / alias)
    if (source / MODEL / "tokenizer").is_dir():
        shutil.copytree(source / MODEL / "tokenizer", model / "tokenizer")
    return alias


def device_class(s: Settings, device: str) -> str:
    from harness.models.devices import pick_device

    return pick_device(device).klass


def junit_counts(path: Path) -> dict[str, Any]:
    import xml.etree.ElementTree as ET

    if not path.is_file():
        return {"error": f"no {path.name}"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} if suite is not None else {}
    counts["failed"] = sorted(tc.get("name", "") for tc in root.iter("testcase")
                              if tc.find("failure") is not None or tc.find("error") is not None)
    return counts


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {}


class Jobs:
    """Children that run at once: the three device steps share the card (a 135M model each; no timing
    is taken in this step) and the CPU reverse overlaps them. Each writes its own log, shown when done."""

    def __init__(self, s: Settings, folder: Path) -> None:
        self.s, self.folder = s, folder
        self.running: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.codes: dict[str, int] = {}

    def start(self, name: str, cmd: Sequence[str], **env: str) -> None:
        log = self.folder / f"{name}.log"
        say(f"$ [{name}] " + " ".join(cmd))
        with log.open("wb") as fh:
            proc = subprocess.Popen(list(cmd), cwd=REPO, env=child_env(self.s, **env), stdout=fh,
                                    stderr=subprocess.STDOUT)
        self.running[name] = (proc, log)

    def wait(self, name: str) -> int:
        if name in self.codes:
            return self.codes[name]
        proc, log = self.running.pop(name)
        code = self.codes[name] = proc.wait()
        text = log.read_text(errors="replace")
        with out_log(self.s).open("a", encoding="utf-8") as fh:
            fh.write(f"==== [{name}] exit {code}\n{text}\n")
        tail = "\n".join(text.splitlines()[-12:])
        say(f"[{name}] exited with {code}; last lines:\n{tail}")
        return code


def real(s: Settings, args: argparse.Namespace) -> None:
    use_site(s)
    suite = dry_suite(s) if s.dry_run else REPO / SUITE
    work = s.work / "real"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    here = device_class(s, s.device)
    record_root = s.work / "golden" if s.dry_run else REPO / "golden"
    reverse = "cpu"
    before = tree_digest(REPO / "golden")
    variants = args.variants or (DRY_VARIANTS if s.dry_run else "fp16,fp16-lora,nf4,nf4-lora")
    conditions = args.conditions or (DRY_CONDITIONS if s.dry_run else "kernels,repeat")
    lengths = ["--max-prompts", "1"] if s.dry_run else ["--max-new-tokens", str(GOLDEN_TOKENS)]
    cpu_goldens = stage_goldens(REPO / "golden", "cpu", work / "golden-cpu", own_class=here)
    jobs = Jobs(s, work)

    def calibrate(device: str, goldens: Path, klass: str, out: str) -> list[str]:
        return [sys.executable, "-m", "harness.calibrate.run", str(suite), "--device", device, "--variants", variants,
                "--conditions", conditions, "--golden-dir", str(goldens), "--golden-device", klass,
                "--out", str(work / out), *lengths]

    # this class's goldens, all variants; the CPU goldens judged here (today's cross-device
    # tolerance); calibration here with the CPU goldens scored here: the measured factor
    jobs.start("record", pytest_cmd() + [str(suite), "--device", s.device, "--variants", variants, "--golden-dir",
                                          str(record_root), "--snapshot-update", "--allow-update-in-ci",
                                          "--junitxml", str(work / "record.xml"), "-q"])
    jobs.start("judged", pytest_cmd() + [str(suite), "--device", s.device, "--variants", variants, "--golden-dir",
                                          str(work / "golden-cpu"), "--golden-device", cpu_goldens,
                                          "--harness-report", str(work / "judged-report.md"),
                                          "--junitxml", str(work / "judged.xml"), "-q"])
    jobs.start("calibrate-device", calibrate(s.device, work / "golden-cpu", cpu_goldens, "calibrate-device"))
    record = jobs.wait("record")
    recorded = record_root / MODEL / here
    if recorded.is_dir():  # the reverse: this class's new goldens scored on the CPU
        alias = stage_goldens(record_root, here, work / "golden-device", own_class=reverse)
        threads = str(max(1, (os.cpu_count() or 2) // 2)) if not s.dry_run else os.environ.get("OMP_NUM_THREADS", "1")
        jobs.start("calibrate-reverse", calibrate(reverse, work / "golden-device", alias, "calibrate-reverse"),
                   OMP_NUM_THREADS=threads)
    judged = jobs.wait("judged")
    device_code = jobs.wait("calibrate-device")
    reverse_code = jobs.wait("calibrate-reverse") if recorded.is_dir() else None
    steps = [
        {"name": f"record golden/{MODEL}/{here}/ (--snapshot-update --device {s.device})",
         "outcome": "ok" if record == 0 else f"exit {record}", "detail": _counts(junit_counts(work / "record.xml"))},
        {"name": f"cpu goldens judged on {here} (--golden-device cpu)",
         "outcome": "all passed" if judged == 0 else f"exit {judged}",
         "detail": _counts(junit_counts(work / "judged.xml"))},
        {"name": f"harness-calibrate --device {s.device} --conditions {conditions} --golden-device cpu",
         "outcome": "ok" if device_code == 0 else f"exit {device_code}"},
        {"name": f"harness-calibrate --device {reverse} --conditions {conditions} --golden-device {here} (the reverse)",
         "outcome": "not run: nothing recorded" if reverse_code is None else "ok" if reverse_code == 0
         else f"exit {reverse_code}"},
    ]
    changed = sorted(k for k, v in tree_digest(REPO / "golden").items() if before.get(k) != v
                     and not k.startswith(f"{MODEL}/{here}/"))
    if changed:
        steps.append({"name": "WARNING: goldens outside the new class changed on the device (not kept)",
                      "outcome": ", ".join(changed[:10])})
    directions = []
    for klass, device, folder in (("cpu", here, work / "calibrate-device"), (here, reverse, work / "calibrate-reverse")):
        result = folder / "calibration.json"
        if result.is_file():
            data = json.loads(result.read_text())
            directions.append({"golden_class": klass, "device": f"{device} ({data['device']})",
                               "conditions": conditions, "variants": data["variants"]})
    real_doc = {"model": MODEL, "device_class": here, "steps": steps, "cross_device": directions}
    (s.work / "real.json").write_text(json.dumps(real_doc, indent=2, sort_keys=True) + "\n")
    if recorded.is_dir():
        archive(s.out / f"golden-{here}.tar.gz", record_root, (f"{MODEL}/{here}/**/*.json",))
    archive(s.out / "calibration.tar.gz", work, ("calibrate-*/*", "*.log", "judged-report.md", "*.xml"))
    for step in steps:
        say(f"{step['name']}: {step['outcome']}" + (f" ({step['detail']})" if step.get("detail") else ""))
    print_factors(directions)


def _counts(counts: dict[str, Any]) -> str:
    if "error" in counts:
        return counts["error"]
    text = (f"{counts.get('tests', 0)} items, {counts.get('failures', 0)} failed, {counts.get('errors', 0)} errors, "
            f"{counts.get('skipped', 0)} skipped")
    return text + (f"; failed: {', '.join(counts['failed'][:8])}" if counts.get("failed") else "")


def print_factors(directions: list[dict[str, Any]]) -> None:
    from harness.calibrate.crossdevice import summary_lines

    print("=" * 100)
    for d in directions:
        print("\n".join(summary_lines(MODEL, d["device"], d["golden_class"], d["variants"])))
    if not directions:
        print("MEASURED CROSS-DEVICE FACTOR: nothing measured (see the log)")
    print("=" * 100, flush=True)
