"""What a session did, as collected from pytest's test reports: one outcome per item, goldens, notes.

Built from the reports (and their ``user_properties``), so it is the same under
pytest-xdist, where items run in workers and only reports come back. The terminal
summary (``summary.py``), the Markdown report (``markdown.py``) and the result file
all read this one record.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.errors import NOT_JUDGED_PROPERTY
from harness.judge.flips import FLIPS_PROPERTY, FlipLedger
from harness.models.variants import ALL_KEYS

if TYPE_CHECKING:
    from harness.run.session import HarnessSession

_NODE = re.compile(r"^(?P<file>[^:]+)::(?P<check>[^\[@]+)(\[(?P<variant>[^\]]+)\])?")
GOLDEN_PROPS = ("harness_golden", "harness_golden_written", NOT_JUDGED_PROPERTY, "harness_note", "harness_forgiven",
                FLIPS_PROPERTY)


@dataclass
class Outcome:
    nodeid: str
    suite: str
    check: str
    variant: str | None
    outcome: str
    reason: str = ""
    detail: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # this item's accepted near-ties and other forgiveness


@dataclass
class SessionRecord:
    """Collected from test reports as they arrive (controller side under xdist)."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    goldens_used: set[str] = field(default_factory=set)
    goldens_written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # fragile goldens, cross-device judgements: never silent
    forgiven: list[str] = field(default_factory=list)  # accepted near-ties, widened tolerances: counted
    flips: FlipLedger = field(default_factory=FlipLedger)
    worker_loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    worker_threads: dict[str, dict[str, Any]] = field(default_factory=dict)  # xdist: each worker's CPU threads
    deselected: int = 0
    started: float = field(default_factory=time.time)
    not_judged: dict[str, str] = field(default_factory=dict)
    unselected: list[str] = field(default_factory=list)
    gate_failed: bool = False
    report_error: str | None = None
    plan: dict[str, Any] | None = None  # --shard / --harness-result: what was collected and what this shard runs

    def add_unselected(self, notes: Any) -> None:
        """Checks whose ``variants:`` matched none of the session's (from collection, any worker)."""
        for note in notes:
            if note not in self.unselected:
                self.unselected.append(note)

    def unjudged(self) -> list[str]:
        """One line per check that this session should have judged and did not."""
        lines = [f"{nodeid}: {reason}" for nodeid, reason in sorted(self.not_judged.items())]
        return lines + self.unselected

    def add(self, report: pytest.TestReport) -> None:
        if "harness" not in report.keywords:
            return
        props = dict(report.user_properties)
        if report.when == "teardown":  # every phase's report carries the same properties
            for name, value in report.user_properties:
                if name == "harness_golden":
                    self.goldens_used.add(str(value))
                elif name == "harness_golden_written":
                    self.goldens_written.append(str(value))
                elif name == "harness_note":
                    self.notes.append(str(value))
                elif name == "harness_forgiven":
                    self.forgiven.append(str(value))
                elif name == FLIPS_PROPERTY:
                    self.flips.add(report.nodeid, str(value))
        if report.when != "call" and report.passed:
            return
        match = _NODE.match(report.nodeid)
        if not match:
            return
        variant = match["variant"] if match["variant"] in ALL_KEYS else None
        outcome = "error" if report.when != "call" and report.failed else report.outcome
        previous = self.outcomes.get(report.nodeid)
        if previous and previous.outcome in ("failed", "error"):
            return  # a teardown report must not hide the call's failure
        detail = _longrepr_text(report)
        if NOT_JUDGED_PROPERTY in props and report.skipped:
            self.not_judged[report.nodeid] = str(props[NOT_JUDGED_PROPERTY])
        self.outcomes[report.nodeid] = Outcome(
            nodeid=report.nodeid, suite=Path(match["file"]).stem, check=match["check"], variant=variant,
            outcome=outcome, reason=_one_line(detail, report), detail=detail,
            figures={k: v for k, v in props.items() if k not in GOLDEN_PROPS},
            notes=[str(value) for name, value in report.user_properties if name == "harness_note"],
        )


def _longrepr_text(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr or "")


def _one_line(detail: str, report: pytest.TestReport) -> str:
    lines = [line for line in detail.splitlines() if line.strip()]
    if report.failed and len(lines) > 1 and re.match(r"^\S+\.ya?ml:\d+: ", lines[0]):
        lines = lines[1:]  # our header "suite.yaml:LINE: check[variant]"
    text = lines[0] if lines else ""
    return text if len(text) <= 160 else text[:157] + "..."


def forgiveness_counts(record: SessionRecord) -> str:
    """One line of counts, for the terminal and the Markdown alike, so both say the same."""
    ties = sum(1 for line in record.forgiven if "accepted near-tie" in line)
    widened = sum(1 for line in record.forgiven if line.startswith("widened tolerance"))
    return f"{ties} near-tie(s) accepted, {widened} widened tolerance(s)"


def goldens_recorded(state: HarnessSession, record: SessionRecord) -> list[dict[str, Any]]:
    """What the sidecars of the goldens this session compared with recorded; none in reference mode."""
    if state.options.reference is not None or not record.goldens_used:
        return []
    from harness.golden.sidecars import recorded_provenance
    from harness.models.machine import recorded_groups

    return recorded_groups(recorded_provenance(Path(p) for p in record.goldens_used))


def pool_loads(pool: Any) -> dict[str, Any]:
    """A pool's loads as plain data: the shape an xdist worker sends back and a result file keeps."""
    return {
        key: {"count": count, "seconds": pool.load_seconds.get(key, 0.0), "bytes": pool.weights_bytes.get(key, 0),
              "placement": pool.placements.get(key), "dtype": pool.dtypes.get(key)}
        for key, count in pool.load_counts.items()
    }
