"""The committed goldens hold under what differs between users' machines, tried on this one.

A gate whose verdict moves with the runner's CPU is no gate. What a machine can change and this
test can reach on any CPU: the attention kernel, the thread count, torch's vector kernels
(``ATEN_CPU_CAPABILITY=default``: no AVX2 / AVX-512 paths), and bitsandbytes' CPU-packed 4-bit
layout that CPUs with AVX512-BF16 run (``harness.run.cpu_packed``; a torch reference kernel stands in
for the fused one where the CPU lacks it). Each runs the greedy suite against the committed goldens
as a plain ``pytest`` would; every item must pass and nothing under golden/ may change.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The two slow conditions (no vector kernels: ~3x slower; NF4) judge a chat, a raw and a near-tie-prone item;
# the main job judges every item on the machine's own path.
SOME = ["-k", "system-and-user or capital-raw or chicken-joke"]
CONDITIONS = {
    "eager-attention": (["--attn-implementation", "eager", "--variants", "fp16"], {}),
    "one-thread": (["--variants", "fp16"], {"OMP_NUM_THREADS": "1"}),
    "no-vector-kernels": (["--variants", "fp16", *SOME], {"ATEN_CPU_CAPABILITY": "default"}),
    "cpu-packed-4bit": (["--variants", "nf4", "-p", "harness.run.cpu_packed", *SOME], {"HARNESS_4BIT_LAYOUT": "cpu-packed"}),
}


def _goldens() -> dict[str, str]:
    return {str(p.relative_to(REPO)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((REPO / "golden").rglob("*")) if p.is_file()}


@pytest.mark.parametrize("condition", list(CONDITIONS))
def test_the_greedy_goldens_hold_under(condition: str):
    args, env = CONDITIONS[condition]
    before = _goldens()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "suites/generation.yaml", "-p", "no:cacheprovider", "-q", *args],
        cwd=REPO, capture_output=True, text=True, check=False, env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout.splitlines()[-1]
    if condition == "cpu-packed-4bit":
        assert "4-bit weights repacked into the CPU-packed layout" in proc.stdout
    if condition == "no-vector-kernels":  # the summary says where the run ran
        assert "ATEN_CPU_CAPABILITY=default" in proc.stdout
    assert _goldens() == before
