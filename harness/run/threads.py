"""CPU threads per pytest-xdist worker: each worker gets its share of the cores, not all of them.

torch starts as many OpenMP threads as there are cores in every process. Two xdist workers on
two cores then run four threads, and OpenMP barriers stall whenever one of them is descheduled,
which makes ``-n 2`` slower than one process. A worker therefore sets ``OMP_NUM_THREADS`` and
``MKL_NUM_THREADS`` to its share before torch is imported (an xdist worker is a fresh process,
and the plugin's earliest hook runs before any conftest), and ``torch.set_num_threads`` where
torch was imported even earlier. A user's own ``OMP_NUM_THREADS`` wins; a serial run keeps
torch's default.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
USER_VARIABLE = "OMP_NUM_THREADS"
WORKER_COUNT_VARIABLE = "PYTEST_XDIST_WORKER_COUNT"  # set by pytest-xdist in each worker, before pytest starts


@dataclass(frozen=True)
class ThreadShare:
    """The threads one worker runs, and where the number came from."""

    threads: int
    workers: int
    cores: int
    user_set: bool = False  # the user's OMP_NUM_THREADS, kept as it is

    def describe(self) -> str:
        if self.user_set:
            return f"{USER_VARIABLE}={self.threads} set by the user"
        return f"share of {self.cores} usable core(s) over {self.workers} worker(s)"

    def as_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "workers": self.workers, "cores": self.cores, "user_set": self.user_set}


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota(path: Path) -> int | None:
    """``cpu.max`` reads ``QUOTA PERIOD`` (or ``max PERIOD``): a container limited to 1.5 CPUs gets 1."""
    try:
        quota, period = path.read_text(encoding="ascii").split()[:2]
        return max(1, int(quota) // int(period)) if quota != "max" else None
    except (OSError, ValueError):
        return None


def share(workers: int, cores: int) -> int:
    """Each of ``workers`` gets an equal whole share of ``cores``, at least one thread."""
    return max(1, cores // max(1, workers))


def worker_share(environ: MutableMapping[str, str] | None = None, *, cores: int | None = None) -> ThreadShare | None:
    """This process's share when it is an xdist worker; None in a serial run (torch's default stays)."""
    environ = os.environ if environ is None else environ
    try:
        workers = int(environ.get(WORKER_COUNT_VARIABLE, ""))
    except ValueError:
        return None
    cores = usable_cores() if cores is None else cores
    user = _positive_int(environ.get(USER_VARIABLE))
    if user is not None:
        return ThreadShare(threads=user, workers=workers, cores=cores, user_set=True)
    return ThreadShare(threads=share(workers, cores), workers=workers, cores=cores)


def _positive_int(text: str | None) -> int | None:
    try:
        value = int(str(text).strip())
    except ValueError:
        return None
    return value if value > 0 else None


def apply(thread_share: ThreadShare, environ: MutableMapping[str, str] | None = None) -> None:
    """Set the variables for a torch not yet imported, and torch's own count if it already is.

    Variables the user set are left alone (``MKL_NUM_THREADS`` too); with the user's
    ``OMP_NUM_THREADS`` nothing is changed at all.
    """
    if thread_share.user_set:
        return
    environ = os.environ if environ is None else environ
    for name in THREAD_VARIABLES:
        environ.setdefault(name, str(thread_share.threads))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(thread_share.threads)


def torch_threads() -> int | None:
    """The intra-op threads torch runs with in this process; None when torch was never imported."""
    torch = sys.modules.get("torch")
    if torch is None or not hasattr(torch, "get_num_threads"):
        return None
    return int(torch.get_num_threads())


def summary_line(worker: str, info: dict[str, Any]) -> str:
    """The terminal summary's line for one worker: what torch ran with, and why that number."""
    planned = ThreadShare(**info["share"])
    used = info.get("torch")
    if used is None:
        return f"{worker}: threads {planned.threads} ({planned.describe()}; torch not loaded in this worker)"
    # torch caps a user's OMP_NUM_THREADS (at the cores, or at MKL_NUM_THREADS): only a share is promised
    mismatch = "" if used == planned.threads or planned.user_set else f"; expected {planned.threads}"
    return f"{worker}: torch threads {used} ({planned.describe()}{mismatch})"
