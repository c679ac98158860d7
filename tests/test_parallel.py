"""pytest-xdist: each worker loads a variant at most once; parallel updates write what a serial one does."""

from __future__ import annotations

import hashlib
import json
import re

LIST_CHECK = """
  - id: list
    kind: greedy
    prompt: "Three primary colours are red,"
    max_new_tokens: 4
"""


def _contents(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.json")) if not p.name.endswith(".meta.json")}


def test_parallel_update_writes_what_a_serial_update_writes_and_loads_once_per_worker(project, tmp_path):
    project.gen_suite(joke=6, capital=4, extra=LIST_CHECK)
    serial = project.run("--variants", "fp16,fp16-lora,nf4", "--snapshot-update",
                         "--golden-dir", str(tmp_path / "serial"))
    serial.assert_outcomes(passed=9)
    parallel = project.run("--variants", "fp16,fp16-lora,nf4", "--snapshot-update", "-n", "2",
                           "--dist", "loadgroup", "--golden-dir", str(tmp_path / "parallel"))
    parallel.assert_outcomes(passed=9)
    assert _contents(tmp_path / "parallel") == _contents(tmp_path / "serial")
    assert len(_contents(tmp_path / "serial")) == 9
    loads = re.findall(r"^(gw\d): loaded (\S+): (\d+)x", parallel.stdout.str(), re.MULTILINE)
    assert sorted(key for _, key, _ in loads) == ["fp16", "fp16-lora", "nf4"]
    assert all(count == "1" for _, _, count in loads)
    parallel.stdout.fnmatch_lines(["goldens written or updated: 9"])
    rerun = project.run("--variants", "fp16,fp16-lora,nf4", "-n", "2", "--dist", "loadgroup",
                        "--golden-dir", str(tmp_path / "parallel"))
    rerun.assert_outcomes(passed=9)
    meta = json.loads(next((tmp_path / "parallel").rglob("*.meta.json")).read_text())
    assert meta["device"] == "cpu"
