"""The harness's items and the one rule for an item's variant.

Ordering (the plugin) and sharding (``run.shard``) both ask which variant an item runs in;
they ask here, so they cannot disagree, and neither needs the collector (which needs the session).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.errors import CheckFailure, HarnessError
from harness.models.variants import RUN_ORDER, VariantSpec
from harness.report.display import relative_paths


class HarnessItem(pytest.Function):
    """A check × variant; failures show the harness's message, not its stack."""

    harness_variant: VariantSpec | None = None

    def __init__(self, *args: Any, suite_line: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.suite_line = suite_line
        self.add_marker(pytest.mark.harness)

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, self.suite_line - 1, self.name

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> Any:  # type: ignore[override]
        """Harness errors show their message (paths relative to the rootdir, as in the reports);
        anything else is this item's failure with its traceback.

        The session goes on either way: an unexpected exception (a library's, or the harness's
        own bug) must never escape as an INTERNALERROR that hides it and stops every other item.
        """
        header = f"{self.path.name}:{self.suite_line}: {self.name}"
        if isinstance(excinfo.value, (CheckFailure, HarnessError)):
            return f"{header}\n{relative_paths(str(excinfo.value), self.config.rootpath)}"
        try:
            shown = str(super().repr_failure(excinfo))
        except Exception:  # noqa: BLE001 - never let reporting a failure become an INTERNALERROR
            import traceback

            shown = "".join(traceback.format_exception(excinfo.value))
        return (f"{header}\nunexpected {excinfo.exconly()} (a harness bug, or an input the harness does not "
                f"validate yet; the traceback below shows where)\n{shown}")


def item_variant(item: pytest.Item) -> VariantSpec | None:
    """The variant ``item`` runs in: a harness item's own, or an ordinary test's ``variant`` parameter.

    None for a model-level harness item (tokenizer, chat template) and for a test without one;
    a user's own ``variant`` parameter that is no VariantSpec is not the harness's.
    """
    if isinstance(item, HarnessItem):
        return item.harness_variant
    spec = getattr(getattr(item, "callspec", None), "params", {}).get("variant")
    return spec if isinstance(spec, VariantSpec) else None


def run_order(item: pytest.Item) -> int:
    """Where ``item`` runs: other tests, then model-level harness items, then variants in the pool's
    order, so each variant loads once."""
    variant = item_variant(item)
    if variant is not None:
        return RUN_ORDER.index(variant.key)
    return -1 if isinstance(item, HarnessItem) else -2
