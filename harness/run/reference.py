"""Reference mode: every check judged against a live run of a reference model (OLD).

``pytest suites/ --model NEW --reference OLD`` runs each check on OLD and on NEW in
the same session, on the same device and variant, and judges NEW against OLD:

- golden-style checks (``uses_goldens``) run first on OLD with a ``Recorder`` in
  place of the golden store (it keeps what the check would have written), then on
  NEW with a ``LiveReference`` that serves OLD's record as the golden; the check's
  own judge (the noise-aware comparison of ``harness.judge.compare``) decides, exactly as
  against a golden file (``judge_against_record``);
- self-consistency checks (padding, cache, kernels, batch, merge, save/reload) and
  greedy expectations run on both; NEW's verdict stands and a failure says whether
  OLD held (``run_on_both``): "passed on OLD" is a regression of this update;
- kinds whose verdict is a figure (memory, throughput, drift, sampled
  expectations) override ``Check.run_against_reference`` and compare NEW's
  figures with OLD's, measured in the same session.

Nothing is read from or written to ``golden/``. What cannot be judged is NOT
JUDGED (red in a gate run), never a plain skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from harness.judge.compare import Sides
from harness.errors import CheckFailure

if TYPE_CHECKING:
    from harness.checks.base import Check, CheckContext
    from harness.models.registry import ModelEntry


def reference_sides(*, new: str, old: str) -> Sides:
    """How the engine names the two runs in reference mode."""
    return Sides(expected=f"OLD ({old})", actual=f"NEW ({new})", expected_short="OLD", actual_short="NEW")


def pick_reference_adapter(*, option: str | None, old: ModelEntry | None, new: Path | None) -> tuple[str | None, bool]:
    """The adapter OLD's ``-lora`` variants load over its registry one (None: its own, if any), and whether it
    is NEW's: ``--reference-adapter``, else OLD's registry ``adapter:``, else NEW's, so that an OLD folder or
    an adapter-less entry is still judged in ``-lora`` variants. Options and the registry alone decide, so an
    xdist controller (which loads no model) says what its workers load."""
    if option is not None or (old is not None and old.adapter) or new is None:
        return option, False
    return str(new), True


def borrowed_adapter_line(adapter: str, *, old: str, rootdir: Path) -> str:
    """The terminal summary's and the report's line when OLD runs ``-lora`` variants with NEW's adapter."""
    from harness.report.display import shown_path

    return (f"reference side uses NEW's adapter {shown_path(adapter, rootdir)} (OLD {old} has none of its own; "
            "--reference-adapter PATH gives it one)")


@dataclass
class _LiveStore:
    """What a check asks of its golden store, without a golden folder: records are keyed, never files."""

    update: bool = False
    # a live record has no sidecar and no recorded noise: nothing a gate could refuse to trust, so the
    # built-in rules judge it in a gate run as elsewhere
    gate: bool = False

    def judged_against(self) -> str | None:
        return None

    def path(self, *, suite: str, check_id: str, variant: str | None) -> Path:
        return Path(suite, variant or "tokenizer", check_id)

    def reference(self, path: Path) -> Path:
        return path

    def sidecar_of(self, path: Path) -> Path | None:
        return None  # a live record has no sidecar: nothing recorded to localize against

    def peek(self, path: Path) -> Any | None:
        return None


@dataclass(kw_only=True)
class Recorder(_LiveStore):
    """Stands in for the golden store on the reference run: records, never compares, never writes."""

    records: dict[Path, Any] = field(default_factory=dict)

    def assert_matches(self, path: Path, actual: Any, **_: Any) -> None:
        from harness.golden import normalize

        self.records[path] = normalize(actual)


@dataclass(kw_only=True)
class LiveReference(_LiveStore):
    """Stands in for the golden store on the run under test: OLD's live record is the golden."""

    records: dict[Path, Any] = field(default_factory=dict)
    label: str = "NEW vs OLD"
    old: str = "OLD"

    def peek(self, path: Path) -> Any | None:
        """OLD's live record: NEW scores OLD's path in one pass where it prefers every token of it."""
        return self.records.get(path)

    def assert_matches(self, path: Path, actual: Any, *, explain: Callable[[Any, Any], str],
                       judge: Callable[[Any, Any], bool] | None = None, **_: Any) -> None:
        __tracebackhide__ = True
        from harness.golden import describe_difference, normalize

        actual = normalize(actual)
        if path not in self.records:
            raise CheckFailure(f"{self.label}: the reference run recorded nothing for this check, so it was not "
                               "judged. Fix: run it without --reference, or report this as a harness bug.")
        expected = self.records[path]
        if judge(expected, actual) if judge is not None else expected == actual:
            return
        message = explain(expected, actual).strip() or describe_difference(expected, actual)
        raise CheckFailure(f"{self.label}: {message}\n"
                           f"reference: a live run of {self.old} in this session (same variant and device), "
                           "not a golden file; nothing under golden/ was read or written. If this change is "
                           "intended, re-record the goldens with the new model (--snapshot-update) and review "
                           "them.")


@dataclass
class ReferencePair:
    """One item in reference mode: the check's context on OLD and on NEW (same variant and device).

    It is the ``harness.checks.base.ReferenceRun`` that checks see: they reach this module only
    through it, so the run depends on checks and never the other way.
    """

    old: CheckContext
    new: CheckContext

    @property
    def sides(self) -> Sides:
        return self.new.sides

    @property
    def label(self) -> str:
        return f"{self.sides.actual} vs {self.sides.expected}"

    def on_old(self, *, alone: bool = False) -> CheckContext:
        """OLD's context, NEW's model freed where both do not fit (``alone``: freed in any case)."""
        _room(self.new, alone=alone)
        return self.old

    def on_new(self, *, alone: bool = False) -> CheckContext:
        """NEW's context, OLD's model freed where both do not fit (``alone``: freed in any case)."""
        _room(self.old, alone=alone)
        return self.new

    def judge_against_record(self, check: Check[Any]) -> None:
        __tracebackhide__ = True
        judge_against_record(check, self)

    def run_on_both(self, check: Check[Any]) -> None:
        __tracebackhide__ = True
        run_on_both(check, self)


def _room(other: CheckContext, *, alone: bool) -> None:
    from harness.models.pool import make_room

    if alone:
        other.pool.release()  # a peak measured beside the other model would count it
    else:
        make_room(other.pool)


@dataclass(frozen=True)
class OldOutcome:
    """What the check said on OLD, for the line that puts NEW's verdict in context."""

    status: Literal["passed", "failed", "not judged"]
    message: str = ""

    @property
    def first_line(self) -> str:
        lines = [line.strip() for line in self.message.splitlines() if line.strip()]
        text = lines[0] if lines else ""
        return text if len(text) <= 200 else text[:197] + "..."


def outcome_on_old(check: Check[Any], pair: ReferencePair) -> OldOutcome:
    """Run ``check`` on OLD and keep its verdict instead of raising it."""
    import pytest

    from harness.errors import HarnessError, NotJudged

    try:
        check.run(pair.on_old())
    except NotJudged as exc:
        return OldOutcome("not judged", str(exc))
    except pytest.skip.Exception as exc:
        return OldOutcome("not judged", exc.msg)
    except (CheckFailure, HarnessError) as exc:  # VariantUnavailable, a load error: OLD did not hold it either
        return OldOutcome("failed", str(exc))
    except Exception as exc:  # noqa: BLE001 - OLD's crash is context for NEW's verdict, not this item's error
        return OldOutcome("failed", f"unexpected {type(exc).__name__}: {exc}")
    return OldOutcome("passed")


def run_on_both(check: Check[Any], pair: ReferencePair) -> None:
    """A property of the model itself (consistency, padding, a greedy expectation): judged on NEW, and a
    failure says whether OLD held it (a regression of this update) or failed it too."""
    __tracebackhide__ = True
    old = outcome_on_old(check, pair)
    new = pair.on_new()
    try:
        check.run(new)
    except CheckFailure as exc:
        raise CheckFailure(f"{pair.label}: {versus_old(old, pair.sides)}\n{exc}") from None
    if old.status != "passed":
        new.note(f"{new.subject}: {pair.sides.actual} passes; on {pair.sides.expected} it {old.status}: "
                 f"{old.first_line}")


def versus_old(old: OldOutcome, sides: Sides) -> str:
    """The line that says what NEW's failure means for this update."""
    if old.status == "passed":
        return (f"fails on {sides.actual_short} and passed on {sides.expected}: a regression of this update")
    if old.status == "failed":
        return (f"fails on {sides.actual_short}, and on {sides.expected} too (not introduced by this update, "
                f"but {sides.actual_short} does not hold it either); {sides.expected_short}: {old.first_line}")
    return f"fails on {sides.actual_short}; on {sides.expected} it was not judged ({old.first_line})"


def judge_against_record(check: Check[Any], pair: ReferencePair) -> None:
    """A golden-style check: OLD's observation, recorded in memory, is NEW's golden."""
    __tracebackhide__ = True
    import pytest

    from harness.errors import HarnessError, NotJudged
    from harness.models.pool import VariantUnavailable

    old = pair.on_old()
    try:
        check.run(old)
    except (NotJudged, VariantUnavailable):
        raise
    except pytest.skip.Exception as exc:
        raise NotJudged(f"the reference run {old.sides.expected} skipped this check ({exc.msg}), so "
                        f"{old.sides.actual} was not judged") from None
    except (CheckFailure, HarnessError) as exc:
        raise CheckFailure(f"the reference run {old.sides.expected} failed, so {old.sides.actual} was not "
                           f"judged against it: {exc}") from None
    check.run(pair.on_new())
