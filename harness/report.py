"""End-of-session summary: what was loaded, what it cost, what goldens were written."""

from __future__ import annotations

from typing import Any

import pytest

from harness.session import HarnessSession


def terminal_summary(reporter: Any, state: HarnessSession, config: pytest.Config) -> None:
    pool = state._pool
    goldens = state._goldens
    if pool is None and goldens is None:
        return
    reporter.section("harness")
    if state._resolved is not None:
        reporter.write_line(f"model {state.model_name}: {state._resolved.source}; device {state.device.description}")
    if pool is not None:
        for note in pool.notes:
            reporter.write_line(f"note: {note}")
        for key, count in pool.load_counts.items():
            reporter.write_line(
                f"loaded {key}: {count}x, {pool.load_seconds[key]:.1f} s, "
                f"weights {pool.weights_bytes[key] / 2**20:.1f} MiB"
            )
    if goldens is not None:
        for label, paths in (("written", goldens.written), ("updated", goldens.updated)):
            if paths:
                reporter.write_line(f"goldens {label}: {len(paths)}")
                for path in paths:
                    reporter.write_line(f"  {path}")
