"""The repository's suites pass against the committed goldens, and write nothing.

The main job (README's first command, which CI runs next to these tests) judges every variant; this
test runs fp16, the quickest, and checks what the main job's exit code does not
show: nothing under golden/ is touched, each variant loads once, and the report reads green.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _goldens() -> dict[str, str]:
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((REPO / "golden").rglob("*")) if p.is_file()}


def test_pytest_suites_passes_on_the_committed_goldens(tmp_path):
    before = _goldens()
    report = tmp_path / "report.md"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "suites/", "-p", "no:cacheprovider", "-q", "--variants", "fp16",
         "--harness-report", str(report)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "goldens that no check used" not in proc.stdout
    assert "loaded fp16: 1x" in proc.stdout
    assert _goldens() == before
    # checks of other variants only (nf4, the adapter's) are outside this run: said out loud (outside
    # CI a warning, in CI the gate fails on them; the main job judges them)
    assert "check(s) NOT JUDGED" in proc.stdout and "nf4-save-reload: its variants (nf4)" in proc.stdout
    text = report.read_text()
    assert "**result: green**" in text and "| generation::chicken-joke |  | pass |" in text
    assert "## Budgets and drift" in text
