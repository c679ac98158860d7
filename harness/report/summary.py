"""What the session did, for people at the terminal: the ``harness`` section and the loud sections after it.

Read from the session's record (``record.py``); the ``--harness-report`` Markdown is ``markdown.py``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.models.variants import RUN_ORDER
from harness.report.display import shown_path
from harness.report.markdown import ONE_PASS_LABEL
from harness.report.record import SessionRecord, forgiveness_counts, goldens_recorded, pool_loads
from harness.models.machine import expand_groups, summary_lines
from harness.run.session import HarnessSession
from harness.run.threads import summary_line



def terminal_summary(reporter: Any, state: HarnessSession, record: SessionRecord) -> None:
    pool = state._pool
    if pool is None and not record.outcomes and not record.worker_loads and not record.worker_threads:
        return
    reporter.section("harness")
    if state.options.reference is not None:
        reporter.write_line(f"reference mode: NEW {state.model_name} vs OLD {state.reference_name} (every check "
                            "judged against a live run of OLD in this session; golden files neither read nor written)")
    if state.options.one_pass_goldens:
        reporter.write_line(ONE_PASS_LABEL)
    side = "NEW " if state.options.reference is not None else ""
    if state._resolved is not None:
        reporter.write_line(f"{side}model {state.model_name}: {state._resolved.source}; device {state.device.description}")
    if state._reference_resolved is not None:
        reporter.write_line(f"OLD model {state.reference_name}: {state._reference_resolved.source}")
    for line in machine_lines(state, record):
        reporter.write_line(line)
    for prefix, side_pool in ((side, pool), ("OLD ", state._reference_pool)):
        if side_pool is None:
            continue
        for note in side_pool.notes:
            reporter.write_line(f"{prefix}note: {note}")
        for line in load_lines(pool_loads(side_pool)):
            reporter.write_line(prefix + line)
    for worker, loads in sorted(record.worker_loads.items()):
        for line in load_lines(loads):
            reporter.write_line(f"{worker}: {line}")
    for worker, threads in sorted(record.worker_threads.items()):
        reporter.write_line(summary_line(worker, threads))
    for note in record.notes:
        reporter.write_line(note)
    forgiven_section(reporter, record)
    if record.goldens_written:
        reporter.write_line(f"goldens written or updated: {len(record.goldens_written)}")
        for path in sorted(record.goldens_written):
            reporter.write_line(f"  {shown_path(path, state.options.rootdir)}")


def machine_lines(state: HarnessSession, record: SessionRecord) -> list[str]:
    """Where the run ran (numerics, libraries) and how the compared goldens' sidecars differ from it."""
    if not record.outcomes:
        return []
    try:
        current = state.provenance()
    except Exception as exc:  # noqa: BLE001 - the summary must still be written
        return [f"numerics: unavailable ({type(exc).__name__}: {exc})"]
    return summary_lines(current, expand_groups(goldens_recorded(state, record)))


def forgiven_section(reporter: Any, record: SessionRecord) -> None:
    """What passing checks forgave, counted: every accepted near-tie and widened tolerance, one line each."""
    if not record.forgiven and not record.flips.groups:
        return
    reporter.write_line(f"forgiven: {forgiveness_counts(record)}")
    for line in record.forgiven:
        reporter.write_line(f"  {line}")
    for line in record.flips.standing():
        reporter.write_line(f"  budget {line}")


def budget_section(reporter: Any, record: SessionRecord) -> None:
    """Groups of goldens whose accepted near-ties together exceed what their recorded noise explains."""
    lines = record.flips.exceeded()
    if not lines:
        return
    reporter.write_sep("=", f"harness: near-tie budget exceeded in {len(lines)} group(s) - this run fails",
                       red=True, bold=True)
    reporter.write_line("Each near-tie was within its golden's noise; together they are more flips than that noise "
                        "explains, as a decoding or numerics change that flips close calls would make.")
    for line in lines:
        reporter.write_line(f"  {line}")


def unjudged_section(reporter: Any, record: SessionRecord, *, ci: bool) -> None:
    """Checks not judged are never quiet: listed loudly, and in a gate run they failed the session."""
    lines = record.unjudged()
    if not lines:
        return
    if ci:
        title = f"harness: {len(lines)} check(s) NOT JUDGED - this gate run fails"
        why = ("CI is set: a gate must not be green on checks it did not judge. Fix the cause below, "
               "or remove the check or its variant from the suite on purpose.")
    else:
        title = f"harness: WARNING {len(lines)} check(s) NOT JUDGED"
        why = "this run would fail as a gate (with CI set): the checks below were not judged."
    reporter.write_sep("=", title, red=ci, yellow=not ci, bold=True)
    reporter.write_line(why)
    for line in lines:
        reporter.write_line(f"  {line}")


def load_lines(loads: dict[str, Any]) -> list[str]:
    from harness.models.placement import describe_bytes

    return [
        f"loaded {key}: {info['count']}x, {info['seconds']:.1f} s, "
        + (f"{info['dtype']} " if info.get("dtype") else "") + f"weights {info['bytes'] / 2**20:.1f} MiB"
        + (f" (held on {describe_bytes(info['placement'])})" if info.get("placement") else "")
        for key, info in sorted(loads.items(), key=lambda kv: RUN_ORDER.index(kv[0]))
    ]


def unused_goldens(state: HarnessSession, record: SessionRecord, config: pytest.Config, *,
                   exitstatus: int) -> list[Path] | None:
    """Goldens of the suites and variants that ran which no item touched; None when a partial run."""
    partial = (
        config.option.keyword or config.option.markexpr or exitstatus == pytest.ExitCode.INTERRUPTED
        or any("::" in str(arg) for arg in config.args) or config.getoption("exitfirst", False)
        or record.deselected
    )
    if partial or not record.outcomes or state._resolved is None:
        return None
    from harness.golden import TOKENIZER_SCOPE

    root = state.options.golden_dir / state.model_name
    suites = {o.suite for o in record.outcomes.values()}
    variants = {o.variant for o in record.outcomes.values() if o.variant}
    scopes = [root / TOKENIZER_SCOPE / s for s in suites]
    scopes += [root / state.device.klass / v / s for v in variants for s in suites]
    used = {Path(p) for p in record.goldens_used}
    found: list[Path] = []
    for scope in scopes:
        if scope.is_dir():
            found += [f for f in scope.rglob("*.json") if not f.name.endswith(".meta.json") and f not in used]
    return sorted(found)
