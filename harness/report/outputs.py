"""Files the harness and its tools write that are not goldens: kept out of the golden folder, strict JSON.

One rule (``output_in_golden_problem``) for every path the harness, pytest and its tools
write: the pytest options listed by ``output_options`` (``--harness-report``,
``--harness-result``, ``--offload-folder``, ``--junitxml``, ``--log-file``, pytest-benchmark's
outputs, ``--basetemp``, ...), ``harness-report merge --report`` and ``--junitxml``, and the
``--out`` and ``--work-dir`` of ``harness-diff``, ``harness-calibrate`` and ``harness-bench``. Each
is checked before anything runs: a report written over a golden turns the next run's comparison
into "not valid JSON", and a file copied in by a tool looks like a golden to the next run.
(``--harness-obtained`` has a stricter rule of its own: ``harness.golden.overlap_problem``.) A
bottom module: it imports nothing of the harness.
"""

from __future__ import annotations

import json
import math
import os
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

    pytest-benchmark before 5.3 types ``--benchmark-json`` as ``argparse.FileType('wb')``: the
    file is opened (and truncated) while pytest parses the command line, before any plugin can
    check where it points; this stand-in lets the harness refuse a path inside the golden folder
    before a byte of it is lost. It is also a path (``os.PathLike``), so code that calls
    ``open()`` on the option's value, as pytest-benchmark 5.3 does, works with it too.
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

    def __fspath__(self) -> str:
        return self.name

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<file {self.name!r}, opened on first write>"


class LazyBenchmarkJson:
    """A pytest plugin object: where pytest-benchmark's ``--benchmark-json`` opens its file while the
    command line is parsed (``argparse.FileType``, before 5.3), it gets a ``LazyBinaryFile`` instead.

    From 5.3 on the option is a plain path that pytest-benchmark opens itself when it writes,
    after the harness has checked it: that type is left alone (a stand-in for a file object
    there breaks ``open(path, 'wb')``).
    """

    def __init__(self, parser: Any) -> None:
        self.parser = parser

    def pytest_plugin_registered(self) -> None:  # historic: also called for plugins registered earlier
        optparser = getattr(self.parser, "optparser", None)
        action = getattr(optparser, "_option_string_actions", {}).get("--benchmark-json")
        if action is not None and opens_at_parse(action.type):
            action.type = LazyBinaryFile


def opens_at_parse(option_type: Any) -> bool:
    """Whether an option's argparse ``type`` opens the file while the command line is parsed."""
    import argparse

    return isinstance(option_type, argparse.FileType)


# pytest options that name one file or folder a session writes: flag -> dest in ``config.option``
PYTEST_OUTPUTS = {
    "--harness-report": "harness_report", "--harness-result": "harness_result",
    "--offload-folder": "offload_folder", "--junitxml": "xmlpath", "--report-log": "report_log",
    "--log-file": "log_file", "--benchmark-json": "benchmark_json",
}
# options that name file prefixes (each use writes PREFIX-*.ext), and the folder pytest empties before use
PYTEST_PREFIX_OUTPUTS = {"--benchmark-histogram": "benchmark_histogram", "--benchmark-csv": "benchmark_csv",
                         "--benchmark-cprofile-dump": "benchmark_cprofile_dump"}
PYTEST_ERASED_OUTPUTS = {"--basetemp": "basetemp"}


def _path_of(value: Any) -> str:
    """The path an option's value names: a path, a string, or a file object (pytest-benchmark < 5.3)."""
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    return str(getattr(value, "name", value))  # a file object's name is its path (a Path's is its last part)


def output_options(option: Any) -> list[tuple[str, str, bool]]:
    """Every path a pytest session may write that is not a golden: (flag, path, whether pytest empties it).

    ``option`` is ``config.option``; options of plugins that are not installed read as absent.
    ``--harness-obtained`` has its own, stricter rule (``harness.golden.overlap_problem``: it may
    not contain the golden folder either). ``--harness-result`` may name a folder: the file it gets
    lies inside it, so the folder is what is checked.
    """
    def get(dest: str) -> Any:
        return getattr(option, dest, None)

    found: list[tuple[str, str, bool]] = []
    for flag, dest in PYTEST_OUTPUTS.items():
        value = get(dest)
        if value:
            found.append((flag, _path_of(value), False))
    for flag, dest in PYTEST_PREFIX_OUTPUTS.items():
        value = get(dest)
        found += [(flag, str(prefix), False) for prefix in (value if isinstance(value, (list, tuple)) else
                                                            [value] if isinstance(value, str) else ()) if prefix]
    storage = get("benchmark_storage")
    if (get("benchmark_save") or get("benchmark_autosave")) and isinstance(storage, str) \
            and "://" not in storage.removeprefix("file://"):
        found.append(("--benchmark-storage", storage.removeprefix("file://"), False))
    for flag, dest in PYTEST_ERASED_OUTPUTS.items():
        if get(dest):
            found.append((flag, str(get(dest)), True))
    return found
