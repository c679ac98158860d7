"""Reference mode: golden-style checks judged against a live run of a reference model.

``pytest suites/ --model NEW --reference OLD`` runs each golden-style check twice in
the same session, on the same device and variant: first on OLD with a
``Recorder`` in place of the golden store (it keeps what the check would have
written), then on NEW with a ``LiveReference`` that serves OLD's record as the
golden. The check's own judge (the noise-aware comparison of ``harness.compare``)
decides, exactly as it does against a golden file; nothing is read from or
written to ``golden/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.compare import Sides
from harness.errors import CheckFailure


def reference_sides(*, new: str, old: str) -> Sides:
    """How the engine names the two runs in reference mode."""
    return Sides(expected=f"OLD ({old})", actual=f"NEW ({new})", expected_short="OLD", actual_short="NEW")


@dataclass
class _LiveStore:
    """What a check asks of its golden store, without a golden folder: records are keyed, never files."""

    update: bool = False

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
