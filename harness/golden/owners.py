"""Which suite file owns a suite name's golden folder, across runs.

A session sees two suite files that declare one ``suite:`` name (``layout.SuiteNames``);
separate runs do not. Each sidecar records the suite file of its check (``suite_file``,
relative to the rootdir), so a second file that declares the same name is an error naming
both, before it rewrites (or is judged against) the first file's goldens. A file that was
moved or renamed, or now declares another name, no longer owns the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import GoldenError, SuiteError
from harness.suites.names import META_SUFFIX

OWNER_KEY = "suite_file"


def owner_key(suite_file: Path, rootdir: Path | None) -> str:
    """How a sidecar names a suite file: relative to the rootdir where it lies below it."""
    if rootdir is not None:
        try:
            return suite_file.resolve().relative_to(rootdir.resolve()).as_posix()
        except ValueError:
            pass
    return str(suite_file.resolve())


@dataclass
class SuiteOwners:
    """The owners recorded in each suite folder's sidecars, read once per folder and session."""

    rootdir: Path | None = None
    _recorded: dict[Path, dict[str, str]] = field(default_factory=dict)

    def check(self, golden: Path, owner: str, *, update: bool) -> None:
        """A GoldenError when ``golden``'s suite folder belongs to another suite file that still declares its name."""
        folder = golden.parent
        for other, sidecar in self._owners(folder).items():
            if other != owner and self._declares(other, folder.name):
                raise GoldenError(
                    f"The golden folder {folder} belongs to suite file {other} (its sidecar {sidecar} records it), "
                    f"and {owner} declares the same suite name {folder.name!r}: "
                    f"{'updating would rewrite' if update else 'judging would compare this file with'} the other "
                    f"file's goldens. Fix: give one of the two files its own `suite:` name (if {owner} replaces "
                    f"{other}, delete {other} or rename its suite, then record with --snapshot-update)."
                )

    def _owners(self, folder: Path) -> dict[str, str]:
        if folder not in self._recorded:
            owners: dict[str, str] = {}
            for sidecar in sorted(folder.glob(f"*{META_SUFFIX}")) if folder.is_dir() else []:
                try:
                    recorded = json.loads(sidecar.read_text(encoding="utf-8")).get(OWNER_KEY)
                except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                    continue
                if isinstance(recorded, str):
                    owners.setdefault(recorded, sidecar.name)
            self._recorded[folder] = owners
        return self._recorded[folder]

    def _declares(self, suite_file: str, name: str) -> bool:
        """Whether ``suite_file`` still exists and declares suite ``name`` (a moved or renamed file does not)."""
        from harness.suites.yamlload import load_yaml

        file = Path(suite_file)
        if not file.is_absolute() and self.rootdir is not None:
            file = self.rootdir / file
        if not file.is_file():
            return False
        try:
            data = load_yaml(file, what="suite")
        except SuiteError:
            return True  # it exists; unreadable now, it may still claim the name
        declared = data.get("suite", file.stem) if isinstance(data, dict) else file.stem
        return str(declared).casefold() == name.casefold()
