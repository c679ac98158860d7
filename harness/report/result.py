"""A session's machine-readable result (``--harness-result``): what ``harness-report merge`` reads.

One JSON file per session (per shard): who ran what where (commit, golden tree, suites, model,
device class), the collection plan (every load group and its shard, the items this shard
selected), each item's verdict in plain fields (outcome, reason, figures, notes, not-judged
reason) and, for faithful replay, pytest's own serialization of every test report (the form
pytest-xdist sends from workers to the controller). The file is written twice: when the session
starts, marked incomplete, and when it finishes; a shard that crashed leaves the first.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.run.ci import in_ci
from harness.run.shard import Shard, files_digest, tree_digest

if TYPE_CHECKING:
    from harness.report.record import SessionRecord
    from harness.run.session import HarnessSession

FORMAT = "llm-behave-harness/result"
VERSION = 1


def result_path(value: str, shard: Shard | None) -> Path:
    """``--harness-result``: a ``.json`` file, or a folder (existing, or written with a trailing slash)
    that gets ``harness-result-K-of-N.json`` (``harness-result.json`` unsharded)."""
    path = Path(value)
    if path.is_dir() or value.endswith(("/", os.sep)) or path.suffix.lower() != ".json":
        name = f"harness-result-{shard.index}-of-{shard.count}.json" if shard else "harness-result.json"
        return path / name
    return path


class ResultWriter:
    """Records every report of the session and writes the result file (controller side under xdist)."""

    def __init__(self, config: pytest.Config, path: Path, *, shard: Shard | None,
                 state: HarnessSession, record: SessionRecord) -> None:
        self.config, self.path, self.shard, self.state, self.record = config, path, shard, state, record
        self.reports: list[dict[str, Any]] = []
        self.started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.error: str | None = None

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._write(self._base(complete=False))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.reports.append(self._serializable(report))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:  # a suite that does not load is an error of the whole run
            self.reports.append(self._serializable(report))

    @pytest.hookimpl(trylast=True)  # after the plugin's own sessionfinish settled the exit status
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        data = self._base(complete=True)
        data.update(self._final(int(session.exitstatus)))
        self._write(data)

    def _serializable(self, report: pytest.TestReport | pytest.CollectReport) -> dict[str, Any]:
        return self.config.hook.pytest_report_to_serializable(config=self.config, report=report)

    def _base(self, *, complete: bool) -> dict[str, Any]:
        opts = self.state.options
        return {
            "format": FORMAT, "version": VERSION, "complete": complete,
            "shard": {"index": self.shard.index, "count": self.shard.count} if self.shard else {"index": 1, "count": 1},
            "started": self.started,
            "identity": {
                "ci": in_ci(),  # the gate mode: shards of one run judge by one rule
                "commit": git_commit(opts.rootdir),
                "goldens": tree_digest(opts.golden_dir),
                "registry": files_digest([opts.registry], rootdir=opts.rootdir) if opts.registry.is_file() else None,
                "model": opts.model, "reference": opts.reference, "variants": opts.variants,
            },
        }

    def _final(self, exitstatus: int) -> dict[str, Any]:
        from harness.report.markdown import Header, Side, golden_folder_lines, session_header
        from harness.report.record import pool_loads

        record, state = self.record, self.state
        if record.outcomes:
            header = session_header(state, record)
        else:
            header = Header(model=Side(name=_model_name(state), error="no harness item ran in this session"))
        loads = dict(record.worker_loads)
        if state._pool is not None:
            loads[""] = pool_loads(state._pool)
        return {
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(_elapsed(record), 3),
            "exitstatus": exitstatus,
            "ci": in_ci(),
            "plan": record.plan,
            "header": dataclasses.asdict(header),
            "items": [item_fields(o, record) for o in record.outcomes.values()],
            "unselected": list(record.unselected),
            "gate_failed": record.gate_failed,
            "loads": loads,
            "threads": dict(record.worker_threads),
            "golden_folder": golden_folder_lines(state),  # the report's lines on leftovers, untrusted sidecars
            "reports": self.reports,
        }

    def _write(self, data: dict[str, Any]) -> None:
        """Atomically (temp file + rename): a reader never sees half a file."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(self.path.name + ".tmp")
            temp.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
            temp.replace(self.path)
        except OSError as exc:
            self.error = f"--harness-result {self.path} could not be written: {type(exc).__name__}: {exc}"


def item_fields(outcome: Any, record: SessionRecord) -> dict[str, Any]:
    """One item's verdict for tools: the report's Outcome, and why it was not judged where it was not."""
    fields = dataclasses.asdict(outcome)
    fields["not_judged"] = record.not_judged.get(outcome.nodeid)
    return fields


def _model_name(state: HarnessSession) -> str:
    try:
        return state.model_name
    except Exception:  # noqa: BLE001 - no registry: a session of ordinary tests
        return "-"


def _elapsed(record: SessionRecord) -> float:
    import time

    return time.time() - record.started


def git_commit(rootdir: Path) -> str | None:
    """The checked-out commit of the project, None outside a git work tree (or without git)."""
    try:
        out = subprocess.run(["git", "-C", str(rootdir), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and text else None


# -- reading ------------------------------------------------------------------------


class ResultError(Exception):
    """A file that is not a readable result (said with its path)."""


@dataclass
class ShardResult:
    """One result file, as read back."""

    path: Path
    data: dict[str, Any]
    reports: list[Any] = field(default_factory=list)

    @property
    def shard(self) -> Shard:
        shard = self.data.get("shard") or {}
        return Shard(int(shard.get("index", 1)), int(shard.get("count", 1)))

    @property
    def complete(self) -> bool:
        return bool(self.data.get("complete"))

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.data.get("plan")

    @property
    def exitstatus(self) -> int | None:
        return self.data.get("exitstatus")

    @property
    def identity(self) -> dict[str, Any]:
        """What every shard of one run shares: the recorded identity plus what its collection and device
        saw (those two only where the shard got that far)."""
        identity = dict(self.data.get("identity") or {})
        if "ci" not in identity and isinstance(self.data.get("ci"), bool):
            identity["ci"] = self.data["ci"]  # a result written before the mode was part of the identity
        plan = self.plan
        if plan is not None:
            identity["suites"] = plan.get("suites")
            identity["collected"] = plan.get("collected_digest")
        header = self.data.get("header") or {}
        device = ((header.get("model") or {}).get("provenance") or {}).get("device")
        if device is not None:
            identity["device_class"] = device
        return identity


def _side_schema() -> dict[str, Any]:
    """A report header's side: exactly the fields ``harness.report.markdown.Side`` takes, so a new field joins the check."""
    from harness.report.markdown import Side

    typed = {"name": {"type": "string"}, "provenance": {"type": ["object", "null"]},
             "error": {"type": ["string", "null"]}, "adapter": {"type": ["string", "null"]},
             "device": {"type": "string"}}
    names = [f.name for f in dataclasses.fields(Side)]
    return {"type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {name: typed.get(name, {}) for name in names}}


def result_schema() -> dict[str, Any]:
    """The JSON schema of a result file as ``harness-report merge`` reads it (format and version checked first)."""
    from harness.run.shard import MAX_SHARDS
    from harness.models.variants import RUN_ORDER

    text, count = {"type": "string"}, {"type": "integer", "minimum": 0}
    nullable_text = {"type": ["string", "null"]}
    texts = {"type": "array", "items": text}
    load = {"type": "object", "required": ["count", "seconds", "bytes"],
            "properties": {"count": count, "seconds": {"type": "number", "minimum": 0},
                           "bytes": {"type": "number", "minimum": 0},
                           "placement": {"type": ["object", "null"],
                                         "additionalProperties": {"type": "number", "minimum": 0}}}}
    return {
        "type": "object",
        "required": ["format", "version", "complete", "shard", "started", "identity"],
        "properties": {
            "format": text, "version": {"type": "integer"}, "complete": {"type": "boolean"},
            "shard": {"type": "object", "required": ["index", "count"], "additionalProperties": False,
                      "properties": {"index": {"type": "integer", "minimum": 1, "maximum": MAX_SHARDS},
                                     "count": {"type": "integer", "minimum": 1, "maximum": MAX_SHARDS}}},
            "started": text, "finished": text,
            "identity": {"type": "object", "properties": {
                "ci": {"type": "boolean"}, "commit": nullable_text, "goldens": nullable_text,
                "registry": nullable_text, "model": nullable_text, "reference": nullable_text,
                "variants": nullable_text}},
            "seconds": {"type": "number", "minimum": 0},
            "exitstatus": {"type": ["integer", "null"]},
            "ci": {"type": "boolean"},
            "plan": {"type": ["object", "null"], "required": ["collected", "selected"], "properties": {
                "collected": count, "collected_digest": nullable_text, "suites": nullable_text,
                "groups": {"type": "object", "additionalProperties": {
                    "type": "object", "properties": {"items": count, "shard": {"type": "integer", "minimum": 1}}}},
                "selected": texts}},
            "header": {"type": ["object", "null"], "required": ["model"],
                       "properties": {"model": _side_schema(), "reference": {"anyOf": [{"type": "null"},
                                                                                         _side_schema()]}}},
            "items": {"type": "array", "items": {"type": "object"}},
            "unselected": texts, "gate_failed": {"type": "boolean"}, "golden_folder": texts,
            "loads": {"type": "object", "additionalProperties": {
                "type": "object", "propertyNames": {"enum": list(RUN_ORDER)}, "additionalProperties": load}},
            "threads": {"type": "object"},
            "reports": {"type": "array", "items": {
                "type": "object", "required": ["$report_type", "nodeid", "outcome"],
                "properties": {"$report_type": {"enum": ["TestReport", "CollectReport"]}, "nodeid": text,
                               "outcome": {"enum": ["passed", "failed", "skipped"]}}}},
        },
        "if": {"properties": {"complete": {"const": True}}},
        "then": {"required": ["exitstatus", "plan", "header", "reports", "seconds"]},
    }


def schema_problem(data: Any) -> str | None:
    """The first thing in ``data`` that a result file may not hold, with where it is; None when it is valid."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(result_schema()).iter_errors(data))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    value = repr(error.instance)
    value = value if len(value) <= 60 else value[:57] + "..."
    if error.validator == "required":
        return f"{where or 'the top level'} lacks a field: {error.message}"
    return f"{where or 'the top level'} is {value}: {error.message}"


def is_result(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_result(path: Path) -> ShardResult:
    """Read one result file and rebuild its test reports (``ResultError`` says what is wrong)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path}: not a readable result file ({type(exc).__name__}: {exc})") from None
    if not is_result(data):
        raise ResultError(f"{path}: not a harness result (no \"format\": \"{FORMAT}\"); pass the files that "
                          "--harness-result wrote, or the folders holding them")
    if data.get("version") != VERSION:
        raise ResultError(f"{path}: result format version {data.get('version')!r}, this harness reads {VERSION}: "
                          "merge with the harness version the shards ran")
    problem = schema_problem(data)
    if problem:
        raise ResultError(f"{path}: not a valid harness result: {problem}. A result file is written whole by "
                          "--harness-result; this one was edited, damaged, or written by another tool. Fix: use "
                          "the file the shard's job wrote (or run that shard again)")
    try:
        reports = [_report(entry) for entry in data.get("reports", [])]
    except Exception as exc:  # noqa: BLE001 - written by another pytest version, or edited
        raise ResultError(f"{path}: its test reports cannot be read back ({type(exc).__name__}: {exc}); "
                          f"was it written with another pytest version than this one ({pytest.__version__})?") from None
    return ShardResult(path=path, data=data, reports=reports)


def _report(entry: dict[str, Any]) -> pytest.TestReport | pytest.CollectReport:
    """pytest's own deserialization (what pytest-xdist's controller does), with JSON's lists made tuples again."""
    kind = entry.get("$report_type")
    cls = {"TestReport": pytest.TestReport, "CollectReport": pytest.CollectReport}.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown report type {kind!r}")
    report = cls._from_json(entry)
    if isinstance(report.longrepr, list):  # a skip's (path, line, reason)
        report.longrepr = tuple(report.longrepr)
    if isinstance(getattr(report, "location", None), list):
        report.location = tuple(report.location)
    report.user_properties = [tuple(p) for p in report.user_properties] if hasattr(report, "user_properties") else []
    return report
