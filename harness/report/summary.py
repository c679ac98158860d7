"""What the session did, for people: the terminal summary and the ``--harness-report`` Markdown.

Built from pytest's test reports (and their ``user_properties``), so it is the
same under pytest-xdist, where items run in workers and only reports come back.
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness.report.display import relative_paths, shown_path
from harness.errors import NOT_JUDGED_PROPERTY
from harness.judge.flips import FLIPS_PROPERTY, FlipLedger
from harness.run.machine import NUMERICS_KEY, describe, expand_groups, markdown_lines, summary_lines
from harness.run.session import HarnessSession
from harness.run.threads import summary_line
from harness.models.variants import ALL_KEYS, RUN_ORDER

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


ONE_PASS_LABEL = ("--one-pass-goldens: greedy goldens judged from one forward pass only, not the gate's verdict "
                  "(the default decodes every item the one pass does not decide)")


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
        for line in load_lines(_pool_loads(side_pool)):
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


def forgiveness_counts(record: SessionRecord) -> str:
    ties = sum(1 for line in record.forgiven if "accepted near-tie" in line)
    widened = sum(1 for line in record.forgiven if line.startswith("widened tolerance"))
    return f"{ties} near-tie(s) accepted, {widened} widened tolerance(s)"


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


def _pool_loads(pool: Any) -> dict[str, Any]:
    return {
        key: {"count": count, "seconds": pool.load_seconds.get(key, 0.0), "bytes": pool.weights_bytes.get(key, 0),
              "placement": pool.placements.get(key), "dtype": pool.dtypes.get(key)}
        for key, count in pool.load_counts.items()
    }


def load_lines(loads: dict[str, Any]) -> list[str]:
    from harness.models.placement import describe_bytes

    return [
        f"loaded {key}: {info['count']}x, {info['seconds']:.1f} s, "
        + (f"{info['dtype']} " if info.get("dtype") else "") + f"weights {info['bytes'] / 2**20:.1f} MiB"
        + (f" (held on {describe_bytes(info['placement'])})" if info.get("placement") else "")
        for key, info in sorted(loads.items(), key=lambda kv: RUN_ORDER.index(kv[0]))
    ]


_SYMBOL = {"passed": "pass", "failed": "**FAIL**", "error": "**ERROR**", "skipped": "skip"}


@dataclass
class Side:
    """One model of the run as a report's header shows it: from a live session or a shard's result file."""

    name: str
    provenance: dict[str, Any] | None = None
    error: str | None = None  # why the provenance is unavailable
    adapter: str | None = None
    device: str = ""  # the device's description
    precision: str = ""  # the 16-bit dtype the fp16 variants ran in, and why


@dataclass
class Header:
    """Who was tested where; ``reference`` is OLD in reference mode (the report then reads NEW vs OLD).

    ``recorded``: what the sidecars of the goldens the run compared with recorded (device, attention
    kernel, versions, numerics), grouped with a count each (``harness.run.machine.recorded_groups``).
    """

    model: Side
    reference: Side | None = None
    recorded: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Header:
        return cls(model=Side(**data["model"]),
                   reference=Side(**data["reference"]) if data.get("reference") else None,
                   recorded=list(data.get("recorded") or []))


def session_header(state: HarnessSession, record: SessionRecord | None = None) -> Header:
    """The header of a live session; a provenance that cannot be had is said, never raised."""

    def side(*, reference: bool) -> Side:
        name = state.reference_name if reference else state.model_name
        try:
            prov = state.provenance(reference=reference)
        except Exception as exc:  # noqa: BLE001 - the report must still be written
            return Side(name=str(name), error=str(exc))
        resolved = state._reference_resolved if reference else state._resolved
        adapter = resolved.adapter if resolved else None
        return Side(name=str(name), provenance=prov, adapter=str(adapter) if adapter else None,
                    device=state.device.description, precision=resolved.half.describe() if resolved else "")

    reference = side(reference=True) if state.options.reference is not None else None
    return Header(model=side(reference=False), reference=reference,
                  recorded=goldens_recorded(state, record) if record is not None else [])


def goldens_recorded(state: HarnessSession, record: SessionRecord) -> list[dict[str, Any]]:
    """What the sidecars of the goldens this session compared with recorded; none in reference mode."""
    if state.options.reference is not None or not record.goldens_used:
        return []
    from harness.golden.sidecars import recorded_provenance
    from harness.run.machine import recorded_groups

    return recorded_groups(recorded_provenance(Path(p) for p in record.goldens_used))


def markdown(state: HarnessSession, record: SessionRecord, *, exitstatus: int) -> str:
    """A short Markdown report of a live session, pasteable as a pull-request comment: no path of this
    machine in it (paths under the rootdir are shown relative to it)."""
    text = render_markdown(session_header(state, record), record, exitstatus=exitstatus,
                           seconds=time.time() - record.started, appendix=golden_folder_lines(state),
                           preface=[f"- {ONE_PASS_LABEL}", ""] if state.options.one_pass_goldens else None)
    return relative_paths(text, state.options.rootdir)


def render_markdown(header: Header, record: SessionRecord, *, exitstatus: int, seconds: float,
                    preface: list[str] | None = None, appendix: list[str] | None = None) -> str:
    """The one Markdown renderer: a session's report, and ``harness-report merge``'s of a sharded run.

    ``preface`` (lines after the verdict) and ``appendix`` (lines at the end) are the merge's
    problems and its per-shard table.
    """
    counts = Counter(o.outcome for o in record.outcomes.values())
    recorded = expand_groups(header.recorded)
    if header.reference is not None:
        lines = [f"# Behaviour report: NEW {header.model.name} vs OLD {header.reference.name}", "",
                 "Reference mode: every check was judged against a live run of OLD in this session (same variant "
                 "and device), not against golden files; figures of OLD are prefixed `old_`.", "", "NEW:"]
        lines += _provenance_lines(header.model) + ["", "OLD:"] + _provenance_lines(header.reference)
    else:
        lines = [f"# Behaviour report: {header.model.name}", ""]
        lines += _provenance_lines(header.model)
        if header.model.provenance is not None and recorded:
            lines += [f"- {line}" for line in summary_lines(header.model.provenance, recorded)[2:]]
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no harness items"
    verdict = "green" if exitstatus == 0 else "red"
    lines += [f"- **result: {verdict}** ({summary}) in {seconds:.0f} s", ""]
    lines += preface or []
    lines += _matrix(record)
    lines += _unjudged(record)
    lines += _figures(record)
    if header.model.provenance is not None:
        lines += markdown_lines(header.model.provenance, recorded)
    if record.forgiven or record.flips.groups:
        standing = [f"- budget {line}" for line in record.flips.standing()]
        lines += [f"## Forgiven: {forgiveness_counts(record)}", "", *[f"- {line}" for line in record.forgiven], ""]
        lines += [*standing, ""] if standing else []
    budget = record.flips.exceeded()
    if budget:
        lines += ["## Near-tie budget exceeded (this run failed because of it)", "", *[f"- {line}" for line in budget],
                  ""]
    if record.notes:
        lines += ["## Notes", "", *[f"- {note}" for note in record.notes], ""]
    lines += _failures(record)
    lines += appendix or []
    return "\n".join(lines).rstrip() + "\n"


def golden_folder_lines(state: HarnessSession) -> list[str]:
    """What the terminal says about the golden folder (untrusted sidecars, leftovers), in the report too;
    nothing in reference mode, which reads nothing under the golden folder."""
    if state.options.reference is not None:
        return []
    from harness.golden import tree_report

    try:
        found = tree_report(state.options.golden_dir)
    except OSError as exc:
        found = [f"the golden folder cannot be read: {exc}"]
    if not found:
        return []
    return ["## Golden folder", "", *(f"- {line.strip()}" if not line.startswith("  ") else f"  - `{line.strip()}`"
                                     for line in found), ""]


def _provenance_lines(side: Side) -> list[str]:
    prov = side.provenance
    if prov is None:
        return [f"- model: {side.name} (provenance unavailable: {side.error})"]
    versions = ", ".join(f"{k} {v}" for k, v in prov["versions"].items())
    return [
        f"- model: `{prov['model']}` ({prov['source']}), revision `{prov['revision'] or '-'}`, "
        f"weights fingerprint `{prov['model_fingerprint']}`, tokenizer `{prov['tokenizer_fingerprint']}`",
        f"- adapter: `{side.adapter or '-'}` fingerprint `{prov['adapter_fingerprint'] or '-'}`",
        f"- device: {side.device} (class `{prov['device']}`)",
        *([f"- 16-bit variants in {side.precision}; NF4 computes in bfloat16"] if side.precision else []),
        f"- libraries: {versions}",
        f"- numerics: {describe(prov.get(NUMERICS_KEY))}",
    ]


def _matrix(record: SessionRecord) -> list[str]:
    if not record.outcomes:
        return []
    variants = [v for v in RUN_ORDER if any(o.variant == v for o in record.outcomes.values())]
    rows: dict[str, dict[str, Outcome]] = defaultdict(dict)
    for outcome in record.outcomes.values():
        rows[f"{outcome.suite}::{outcome.check}"][outcome.variant or "model"] = outcome
    columns = (["model"] if any("model" in r for r in rows.values()) else []) + variants
    lines = ["| check | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in sorted(rows):
        cells = []
        for column in columns:
            outcome = rows[name].get(column)
            if outcome is None:
                cells.append("")
            elif outcome.outcome == "passed":
                cells.append("pass")
            else:
                cells.append(f"{_SYMBOL[outcome.outcome]}: {outcome.reason}".replace("|", "\\|"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _unjudged(record: SessionRecord) -> list[str]:
    lines = record.unjudged()
    if not lines:
        return []
    head = "## Not judged" + (" (this gate run failed because of them)" if record.gate_failed else "")
    return [head, "", *(f"- {line}" for line in lines), ""]


def _figures(record: SessionRecord) -> list[str]:
    with_figures = [o for o in record.outcomes.values() if o.figures]
    if not with_figures:
        return []
    lines = ["## Budgets and drift", "", "| check | variant | figures |", "|---|---|---|"]
    for outcome in sorted(with_figures, key=lambda o: (o.suite, o.check, o.variant or "")):
        figures = ", ".join(f"{k}={_fmt(v)}" for k, v in outcome.figures.items())
        lines.append(f"| {outcome.suite}::{outcome.check} | {outcome.variant or '-'} | {figures} |")
    return lines + [""]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _failures(record: SessionRecord) -> list[str]:
    failed = [o for o in record.outcomes.values() if o.outcome in ("failed", "error")]
    if not failed:
        return []
    lines = ["## Failures", ""]
    for outcome in failed:
        body = outcome.detail.strip().splitlines()[:14]
        lines += [f"### {outcome.nodeid}", "", "```", *body, "```", ""]
    return lines


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
