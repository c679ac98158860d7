"""Runs of pytest in a fresh process that does not pay for importing torch again.

A test's ``project.run(...)`` is a user's ``pytest`` run: its own process, its own plugins, its
own exit code. Started as ``python -m pytest`` it spends most of its time importing torch,
transformers, peft and bitsandbytes (about 9 s of CPU here, more than most runs take to judge
their checks). A forkserver that imported them once hands each run a fork instead: still a
separate process (patches, ``sys.modules``, torch's global state and the harness's caches die
with it), without the import.

The server only imports; it never runs an operator, so a fork starts with a fresh OpenMP pool.
A run whose thread variables differ from the server's, that installs a ``conftest.py`` (it may
need to run before torch is imported), or that the test asks for explicitly, takes a real
subprocess instead (``Project.run(..., subprocess=True)``).
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
from collections.abc import Mapping
from multiprocessing.context import BaseContext
from pathlib import Path

PRELOAD = ["forkwarm"]  # what the runs import, then gc.freeze()
# read by OpenMP/MKL when torch is imported: a fork keeps the server's values, whatever the env says
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")

_context: BaseContext | None = None
# the environment the server starts with: this process's at import, before any test changed it
# (pytester points HOME elsewhere; monkeypatch sets CI or thread variables)
_SERVER_ENV = dict(os.environ)


def can_fork(env: Mapping[str, str]) -> bool:
    """True where a fork of the server behaves as a fresh ``python -m pytest`` with ``env`` would."""
    return all(env.get(name) == _SERVER_ENV.get(name) for name in THREAD_VARIABLES)


def _start() -> BaseContext:
    """This process's forkserver, started at its first run (a session of unit tests never pays)."""
    global _context
    if _context is not None:
        return _context
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    from multiprocessing import forkserver

    # the server inherits os.environ: _SERVER_ENV for the spawn, plus PYTHONPATH to find forkwarm
    # (Python 3.11's server ignores the sys.path it is sent, and swallows a failed preload: the
    # probe below catches that)
    current = dict(os.environ)
    os.environ.clear()
    os.environ.update(_SERVER_ENV)
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, _SERVER_ENV.get("PYTHONPATH")]))
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(current)
    probe = context.Process(target=_preloaded)
    probe.start()
    probe.join()
    if probe.exitcode != 0:
        raise RuntimeError(f"forkrun: the forkserver did not import {PRELOAD} (probe exit {probe.exitcode}); "
                           "import tests/forkwarm.py by hand to see why")
    _context = context
    return context


def _preloaded() -> None:
    """In a fork: exit 0 when the server's preload is there."""
    os._exit(0 if all(name in sys.modules for name in PRELOAD) else 3)


def run(argv: list[str], *, cwd: Path, env: dict[str, str], stdout: Path, stderr: Path) -> int:
    """``python -m pytest *argv`` in ``cwd`` with ``env``; its output goes to the two files."""
    process = _start().Process(target=_child, args=(argv, str(cwd), env, str(stdout), str(stderr)))
    process.start()
    process.join()
    return process.exitcode if process.exitcode is not None else 1


def _child(argv: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """In the fork: become ``python -m pytest`` started in ``cwd``, then exit with its code."""
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    tests_dir = str(Path(__file__).resolve().parent)
    sys.path[:] = [cwd] + [p for p in sys.path if p != tests_dir]  # as `python -m` does, no tests/ of ours
    sys.argv = [sys.executable, *argv]
    code = 1
    try:
        import pytest

        code = int(pytest.main(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        atexit._run_exitfuncs()  # what a normal interpreter exit runs
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
