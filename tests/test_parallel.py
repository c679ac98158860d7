"""pytest-xdist: each worker loads a variant at most once; parallel updates write what a serial one does."""

from __future__ import annotations

import hashlib
import json
import re


def _contents(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.json")) if not p.name.endswith(".meta.json")}


def test_parallel_update_writes_what_a_serial_update_writes_and_loads_once_per_worker(project, tmp_path):
    project.gen_suite(joke=6, capital=4)
    serial = project.run("--variants", "fp16,fp16-lora", "--snapshot-update",
                         "--golden-dir", str(tmp_path / "serial"))
    serial.assert_outcomes(passed=4)
    parallel = project.run("--variants", "fp16,fp16-lora", "--snapshot-update", "-n", "2",
                           "--dist", "loadgroup", "--golden-dir", str(tmp_path / "parallel"))
    parallel.assert_outcomes(passed=4)
    assert _contents(tmp_path / "parallel") == _contents(tmp_path / "serial")
    assert len(_contents(tmp_path / "serial")) == 4
    loads = re.findall(r"^(gw\d): loaded (\S+): (\d+)x", parallel.stdout.str(), re.MULTILINE)
    assert sorted(key for _, key, _ in loads) == ["fp16", "fp16-lora"]
    assert all(count == "1" for _, _, count in loads)
    parallel.stdout.fnmatch_lines(["goldens written or updated: 4"])
    rerun = project.run("--variants", "fp16,fp16-lora", "-n", "2", "--dist", "loadgroup",
                        "--golden-dir", str(tmp_path / "parallel"))
    rerun.assert_outcomes(passed=4)
    meta = json.loads(next((tmp_path / "parallel").rglob("*.meta.json")).read_text())
    assert meta["device"] == "cpu"


THREADS_TEST = """
import os

import torch


def test_threads():
    assert torch.get_num_threads() == {expected}, os.environ.get("OMP_NUM_THREADS")
    assert os.environ.get("OMP_NUM_THREADS") == "{expected}"
"""


def test_each_worker_takes_its_share_of_the_cores_before_torch_starts(project, monkeypatch):
    """Two workers on C cores run C // 2 threads each (at least one), set before a conftest imports torch."""
    from harness.run.threads import share, usable_cores

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    expected = share(2, usable_cores())
    (project.path / "conftest.py").write_text("import torch  # imported as early as a user's conftest can\n")
    for name in ("test_a.py", "test_b.py"):
        (project.path / name).write_text(THREADS_TEST.format(expected=expected))
    result = project.run("test_a.py", "test_b.py", "-n", "2")
    result.assert_outcomes(passed=2)
    lines = re.findall(r"^(gw\d): torch threads (\d+) \((.*)\)$", result.stdout.str(), re.MULTILINE)
    assert sorted(worker for worker, _, _ in lines) == ["gw0", "gw1"]
    assert {int(threads) for _, threads, _ in lines} == {expected}
    assert {why for _, _, why in lines} == {f"share of {usable_cores()} usable core(s) over 2 worker(s)"}


def test_a_users_omp_num_threads_wins_and_a_serial_run_keeps_torchs_default(project, monkeypatch):
    """One worker's share would be every core; the user's OMP_NUM_THREADS=1 is kept instead."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    (project.path / "test_a.py").write_text(THREADS_TEST.format(expected=1))
    result = project.run("test_a.py", "-n", "1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["gw0: torch threads 1 (OMP_NUM_THREADS=1 set by the user)"])

    monkeypatch.delenv("OMP_NUM_THREADS")
    (project.path / "test_a.py").write_text(
        "import os\n\ndef test_serial():\n    assert 'OMP_NUM_THREADS' not in os.environ\n")
    serial = project.run("test_a.py")
    serial.assert_outcomes(passed=1)
    assert "torch threads" not in serial.stdout.str()


def test_thread_shares():
    from harness.run.threads import ThreadShare, share, worker_share

    assert [share(w, 4) for w in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert worker_share({}, cores=4) is None  # serial
    assert worker_share({"PYTEST_XDIST_WORKER_COUNT": "2"}, cores=16) == ThreadShare(8, 2, 16)
    assert worker_share({"PYTEST_XDIST_WORKER_COUNT": "2", "OMP_NUM_THREADS": "5"}, cores=16) == \
        ThreadShare(5, 2, 16, user_set=True)
    # an unusable OMP_NUM_THREADS is not the user's choice: the share applies
    assert worker_share({"PYTEST_XDIST_WORKER_COUNT": "4", "OMP_NUM_THREADS": ""}, cores=2).threads == 1


def test_apply_keeps_what_the_user_set():
    import torch

    from harness.run.threads import ThreadShare, apply

    threads = torch.get_num_threads()  # apply() sets this process's torch threads: the worker's share is restored
    try:
        env = {"MKL_NUM_THREADS": "7"}
        apply(ThreadShare(2, 2, 4), env)
        assert env == {"MKL_NUM_THREADS": "7", "OMP_NUM_THREADS": "2"}
        assert torch.get_num_threads() == 2
        env = {"OMP_NUM_THREADS": "3"}
        apply(ThreadShare(3, 2, 4, user_set=True), env)
        assert env == {"OMP_NUM_THREADS": "3"}
    finally:
        torch.set_num_threads(threads)
