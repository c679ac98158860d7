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

from harness.errors import CheckFailure


@dataclass
class Recorder:
    """Stands in for the golden store on the reference run: records, never compares, never writes."""

    records: dict[Path, Any] = field(default_factory=dict)
    update: bool = False

    def judged_against(self) -> str | None:
        return None

    def assert_matches(self, path: Path, actual: Any, **_: Any) -> None:
        from harness.golden import normalize

        self.records[path] = normalize(actual)


@dataclass
class LiveReference:
    """Stands in for the golden store on the run under test: OLD's live record is the golden."""

    records: dict[Path, Any]
    label: str  # "NEW vs OLD"
    update: bool = False

    def judged_against(self) -> str | None:
        return None

    def assert_matches(self, path: Path, actual: Any, *, explain: Callable[[Any, Any], str],
                       judge: Callable[[Any, Any], bool] | None = None, **_: Any) -> None:
        __tracebackhide__ = True
        from harness.golden import normalize

        actual = normalize(actual)
        if path not in self.records:
            raise CheckFailure(f"{self.label}: the reference run recorded nothing for this check, so it was not "
                               "judged. Fix: run it without --reference, or report this as a harness bug.")
        expected = self.records[path]
        if judge(expected, actual) if judge is not None else expected == actual:
            return
        raise CheckFailure(f"{self.label}: {explain(expected, actual)}\n"
                           "reference: a live run of the reference model in this session (same variant and "
                           "device), not a golden file. If this change is intended, re-record the goldens "
                           "with the new model (--snapshot-update) and review them.")
