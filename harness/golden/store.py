"""The golden store: goldens are read, compared and (only on ``--snapshot-update``) written here.

Nothing is written unless an update is asked for, and never outside the golden folder
(``layout``). An update writes data before sidecar (``files``, ``sidecars``), so an
interrupted update leaves the previous golden intact and at worst a sidecar that is
reported as stale.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CheckFailure, GoldenError
from harness.golden.files import atomic_write, dumps, normalize, sha256_text, write_error
from harness.golden.layout import TOKENIZER_SCOPE, contained, golden_path, meta_path, nearest_class, overlap_problem
from harness.golden.mismatch import Explain, explained, shape_problem
from harness.golden.owners import OWNER_KEY, SuiteOwners, owner_key
from harness.golden.sidecars import SHA_KEY, provenance_lines, trust_problem, with_record_hashes

# ``judge(expected, actual) -> bool``: the same behaviour up to noise (default: equal after JSON round trip)
Judge = Callable[[Any, Any], bool]


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
    rootdir: Path | None = None  # suite files are recorded relative to it
    gate: bool = False  # CI: a golden its sidecar does not vouch for fails instead of being judged
    owners: SuiteOwners = field(init=False)

    def __post_init__(self) -> None:
        self.owners = SuiteOwners(rootdir=self.rootdir)

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

    def sidecar_of(self, path: Path) -> Path | None:
        """The sidecar a comparison of ``path`` reads recorded extras from (a fingerprint)."""
        return meta_path(self.reference(path))

    def peek(self, path: Path) -> Any | None:
        """The data a comparison of ``path`` will read, None where there is none or it cannot be read.

        For a kind that can judge faster when it knows the golden first (greedy scores the
        golden's own path); ``assert_matches`` still reads it again and names any problem.
        """
        try:
            return self.read(contained(self.root, self.reference(path)))
        except GoldenError:
            return None

    def path(self, *, suite: str, check_id: str, variant: str | None) -> Path:
        return golden_path(self.root, model=self.model, device_class=self.device_class, variant=variant,
                           suite=suite, check_id=check_id)

    def read(self, path: Path) -> Any | None:
        """The golden's data, None when missing; a corrupt file is a GoldenError, not a crash."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except IsADirectoryError:
            raise GoldenError(
                f"Golden file {path} is a folder, not a file. Fix: move the folder away (a golden is "
                "one JSON file), then record the golden with --snapshot-update."
            ) from None
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
        judge: Judge | None = None, sidecar: dict[str, Any] | None = None, owner: Path | None = None,
    ) -> None:
        """Compare ``actual`` with the golden at ``path``; fail with a reviewer's diff.

        ``judge`` lets a kind accept numerical noise (see ``harness.judge.compare``);
        an update rewrites a golden only where the judge says the behaviour changed.
        ``sidecar``: data an update keeps next to the golden, not compared (an activation
        fingerprint); written with the golden, or into the sidecar of an unchanged one.
        ``owner``: the suite file of the check, recorded in the sidecar (``owners``).
        """
        __tracebackhide__ = True
        contained(self.root, path)
        self.used.add(path)
        if owner is not None:
            key = owner_key(owner, self.rootdir)
            provenance_extra = {**(provenance_extra or {}), OWNER_KEY: key}
            self.owners.check(path, key, update=self.update)
        actual = normalize(actual)
        source = contained(self.root, self.reference(path))
        try:
            expected = self.read(source)
        except GoldenError:
            if not self.update:
                raise
            expected = None
        if expected is not None and self.gate and not self.update:
            untrusted = trust_problem(source)
            if untrusted:
                raise GoldenError(
                    f"Golden file {source} is not vouched for, so this gate run does not judge against it: "
                    f"{untrusted}. A golden copied in by hand (from --harness-obtained, another checkout, an "
                    "editor) would make any output pass. Fix: record goldens with --snapshot-update, which writes "
                    "each golden with its sidecar, review and commit both; or restore both from version control."
                )
        if expected is not None and (judge(expected, actual) if judge is not None else expected == actual):
            if self.update:
                self._refresh_meta(path, provenance_extra, sidecar)
            return
        if self.update:
            self._write(path, actual, provenance_extra, sidecar)
            return
        obtained = self._save_obtained(path, actual)
        if expected is None:
            if source != path:
                raise CheckFailure(
                    f"Golden file {source} is missing (judged against {self.judged_against()} goldens, since "
                    f"device class {self.device_class!r} has none); nothing was written. Record this device "
                    "class's own goldens with --snapshot-update and review them.\n" + obtained)
            raise CheckFailure(self._missing_message(path) + obtained)
        damaged = shape_problem(expected, actual)
        if damaged:
            raise GoldenError(
                f"Golden file {source} does not have the layout this check records: {damaged}. It was "
                "edited by hand or written by another version of the harness. Fix: restore it with "
                f"`git checkout -- {source}`, or re-record it with --snapshot-update and review the diff.\n"
                + obtained
            )
        message = explained(explain, expected, actual)
        judged = "" if source == path else f" (judged against {self.judged_against()} goldens)"
        raise CheckFailure(
            f"{message}\n{self._provenance_lines(source, provenance_extra)}golden{judged}: {source}\n{obtained}"
            "If this change is intended: review the diff, then update with --snapshot-update."
        )

    def _save_obtained(self, path: Path, actual: Any) -> str:
        """Outside the golden tree, what this run saw: for CI artifacts and side-by-side review."""
        if self.obtained_dir is None:
            return ""
        problem = overlap_problem(self.root, self.obtained_dir)
        if problem:
            raise GoldenError(problem)
        target = contained(self.obtained_dir, self.obtained_dir / path.relative_to(self.root))
        try:
            atomic_write(target, dumps(actual))
        except OSError as exc:
            return f"obtained: not saved ({write_error(target, exc, what='obtained file', intact='')})\n"
        return f"obtained: {target}\n"

    def _write(self, path: Path, data: Any, provenance_extra: dict[str, Any] | None,
               sidecar: dict[str, Any] | None = None) -> None:
        """Data first, then the sidecar that names its sha256: a sidecar never vouches for an unwritten golden."""
        text = dumps(data)
        existed = os.path.isfile(path)
        self._write_file(path, text, what="golden", intact=(
            "The previous golden is intact." if existed else "Nothing was written."))
        (self.updated if existed else self.written).append(path)
        self._write_file(meta_path(path), self._meta(sha256_text(text), provenance_extra, sidecar),
                         what="golden sidecar", intact=(
            f"The golden {path.name} was written; its sidecar now names another version of it and is "
            "reported as stale."))

    def _write_file(self, path: Path, text: str, *, what: str, intact: str) -> None:
        contained(self.root, path)
        if os.path.isdir(path):
            raise write_error(path, IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR)),
                              what=what, intact=intact)
        try:
            atomic_write(path, text)
        except OSError as exc:
            raise write_error(path, exc, what=what, intact=intact) from None

    def _meta(self, golden_sha: str, provenance_extra: dict[str, Any] | None,
              sidecar: dict[str, Any] | None = None) -> str:
        return dumps(with_record_hashes({**(sidecar or {}), **self.provenance, **(provenance_extra or {}),
                                         SHA_KEY: golden_sha}))

    def _refresh_meta(self, path: Path, provenance_extra: dict[str, Any] | None,
                      sidecar: dict[str, Any] | None = None) -> None:
        """An unchanged golden re-recorded by a reviewer now vouches for the current model
        (and gains the kind's sidecar data, such as a fingerprint, without its data changing)."""
        meta_file = meta_path(path)
        meta = self._meta(hashlib.sha256(path.read_bytes()).hexdigest(), provenance_extra, sidecar)
        try:
            if meta_file.read_text(encoding="utf-8") == meta:
                return
        except (OSError, UnicodeDecodeError):
            pass
        self._write_file(meta_file, meta, what="golden sidecar", intact="The golden itself is unchanged.")

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
        return provenance_lines(path, {**self.provenance, **(extra or {})})
