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
# ``judge(expected, actual) -> bool``: the same behaviour up to noise (default: equal after JSON round trip)
Judge = Callable[[Any, Any], bool]


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
    judge_device: str | None = None  # --golden-device: a class (or "auto") to judge against where this one has none

    def judged_against(self) -> str | None:
        """The other device class whose goldens this run reads, or None (this class's own).

        Only when asked for, only where this device class has no goldens of its
        own for this model, and never while updating: an update writes this class.
        """
        if self.judge_device is None or self.update or (self.root / self.model / self.device_class).is_dir():
            return None
        classes = sorted(p.name for p in (self.root / self.model).glob("*")
                         if p.is_dir() and p.name not in (TOKENIZER_SCOPE, self.device_class))
        if self.judge_device != "auto":
            return self.judge_device if self.judge_device in classes else None
        return nearest_class(self.device_class, classes)

    def reference(self, path: Path) -> Path:
        """The golden a comparison reads for ``path``: its own, or the judged-against class's."""
        other = self.judged_against()
        rel = path.relative_to(self.root).parts
        if other is None or len(rel) < 2 or rel[1] != self.device_class:
            return path
        return self.root.joinpath(rel[0], other, *rel[2:])

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
        self, path: Path, actual: Any, *, explain: Explain, provenance_extra: dict[str, Any] | None = None,
        judge: Judge | None = None,
    ) -> None:
        """Compare ``actual`` with the golden at ``path``; fail with a reviewer's diff.

        ``judge`` lets a kind accept numerical noise (see ``harness.compare``);
        an update rewrites a golden only where the judge says the behaviour changed.
        """
        __tracebackhide__ = True
        self.used.add(path)
        actual = normalize(actual)
        source = self.reference(path)
        try:
            expected = self.read(source)
        except GoldenError:
            if not self.update:
                raise
            expected = None
        if expected is not None and (judge(expected, actual) if judge is not None else expected == actual):
            if self.update:
                self._refresh_meta(path, provenance_extra)
            return
        if self.update:
            self._write(path, actual, provenance_extra)
            return
        obtained = self._save_obtained(path, actual)
        if expected is None:
            if source != path:
                raise CheckFailure(
                    f"Golden file {source} is missing (judged against {self.judged_against()} goldens, since "
                    f"device class {self.device_class!r} has none); nothing was written. Record this device "
                    "class's own goldens with --snapshot-update and review them.\n" + obtained)
            raise CheckFailure(self._missing_message(path) + obtained)
        message = explain(expected, actual)
        judged = "" if source == path else f" (judged against {self.judged_against()} goldens)"
        raise CheckFailure(
            f"{message}\n{self._provenance_lines(source, provenance_extra)}golden{judged}: {source}\n{obtained}"
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
            others = sorted(p.name for p in (self.root / self.model).glob("*")
                            if p.is_dir() and p.name not in (TOKENIZER_SCOPE, self.device_class))
            if self.judge_device is not None and not self.update:
                cross = (f" --golden-device {self.judge_device}: no goldens of that class either (recorded "
                         f"classes: {', '.join(others) or 'none'}).")
            else:
                cross = (f" Or judge against another class's goldens with cross-device tolerances: "
                         f"--golden-device {others[0] if len(others) == 1 else 'auto'} (recorded: "
                         f"{', '.join(others)})." if others else "")
            return (
                f"No goldens are recorded for model {self.model!r} on device class "
                f"{self.device_class!r} ({device_dir} does not exist): greedy outputs differ "
                "legitimately between devices, so each device class has its own. Record them with "
                "--snapshot-update on this device and review them before committing." + cross
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


def nearest_class(device_class: str, classes: list[str]) -> str | None:
    """The recorded class closest to ``device_class``: a CUDA class with the nearest compute capability, else cpu."""
    def capability(name: str) -> int | None:
        digits = name.removeprefix("cuda-sm")
        return int(digits) if name.startswith("cuda-sm") and digits.isdigit() else None

    mine = capability(device_class)
    cuda = [c for c in classes if capability(c) is not None]
    if mine is not None and cuda:
        return min(cuda, key=lambda c: (abs(capability(c) - mine), c))  # type: ignore[operator]
    if "cpu" in classes:
        return "cpu"
    return cuda[0] if cuda else (classes[0] if classes else None)


def name_is_safe(name: str) -> bool:
    """A single folder name of the golden tree (no separators, no '..')."""
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name)) and ".." not in name
