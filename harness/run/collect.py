"""Collection: a YAML suite becomes one pytest item per check and variant.

Items are ``pytest.Function``s so that fixtures (``harness_session``,
``benchmark``) resolve; variants are expanded here, at collection time, and
each item reports the YAML line of its check.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.errors import SuiteError
from harness.run.session import harness_state
from harness.suites.spec import CheckEntry, SuiteSpec, load_suite
from harness.models.variants import VariantSpec
from harness.run.items import HarnessItem

def is_suite_file(path: Path, parent: pytest.Collector) -> bool:
    """Suites are YAML files under a ``suites`` folder of the project, named on the command line
    (the file, or a folder other than the rootdir), or matched by the ``harness_suites`` ini globs.

    Other YAML is never sniffed for ``checks:``: a plugin installed in a shared virtualenv
    must not turn another project's ``.codeclimate.yml`` into a failing suite.
    """
    if path.suffix not in (".yaml", ".yml"):
        return False
    if parent.session.isinitpath(path):
        return True
    config = parent.config
    if any(folder in path.parents for folder in _named_folders(config)):
        return True
    try:
        relative = path.relative_to(config.rootpath)
    except ValueError:
        return False
    if "suites" in relative.parts[:-1]:
        return True
    return any(fnmatch.fnmatch(relative.as_posix(), pattern) for pattern in config.getini("harness_suites"))


def _named_folders(config: pytest.Config) -> list[Path]:
    """Folders named on the command line (``pytest behaviour/``), except the rootdir and its parents:
    ``pytest .`` must not turn every YAML file of the project into a suite."""
    root = config.rootpath
    folders = []
    for arg in config.args:
        folder = (config.invocation_params.dir / arg.split("::")[0]).resolve()
        if folder.is_dir() and folder != root and folder not in root.parents:
            folders.append(folder)
    return folders


class SuiteFile(pytest.File):
    """One YAML suite; a bad suite is a collection error of this file only."""

    def collect(self) -> Iterator[pytest.Item]:
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
        judgeable = [v for v in variants if not type(check).unjudgeable(v.key)]
        selected = [v for v in judgeable if wanted is None or v.key in wanted]
        if not selected:
            self._note_unselected(entry, wanted or [v.key for v in variants if v not in judgeable], variants)
        for variant in selected:
            item = HarnessItem.from_parent(
                self, name=f"{check.spec.id}[{variant.key}]", callobj=_runner(suite, entry, variant),
                suite_line=entry.line,
            )
            item.harness_variant = variant
            yield item

    def _note_unselected(self, entry: CheckEntry, wanted: list[str], variants: list[VariantSpec]) -> None:
        """A check that no variant of this session runs is said out loud, never dropped in silence."""
        session = ", ".join(v.key for v in variants)
        check = entry.check
        kind_limit = [f"{key}: {why}" for key in wanted if (why := type(check).unjudgeable(key))]
        harness_state(self.config).unselected.append(
            f"{self.path.name}:{entry.line}: {check.spec.id}: its variants ({', '.join(wanted)}) are none "
            f"of this session's ({session}) that a {check.kind} check can judge"
            + (f" ({'; '.join(kind_limit)})" if kind_limit else "")
            + "; choose them with --variants (a -lora variant needs an adapter), or change the `variants:` "
            "of the check or its suite"
        )

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, SuiteError):
            harness_state(self.config).suite_errors += 1
            return str(excinfo.value)
        return super().repr_failure(excinfo)


def _runner(suite: SuiteSpec, entry: CheckEntry, variant: VariantSpec | None) -> Callable[..., None]:
    def harness_check(harness_session: Any, request: pytest.FixtureRequest) -> None:
        __tracebackhide__ = True
        harness_session.run_check(suite, entry, variant, request)

    return harness_check
