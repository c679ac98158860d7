"""Golden files: where they live, how they are read, compared and (only on request) written.

Layout, under ``--golden-dir``::

    <model>/tokenizer/<suite>/<check>.json                 tokenizer and chat template
    <model>/<device-class>/<variant>/<suite>/<check>.json  behaviour of a loaded variant

Each golden has a ``.meta.json`` sidecar with its provenance, shown on failure
and never compared. Nothing is written unless ``--snapshot-update`` is given; a
write goes to a temporary file that is renamed over the old one, so an
interrupted update leaves the previous golden intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CheckFailure, GoldenError
from harness.provenance import describe_changes

META_SUFFIX = ".meta.json"
TOKENIZER_SCOPE = "tokenizer"

Explain = Callable[[Any, Any], str]


def dumps(data: Any) -> str:
    """The one serialization of goldens: sorted keys, indent 2, UTF-8 text kept readable."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def normalize(data: Any) -> Any:
    """What the observation looks like once written and read back (tuples become lists)."""
    return json.loads(json.dumps(data, ensure_ascii=False))


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class GoldenStore:
    """All goldens of one model in one session, and what this session did to them."""

    root: Path
    model: str
    device_class: str
    update: bool
    provenance: dict[str, Any]
    obtained_dir: Path | None = None
    written: list[Path] = field(default_factory=list)
    updated: list[Path] = field(default_factory=list)
    used: set[Path] = field(default_factory=set)

    def path(self, *, suite: str, check_id: str, variant: str | None) -> Path:
        scope = [TOKENIZER_SCOPE] if variant is None else [self.device_class, variant]
        return self.root.joinpath(self.model, *scope, suite, f"{check_id}.json")

    def read(self, path: Path) -> Any | None:
        """The golden's data, None when missing; a corrupt file is a GoldenError, not a crash."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise GoldenError(f"Golden file {path} cannot be read: {exc}.") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise GoldenError(
                f"Golden file {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                f"{exc.msg}); it was truncated or edited by hand. Fix: restore it with "
                f"`git checkout -- {path}`, or re-record it with --snapshot-update and review the diff."
            ) from None

    def assert_matches(
        self, path: Path, actual: Any, *, explain: Explain, provenance_extra: dict[str, Any] | None = None
    ) -> None:
        """Compare ``actual`` with the golden at ``path``; fail with a reviewer's diff."""
        __tracebackhide__ = True
        self.used.add(path)
        actual = normalize(actual)
        try:
            expected = self.read(path)
        except GoldenError:
            if not self.update:
                raise
            expected = None
        if expected == actual:
            if self.update:
                self._refresh_meta(path, provenance_extra)
            return
        if self.update:
            self._write(path, actual, provenance_extra)
            return
        obtained = self._save_obtained(path, actual)
        if expected is None:
            raise CheckFailure(self._missing_message(path) + obtained)
        message = explain(expected, actual)
        raise CheckFailure(
            f"{message}\n{self._provenance_lines(path, provenance_extra)}golden: {path}\n{obtained}"
            "If this change is intended: review the diff, then update with --snapshot-update."
        )

    def _save_obtained(self, path: Path, actual: Any) -> str:
        """Outside the golden tree, what this run saw: for CI artifacts and side-by-side review."""
        if self.obtained_dir is None:
            return ""
        target = self.obtained_dir / path.relative_to(self.root)
        atomic_write(target, dumps(actual))
        return f"obtained: {target}\n"

    def _write(self, path: Path, data: Any, provenance_extra: dict[str, Any] | None) -> None:
        existed = path.exists()
        meta = {**self.provenance, **(provenance_extra or {})}
        atomic_write(path.with_name(path.stem + META_SUFFIX), dumps(meta))
        atomic_write(path, dumps(data))
        (self.updated if existed else self.written).append(path)

    def _refresh_meta(self, path: Path, provenance_extra: dict[str, Any] | None) -> None:
        """An unchanged golden re-recorded by a reviewer now vouches for the current model."""
        meta_path = path.with_name(path.stem + META_SUFFIX)
        meta = dumps({**self.provenance, **(provenance_extra or {})})
        try:
            if meta_path.read_text(encoding="utf-8") == meta:
                return
        except OSError:
            pass
        atomic_write(meta_path, meta)

    def _missing_message(self, path: Path) -> str:
        rel = path.relative_to(self.root)
        device_dir = self.root / self.model / self.device_class
        if rel.parts[1] != TOKENIZER_SCOPE and not device_dir.exists():
            return (
                f"No goldens are recorded for model {self.model!r} on device class "
                f"{self.device_class!r} ({device_dir} does not exist): greedy outputs differ "
                "legitimately between devices, so each device class has its own. Record them with "
                "--snapshot-update on this device and review them before committing."
            )
        return (
            f"Golden file {path} is missing; nothing was written. Record it with --snapshot-update "
            "and review it before committing."
        )

    def _provenance_lines(self, path: Path, extra: dict[str, Any] | None) -> str:
        meta_path = path.with_name(path.stem + META_SUFFIX)
        try:
            recorded = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return ""
        current = {**self.provenance, **(extra or {})}
        changes = describe_changes(recorded, current)
        if not changes:
            return ""
        culprit = [c for c in changes if "changed since" in c]
        head = (
            "The model (or adapter) changed since these goldens were recorded: review the diffs, "
            "then update with --snapshot-update.\n" if culprit else ""
        )
        return head + "".join(f"  provenance: {c}\n" for c in changes)
