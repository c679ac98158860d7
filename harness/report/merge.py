"""``harness-report merge``: the shards of one run become one report, one JUnit file and one exit code.

Each shard's ``--harness-result`` file holds pytest's own test reports; they are replayed
into the same ``SessionRecord`` and Markdown renderer a single session uses, and into pytest's
JUnit writer, so a merged run reads like the unsharded one. Before that, the merge checks that
the shards make one whole run: every shard 1..N present once, each finished, every item it
selected reported, all of the same commit, golden tree, suites, model and device class, and
together selecting each collected item exactly once. Any of that missing is red (exit 2) and
said shard by shard.

The gate mode is part of a run's identity: shards run with and without ``CI`` are not one run.
A merge under ``CI`` applies the gate's rule to the whole run again (an item no shard judged is
red, as in a single gate session), so a merged verdict is never greener than a gate session's.

Exit status: 0 green; 1 a check failed or errored (or, in a gate run, was not judged), or a
shard said red; 2 the shards do not make one whole run, a result file is not valid, or an
output would be written into the golden folder (nothing is written then); 5 no item was
collected.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.run.ci import in_ci
from harness.cli import ToolParser, golden_dir_argument, golden_dirs
from harness.report.outputs import output_in_golden_problem
from harness.report.result import ResultError, ShardResult, is_result, read_result
from harness.run.shard import plain_nodeid

EXIT_GREEN, EXIT_RED, EXIT_INCOMPLETE, EXIT_NO_ITEMS = 0, 1, 2, 5
_PYTEST_EXITS = {0: "ok", 1: "tests failed", 2: "interrupted", 3: "internal error", 4: "usage error",
                 5: "no tests collected"}
_IDENTITY = (  # key, what differing values mean
    ("ci", "gate modes (CI set for some shards, not for others: one rule must judge the whole run)"),
    ("commit", "commits"), ("goldens", "golden trees"), ("registry", "model registries"),
    ("suites", "suite files"), ("collected", "collections (another -k, -m or --variants, or other tests)"),
    ("model", "--model values"), ("reference", "--reference values"), ("variants", "--variants values"),
    ("device_class", "device classes"),
)


@dataclass
class Merged:
    """The outcome of a merge: what to render and how to exit."""

    shards: list[ShardResult]
    problems: list[str] = field(default_factory=list)
    exitstatus: int = EXIT_GREEN
    record: Any = None
    markdown: str = ""


def _parser() -> argparse.ArgumentParser:
    parser = ToolParser(prog="harness-report", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge_cmd = commands.add_parser(
        "merge", help="merge the --harness-result files of a sharded run into one report, JUnit XML and exit code",
        description="Merge the --harness-result files of the shards of one run (files, or folders searched for "
                    "them) into one Markdown report, one JUnit XML and the exit code of the whole run: 0 green, "
                    "1 red, 2 the shards do not make one whole run (missing, crashed, or of different commits, "
                    "goldens or suites), 5 nothing collected. Where GITHUB_STEP_SUMMARY is set, the report is "
                    "appended there too.")
    merge_cmd.add_argument("paths", nargs="+", metavar="PATH", help="result files, or folders holding them")
    merge_cmd.add_argument("--report", metavar="FILE.md", help="write the Markdown report here (default: stdout)")
    merge_cmd.add_argument("--junitxml", metavar="FILE.xml", help="write the JUnit XML of the whole run here")
    golden_dir_argument(merge_cmd, default="golden/ in the current folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = _output_problem(args)
    if problem:
        print(f"harness-report merge: {problem}", file=sys.stderr)
        return EXIT_INCOMPLETE
    merged = merge([Path(p) for p in args.paths])
    return _write_outputs(merged, report=args.report, junitxml=args.junitxml)


def _output_problem(args: argparse.Namespace) -> str | None:
    """Why an output of the merge may not be written where it is asked for (checked before anything is read)."""
    golden = golden_dirs(args.golden_dir, "models.yaml")[0]
    for flag, value in (("--report", args.report), ("--junitxml", args.junitxml)):
        problem = output_in_golden_problem(flag, value, golden) if value else None
        if problem:
            return problem
        if value and Path(value).is_dir():
            return f"{flag} {value}: this is a folder. Nothing was run. Fix: pass a file name, e.g. {flag} merged.out."
    return None


def merge(paths: list[Path]) -> Merged:
    """Read, check and combine the results found under ``paths``."""
    shards, problems = _read_all(paths)
    merged = Merged(shards=sorted(shards, key=lambda s: (s.shard.index, str(s.path))), problems=problems)
    merged.problems += whole_run_problems(merged.shards)
    merged.record = _record(merged.shards)
    merged.exitstatus = _exitstatus(merged)
    merged.markdown = _markdown(merged)
    return merged


def _read_all(paths: list[Path]) -> tuple[list[ShardResult], list[str]]:
    shards: list[ShardResult] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            files = [f for f in sorted(path.rglob("*.json")) if _looks_like_result(f)]
            if not files:
                problems.append(f"{path}/: no harness result in this folder: its shard crashed before writing one, "
                                "or its artifact was not uploaded")
        elif path.is_file():
            files = [path]
        else:
            problems.append(f"{path}: no such file or folder")
            files = []
        for file in files:
            try:
                shards.append(read_result(file))
            except ResultError as exc:
                problems.append(str(exc))
    if not shards and not problems:
        problems.append("no result files given")
    return shards, problems


def _looks_like_result(path: Path) -> bool:
    """A JSON file in a shard's folder is read only when it declares the result format."""
    import json

    try:
        with path.open(encoding="utf-8") as handle:
            head = handle.read(200)
        if '"format"' not in head:
            return False
        return is_result(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError):
        return True  # unreadable: read_result says why


def whole_run_problems(shards: list[ShardResult]) -> list[str]:
    """Why these results are not the shards of one whole run; empty when they are."""
    if not shards:
        return []
    problems: list[str] = []
    counts = sorted({s.shard.count for s in shards})
    if len(counts) > 1:
        listing = ", ".join(f"{s.path} says {s.shard}" for s in shards)
        problems.append(f"the results declare different shard counts ({listing}): they are not of one run")
    count = max(counts)
    by_index: dict[int, list[ShardResult]] = defaultdict(list)
    for shard in shards:
        by_index[shard.shard.index].append(shard)
    for index in range(1, count + 1):
        found = by_index.get(index, [])
        if not found:
            problems.append(f"shard {index}/{count}: no result: it crashed before writing one, its job did not "
                            "run, or its artifact was not downloaded")
        elif len(found) > 1:
            problems.append(f"shard {index}/{count}: {len(found)} results ({', '.join(str(s.path) for s in found)}): "
                            "keep the one of this run")
    for shard in shards:
        problems += _shard_problems(shard)
    problems += _identity_problems(shards)
    if not problems:
        problems += _coverage_problems(shards)
    return problems


def _shard_problems(shard: ShardResult) -> list[str]:
    """One shard's own state: finished, exited normally, every selected item reported."""
    name = f"shard {shard.shard} ({shard.path})"
    if not shard.complete:
        return [f"{name} crashed: it started at {shard.data.get('started', '?')} but never finished "
                "(the result is the one written when the session started)"]
    problems = []
    status = shard.exitstatus
    plan = shard.plan
    if status not in (0, 1) and not (status == 5 and plan is not None and plan.get("collected") == 0):
        problems.append(f"{name} ended with exit status {status} ({_PYTEST_EXITS.get(status, 'unknown')}): "
                        "its verdicts are not those of a whole session; see that job's log")
    if plan is None:
        problems.append(f"{name} recorded no collection: it ended before its items were collected")
        return problems
    reported = {plain_nodeid(r.nodeid) for r in shard.reports if r.__class__.__name__ == "TestReport"}
    missing = [nodeid for nodeid in plan.get("selected", []) if nodeid not in reported]
    if missing:
        problems.append(f"{name} is incomplete: {len(missing)} of its {len(plan.get('selected', []))} items have no "
                        f"result (first: {missing[0]}); it was stopped (-x, a timeout) or crashed mid-run")
    return problems


def _identity_problems(shards: list[ShardResult]) -> list[str]:
    problems = []
    for key, meaning in _IDENTITY:
        values: dict[str, list[str]] = defaultdict(list)
        for shard in shards:
            if key in shard.identity:
                values[repr(shard.identity[key])].append(str(shard.shard))
        if len(values) > 1:
            listing = "; ".join(f"shard {', '.join(names)}: {value}" for value, names in values.items())
            problems.append(f"the shards ran on different {meaning} ({listing}): they are not one run")
    return problems


def _coverage_problems(shards: list[ShardResult]) -> list[str]:
    """With one collection, every item must be selected by exactly one shard."""
    owners: dict[str, list[str]] = defaultdict(list)
    collected = 0
    for shard in shards:
        plan = shard.plan or {}
        collected = max(collected, int(plan.get("collected", 0)))
        for nodeid in plan.get("selected", []):
            owners[nodeid].append(str(shard.shard))
    twice = [f"{nodeid} (shards {', '.join(o)})" for nodeid, o in owners.items() if len(o) > 1]
    problems = [f"{len(twice)} item(s) ran in more than one shard (first: {twice[0]})"] if twice else []
    if len(owners) != collected:
        problems.append(f"the shards selected {len(owners)} distinct items of the {collected} collected: "
                        f"{collected - len(owners)} ran nowhere")
    return problems


def _record(shards: list[ShardResult]) -> Any:
    """One SessionRecord from the shards' reports, as a single session would have built it."""
    from harness.report.record import SessionRecord

    record = SessionRecord()
    for shard in shards:
        for report in shard.reports:
            if report.__class__.__name__ == "TestReport":
                record.add(report)
        record.add_unselected(shard.data.get("unselected", ()))
        record.gate_failed = record.gate_failed or bool(shard.data.get("gate_failed"))
        for worker, loads in (shard.data.get("loads") or {}).items():
            record.worker_loads[f"shard {shard.shard}" + (f" {worker}" if worker else "")] = loads
    return record


def _exitstatus(merged: Merged) -> int:
    if merged.problems:
        return EXIT_INCOMPLETE
    failed = any(r.failed for shard in merged.shards for r in shard.reports)
    said_red = any(shard.exitstatus == 1 for shard in merged.shards)
    if gate_rule(merged.shards) and merged.record.unjudged():
        merged.record.gate_failed = True  # as a single gate session: an item not judged is not a pass
    if failed or said_red or merged.record.gate_failed or merged.record.flips.exceeded():
        return EXIT_RED
    if not any(shard.reports for shard in merged.shards):
        return EXIT_NO_ITEMS
    return EXIT_GREEN


def gate_rule(shards: list[ShardResult]) -> bool:
    """Whether the merged run is judged as a gate: the merge runs under CI, or any shard did."""
    return in_ci() or any(shard.identity.get("ci") is True for shard in shards)


def _markdown(merged: Merged) -> str:
    from harness.models.machine import shard_note
    from harness.report.markdown import Header, Side, render_markdown

    headers = [s.data.get("header") for s in merged.shards if s.data.get("header")]
    with_provenance = [h for h in headers if (h.get("model") or {}).get("provenance")]
    chosen = (with_provenance or headers or [None])[0]
    header = Header.from_dict(chosen) if chosen else Header(model=Side(name="-", error="no shard recorded one"))
    header.recorded = [group for h in headers for group in (h.get("recorded") or [])]  # every shard's goldens
    seconds = max((float(s.data.get("seconds") or 0) for s in merged.shards), default=0.0)
    preface = []
    if merged.problems:
        preface += ["## The shards do not make one whole run (red)", "",
                    *(f"- {problem}" for problem in merged.problems), ""]
    preface += _version_notes(with_provenance)
    preface += shard_note([(s.shard.index, s.data["header"]) for s in merged.shards if s.data.get("header")])
    golden_folder = next((s.data["golden_folder"] for s in merged.shards if s.data.get("golden_folder")), [])
    return render_markdown(header, merged.record, exitstatus=merged.exitstatus, seconds=seconds,
                           preface=preface, appendix=_shard_table(merged.shards) + golden_folder)


def _version_notes(headers: list[dict[str, Any]]) -> list[str]:
    """Runners that resolved other library versions are said (goldens are judged up to their noise)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for header in headers:
        for library, version in header["model"]["provenance"].get("versions", {}).items():
            seen[library].add(str(version))
    differing = {lib: sorted(v) for lib, v in seen.items() if len(v) > 1}
    if not differing:
        return []
    listing = "; ".join(f"{lib}: {', '.join(v)}" for lib, v in sorted(differing.items()))
    return [f"Note: the shards ran with different library versions ({listing}).", ""]


def _shard_table(shards: list[ShardResult]) -> list[str]:
    from harness.report.summary import load_lines

    if not shards:
        return []
    lines = ["## Shards", "", "| shard | items | exit status | seconds | load groups | loads |", "|---|---|---|---|---|---|"]
    for shard in shards:
        plan = shard.plan or {}
        groups = ", ".join(name for name, info in (plan.get("groups") or {}).items()
                           if info.get("shard") == shard.shard.index) or "-"
        loads = "; ".join(line for worker, by_variant in (shard.data.get("loads") or {}).items()
                          for line in load_lines(by_variant)) or "-"
        status = "crashed" if not shard.complete else shard.exitstatus
        lines.append(f"| {shard.shard} | {len(plan.get('selected', []))} | {status} | "
                     f"{float(shard.data.get('seconds') or 0):.0f} | {groups} | {loads} |")
    return lines + [""]


def _write_outputs(merged: Merged, *, report: str | None, junitxml: str | None) -> int:
    counts = Counter(o.outcome for o in merged.record.outcomes.values())
    if report:
        Path(report).parent.mkdir(parents=True, exist_ok=True)
        Path(report).write_text(merged.markdown, encoding="utf-8")
    else:
        sys.stdout.write(merged.markdown)
    if junitxml:
        write_junit(merged, Path(junitxml))
    summary_file = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary_file:
        with open(summary_file, "a", encoding="utf-8") as handle:
            handle.write(merged.markdown + "\n")
    out = sys.stderr if not report else sys.stdout
    for problem in merged.problems:
        print(f"harness-report merge: {problem}", file=out)
    verdict = "green" if merged.exitstatus == EXIT_GREEN else "red"
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no harness items"
    print(f"harness-report merge: {len(merged.shards)} shard result(s): {verdict} ({summary}), "
          f"exit status {merged.exitstatus}", file=out)
    return merged.exitstatus


def write_junit(merged: Merged, path: Path) -> None:
    """pytest's own JUnit writer fed the shards' reports, as ``--junitxml`` of one session would be."""
    from _pytest.junitxml import LogXML

    xml = LogXML(str(path), None, family="xunit2")
    xml.pytest_sessionstart()
    for shard in merged.shards:
        for report in shard.reports:
            if report.__class__.__name__ == "TestReport":
                xml.pytest_runtest_logreport(report)
            else:
                xml.pytest_collectreport(report)
    if merged.problems:
        reporter = xml.node_reporter("harness-report merge")
        reporter.attrs.update(classname="harness-report", name="merge")
        reporter._add_simple("error", "the shards do not make one whole run", "\n".join(merged.problems))
    xml.pytest_sessionfinish()


if __name__ == "__main__":
    raise SystemExit(main())
