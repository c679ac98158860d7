"""The ``--harness-report`` Markdown: a session's, and ``harness-report merge``'s of a sharded run.

One renderer for both (``render_markdown``), fed a ``Header`` (who was tested where) and the
session's record (``record.py``); pasteable as a pull-request comment, so no path of this
machine is in it.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from harness.models.variants import RUN_ORDER
from harness.report.display import relative_paths
from harness.report.record import Outcome, SessionRecord, forgiveness_counts, goldens_recorded
from harness.models.machine import NUMERICS_KEY, describe, expand_groups, markdown_lines, summary_lines
from harness.run.session import HarnessSession

# Said once in the terminal summary and once in the report of a --one-pass-goldens session.
ONE_PASS_LABEL = ("--one-pass-goldens: greedy goldens judged from one forward pass only, not the gate's verdict "
                  "(the default decodes every item the one pass does not decide)")

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
    kernel, versions, numerics), grouped with a count each (``harness.models.machine.recorded_groups``).
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
