"""Files the harness and its tools write that are not goldens: kept out of the golden folder, strict JSON.

Every writer (``--harness-report``, ``--harness-obtained``, ``--junitxml``, pytest-benchmark's
outputs, ``--basetemp``, the ``--out`` of ``harness-diff``, ``harness-calibrate`` and
``harness-bench``) is checked against the golden folder before anything runs: a report
written over a golden turns the next run's comparison into "not valid JSON", and a file
copied in by a tool looks like a golden to the next run. A bottom module: it imports
nothing of the harness.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is ``root`` or below it, symlinks followed (for paths that do not exist yet too)."""
    real_root, real = root.resolve(), path.resolve()
    return real == real_root or real_root in real.parents


def output_in_golden_problem(flag: str, value: str | Path, golden_dir: Path, *, erases: bool = False) -> str | None:
    """Why ``flag value`` may not be used with this golden folder, or None.

    ``erases``: the option's folder is emptied before use (pytest's ``--basetemp``), so a
    folder that *contains* the golden folder is refused as well.
    """
    path = Path(value).expanduser()
    if inside(path, golden_dir):
        where = "is the golden folder" if path.resolve() == golden_dir.resolve() else \
            f"is inside the golden folder {golden_dir}"
        return (f"{flag} {value} {where}: it would write over goldens (or add files the next run reads as "
                "goldens), and a golden overwritten by a report fails the next run as 'not valid JSON'. "
                "Nothing was run. Fix: write it outside the golden folder, e.g. next to it.")
    if erases and inside(golden_dir, path):
        return (f"{flag} {value} contains the golden folder {golden_dir}, and pytest empties {flag} before use: "
                "every golden would be deleted. Nothing was run. Fix: give a folder outside the golden folder.")
    return None


def finite_or_none(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None: what was not measured is null, not ``NaN``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_or_none(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_none(value) for value in data]
    return data


def strict_json(data: Any, **kwargs: Any) -> str:
    """JSON that every parser reads: non-finite numbers become null (``json`` would write a bare NaN)."""
    return json.dumps(finite_or_none(data), allow_nan=False, **kwargs)


class LazyBinaryFile:
    """A file opened for writing only when first written, standing in for ``argparse.FileType('wb')``.

    pytest-benchmark's ``--benchmark-json`` opens (and truncates) its file while pytest parses
    the command line, before any plugin can check where it points; this stand-in lets the
    harness refuse a path inside the golden folder before a byte of it is lost.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._handle: Any = None

    def _open(self) -> Any:
        if self._handle is None:
            self._handle = open(self.name, "wb")  # noqa: SIM115 - closed by close() / __exit__
        return self._handle

    def write(self, data: bytes) -> int:
        return int(self._open().write(data))

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()

    def __enter__(self) -> Any:
        return self._open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<file {self.name!r}, opened on first write>"


class LazyBenchmarkJson:
    """A pytest plugin object: pytest-benchmark's ``--benchmark-json`` opens its file with
    ``LazyBinaryFile`` instead of truncating it while the command line is parsed."""

    def __init__(self, parser: Any) -> None:
        self.parser = parser

    def pytest_plugin_registered(self) -> None:  # historic: also called for plugins registered earlier
        optparser = getattr(self.parser, "optparser", None)
        action = getattr(optparser, "_option_string_actions", {}).get("--benchmark-json")
        if action is not None and action.type is not LazyBinaryFile:
            action.type = LazyBinaryFile


def output_options(option: Any) -> list[tuple[str, str, bool]]:
    """Every path a pytest session may write that is not a golden: (flag, path, whether pytest empties it).

    ``option`` is ``config.option``; options of plugins that are not installed read as absent.
    ``--harness-obtained`` has its own, stricter rule (``harness.golden.overlap_problem``: it may
    not contain the golden folder either).
    """
    def get(dest: str) -> Any:
        return getattr(option, dest, None)

    found: list[tuple[str, str, bool]] = []
    for flag, dest in (("--harness-report", "harness_report"), ("--junitxml", "xmlpath"),
                       ("--report-log", "report_log")):
        if get(dest):
            found.append((flag, str(get(dest)), False))
    json_file = get("benchmark_json")
    if json_file is not None:
        found.append(("--benchmark-json", str(getattr(json_file, "name", json_file)), False))
    for flag, dest in (("--benchmark-histogram", "benchmark_histogram"), ("--benchmark-csv", "benchmark_csv"),
                       ("--benchmark-cprofile-dump", "benchmark_cprofile_dump")):
        found += [(flag, str(prefix), False) for prefix in get(dest) or () if prefix]
    storage = get("benchmark_storage")
    if (get("benchmark_save") or get("benchmark_autosave")) and isinstance(storage, str) \
            and "://" not in storage.removeprefix("file://"):
        found.append(("--benchmark-storage", storage.removeprefix("file://"), False))
    if get("basetemp"):
        found.append(("--basetemp", str(get("basetemp")), True))
    return found
