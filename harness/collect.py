"""Collection: a YAML suite becomes one pytest item per check and variant.

Items are ``pytest.Function``s so that fixtures (``harness_session``,
``benchmark``) resolve; variants are expanded here, at collection time, and
each item reports the YAML line of its check.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.errors import CheckFailure, HarnessError, SuiteError
from harness.spec import CheckEntry, SuiteSpec, load_suite
from harness.variants import RUN_ORDER, VariantSpec

_CHECKS_LINE = re.compile(r"^checks\s*:", re.MULTILINE)


def is_suite_file(path: Path, parent: pytest.Collector) -> bool:
    """Suites are YAML files under a ``suites`` folder, named on the command line, or with ``checks:``."""
    if path.suffix not in (".yaml", ".yml"):
        return False
    if "suites" in path.parts[:-1] or parent.session.isinitpath(path):
        return True
    try:
        return bool(_CHECKS_LINE.search(path.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


class SuiteFile(pytest.File):
    """One YAML suite; a bad suite is a collection error of this file only."""

    def collect(self) -> Iterator[pytest.Item]:
        from harness.plugin import harness_state

        suite = load_suite(self.path)
        state = harness_state(self.config)
        state.suite_names.claim(suite.name, self.path)
        for entry in suite.checks:
            yield from self._items(suite, entry, state.variants)

    def _items(self, suite: SuiteSpec, entry: CheckEntry, variants: list[VariantSpec]) -> Iterator[pytest.Item]:
        check = entry.check
        if not check.per_variant:
            yield HarnessItem.from_parent(
                self, name=check.spec.id, callobj=_runner(suite, entry, None), suite_line=entry.line
            )
            return
        wanted = check.spec.variants
        for variant in variants:
            if wanted is not None and variant.key not in wanted:
                continue
            item = HarnessItem.from_parent(
                self, name=f"{check.spec.id}[{variant.key}]", callobj=_runner(suite, entry, variant),
                suite_line=entry.line,
            )
            item.harness_variant = variant
            yield item

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, SuiteError):
            from harness.plugin import harness_state

            harness_state(self.config).suite_errors += 1
            return str(excinfo.value)
        return super().repr_failure(excinfo)


class HarnessItem(pytest.Function):
    """A check × variant; failures show the harness's message, not its stack."""

    harness_variant: VariantSpec | None = None

    def __init__(self, *args: Any, suite_line: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.suite_line = suite_line
        self.add_marker(pytest.mark.harness)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.suite_line - 1, self.name

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, (CheckFailure, HarnessError)):
            return f"{self.path.name}:{self.suite_line}: {self.name}\n{excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    @property
    def run_order(self) -> int:
        """Model-level items first, then variants in the pool's order, so each loads once."""
        if self.harness_variant is None:
            return -1
        return RUN_ORDER.index(self.harness_variant.key)


def _runner(suite: SuiteSpec, entry: CheckEntry, variant: VariantSpec | None) -> Callable[..., None]:
    def harness_check(harness_session: Any, request: pytest.FixtureRequest) -> None:
        __tracebackhide__ = True
        harness_session.run_check(suite, entry, variant, request)

    return harness_check
