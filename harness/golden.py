"""Golden files: where they live, how they are read, compared and (only on request) written.

Layout, under ``--golden-dir``::

    <model>/tokenizer/<suite>/<check>.json                 tokenizer and chat template
    <model>/<device-class>/<variant>/<suite>/<check>.json  behaviour of a loaded variant

Each golden has a ``.meta.json`` sidecar with its provenance and the sha256 of
the golden it describes, shown on failure and never compared. Nothing is written
unless ``--snapshot-update`` is given, and never outside the golden folder. A
write goes to a temporary file that is renamed over the old one, data before
sidecar, so an interrupted update leaves the previous golden intact and at worst
a sidecar that is reported as stale.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CheckFailure, GoldenError, SuiteError
from harness.provenance import describe_changes

META_SUFFIX = ".meta.json"
TOKENIZER_SCOPE = "tokenizer"
SHA_KEY = "golden_sha256"
# a model, suite or check name becomes one path component: no separators, no "..", no leading dot
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# ".<name>.<8 random characters>.tmp", what atomic_write leaves behind when killed
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")

Explain = Callable[[Any, Any], str]
# ``judge(expected, actual) -> bool``: the same behaviour up to noise (default: equal after JSON round trip)
Judge = Callable[[Any, Any], bool]


def dumps(data: Any) -> str:
    """The one serialization of goldens: sorted keys, indent 2, UTF-8 text kept readable."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def normalize(data: Any) -> Any:
    """What the observation looks like once written and read back (tuples become lists)."""
    return json.loads(json.dumps(data, ensure_ascii=False))


def meta_path(path: Path) -> Path:
    return path.with_name(path.stem + META_SUFFIX)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- names and places: a golden is never read or written outside the golden folder ---------------
def name_problem(name: str) -> str | None:
    """Why ``name`` (model, suite) cannot be one folder of the golden tree, or None."""
    if not SAFE_NAME.fullmatch(name):
        return ("it names a folder of the golden tree, so it must start with a letter or digit and use "
                "only letters, digits, '-', '_' and '.' (no '/', no '..')")
    return None


def check_id_problem(check_id: str) -> str | None:
    """Why a check id cannot name a golden file, or None (the character set is the spec's rule)."""
    stem = META_SUFFIX.removesuffix(".json")
    if check_id.casefold().endswith(stem):
        base = check_id[: -len(stem)]
        return (f"an id ending in {stem!r} names the file that holds the provenance sidecar of a check "
                f"{base!r} ({base}{META_SUFFIX}), so the two would overwrite each other")
    return None


def contained(root: Path, path: Path) -> Path:
    """``path``, if it resolves (symlinks followed) inside ``root``; a GoldenError otherwise."""
    real_root, real = root.resolve(), path.resolve()
    if real != real_root and real_root not in real.parents:
        raise GoldenError(
            f"Refusing to use golden path {path}: it resolves to {real}, outside the golden folder "
            f"{real_root} (through a symlink, or a model, suite or check name with '/' or '..'). "
            "Goldens are only read and written inside --golden-dir. Fix: replace the symlink with a "
            "real folder inside the golden folder, or rename the model, suite or check."
        )
    return path


def overlap_problem(golden_dir: Path, obtained_dir: Path) -> str | None:
    """Why ``--harness-obtained`` may not be used with this golden folder, or None."""
    golden, obtained = golden_dir.resolve(), obtained_dir.resolve()
    if golden == obtained or golden in obtained.parents or obtained in golden.parents:
        where = "is" if golden == obtained else ("is inside" if golden in obtained.parents else "contains")
        return (
            f"--harness-obtained {obtained_dir} {where} the golden folder {golden}: a failing run would "
            "write what it obtained over the goldens, and the next run would pass. Fix: give a folder "
            "outside the golden folder, such as obtained/ next to it."
        )
    return None


@dataclass
class SuiteNames:
    """Suite names key golden folders: two suite files in one session may not share one."""

    files: dict[str, Path] = field(default_factory=dict)

    def claim(self, name: str, path: Path) -> None:
        key = name.casefold()  # macOS and Windows file systems ignore case
        first = self.files.setdefault(key, path)
        if first.resolve() != path.resolve():
            raise SuiteError(
                path, f"suite name {name!r} is also used by {first}: suites keep their goldens in a "
                "folder named after the suite (names that differ only by case included), so the two "
                "would read and overwrite each other's goldens", key="suite",
                hint="give one of them its own `suite:` name",
            )


# -- writing: atomic, with the mode a plain write would give, errors that say what to do ---------
def _new_file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, text: str) -> None:
    """Temp file + rename: a reader (or a kill) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = _new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            os.fchmod(fh.fileno(), mode)  # mkstemp creates 0600 whatever the umask
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_WRITE_HINTS = {
    errno.ENOSPC: "free space on that disk, then run the update again",
    errno.EDQUOT: "free space within your quota, then run the update again",
    errno.EROFS: "the file system is read-only: update goldens in a writable checkout",
    errno.EACCES: "make the golden folder writable for this user",
    errno.EPERM: "make the golden folder writable for this user",
    errno.ENAMETOOLONG: "shorten the check id (or suite or model name): it names the golden file",
    errno.EISDIR: "a folder stands where the golden file belongs: remove or rename it",
    errno.ENOTDIR: "a file stands where a folder of the golden tree belongs: remove or rename it",
    errno.EEXIST: "a file stands where a folder of the golden tree belongs: remove or rename it",
}


def write_error(path: Path, exc: OSError, *, what: str, intact: str) -> GoldenError:
    """An OSError while writing a golden, as one paragraph: what failed, what is left, the fix."""
    hint = _WRITE_HINTS.get(exc.errno or 0, "fix the cause above, then run the update again")
    reason = exc.strerror or str(exc)
    return GoldenError(f"Cannot write the {what} {path}: {reason} (errno {exc.errno}). {intact} Fix: {hint}.")


def leftover_temp_files(root: Path) -> list[Path]:
    """Temporary files of atomic writes that were killed before their rename."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob(".*.tmp") if _TEMP_FILE.match(p.name) and p.is_file())


def remove_leftover_temp_files(root: Path) -> list[Path]:
    """Called before an update writes anything (never while one runs: they would be its own)."""
    removed = []
    for file in leftover_temp_files(root):
        file.unlink(missing_ok=True)
        removed.append(file)
    return removed


def stale_sidecars(root: Path) -> list[tuple[Path, str]]:
    """Sidecars that describe no golden, or another version of it (an update killed between the two)."""
    if not root.is_dir():
        return []
    found: list[tuple[Path, str]] = []
    for sidecar in sorted(root.rglob(f"*{META_SUFFIX}")):
        golden = sidecar.with_name(sidecar.name.removesuffix(META_SUFFIX) + ".json")
        problem = sidecar_problem(golden, sidecar)
        if problem:
            found.append((sidecar, problem))
    return found


def sidecar_problem(golden: Path, sidecar: Path) -> str | None:
    """Why ``sidecar`` cannot be trusted to describe ``golden``, or None."""
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"unreadable ({exc})"
    if not isinstance(meta, dict):
        return f"holds a JSON {type(meta).__name__}, not an object"
    try:
        data = golden.read_bytes()
    except FileNotFoundError:
        return "its golden file does not exist"
    except OSError as exc:
        return f"its golden cannot be read ({exc.strerror or exc})"
    recorded = meta.get(SHA_KEY)
    if recorded is not None and recorded != hashlib.sha256(data).hexdigest():
        return "describes another version of its golden (an update was interrupted, or it was edited)"
    return None


def tree_report(root: Path) -> list[str]:
    """Lines for the end of the session: what an interrupted update or a hand edit left behind."""
    lines: list[str] = []
    temps = leftover_temp_files(root)
    if temps:
        lines.append(f"leftover temporary files in the golden folder ({len(temps)}), from an interrupted "
                     "update: the next --snapshot-update removes them, or delete them")
        lines += [f"  {p}" for p in temps]
    stale = stale_sidecars(root)
    if stale:
        lines.append(f"golden sidecars that cannot be trusted ({len(stale)}): re-record with "
                     "--snapshot-update, or restore both files from version control")
        lines += [f"  {p}: {why}" for p, why in stale]
    return lines


def shape_problem(expected: Any, actual: Any, where: str = "") -> str | None:
    """Where a golden's structure (top-level keys, JSON types) differs from what the check records.

    A golden with a wrong type or an extra key is damaged, not a behaviour change: it gets a
    message of its own instead of a diff that an ``explain`` written for the right shape cannot
    make. Only what is certain is judged: ``null`` matches anything, nested key sets may vary.
    """
    def kind(value: Any) -> str:
        if isinstance(value, bool):
            return "boolean"
        return "number" if isinstance(value, (int, float)) else type(value).__name__

    label = where or "the golden"
    if expected is None or actual is None:
        return None
    if kind(expected) != kind(actual):
        return f"{label} is a JSON {kind(expected)} where this check records a {kind(actual)}"
    if isinstance(actual, dict):
        if not where:
            extra, missing = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
            if extra:
                return f"the golden has key {extra[0]!r}, which this check does not record"
            if missing:
                return f"the golden lacks key {missing[0]!r}, which this check records"
        for key in sorted(set(expected) & set(actual)):
            problem = shape_problem(expected[key], actual[key], f"{where}.{key}" if where else str(key))
            if problem:
                return problem
    elif isinstance(actual, list):
        for index, (want, got) in enumerate(zip(expected, actual)):
            problem = shape_problem(want, got, f"{label}[{index}]")
            if problem:
                return problem
    return None


def _explained(explain: Explain, expected: Any, actual: Any) -> str:
    """The kind's explanation, never empty: a difference its ``explain`` does not cover still gets one."""
    return explain(expected, actual).strip() or describe_difference(expected, actual)


def describe_difference(expected: Any, actual: Any) -> str:
    """A generic account of the values that differ (a layout difference is ``shape_problem``'s)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        lines = [f"{k}: expected {_short(expected[k])}, got {_short(actual[k])}"
                 for k in sorted(set(expected) & set(actual)) if expected[k] != actual[k]]
        return "\n".join(lines) or "the golden differs from what was observed"
    return f"expected {_short(expected)}, got {_short(actual)}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


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
        scope = [TOKENIZER_SCOPE] if variant is None else [self.device_class, variant]
        return contained(self.root, self.root.joinpath(self.model, *scope, suite, f"{check_id}.json"))

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
        judge: Judge | None = None, sidecar: dict[str, Any] | None = None,
    ) -> None:
        """Compare ``actual`` with the golden at ``path``; fail with a reviewer's diff.

        ``judge`` lets a kind accept numerical noise (see ``harness.compare``);
        an update rewrites a golden only where the judge says the behaviour changed.
        ``sidecar``: data an update keeps next to the golden, not compared (an activation
        fingerprint); written with the golden, or into the sidecar of an unchanged one.
        """
        __tracebackhide__ = True
        contained(self.root, path)
        self.used.add(path)
        actual = normalize(actual)
        source = contained(self.root, self.reference(path))
        try:
            expected = self.read(source)
        except GoldenError:
            if not self.update:
                raise
            expected = None
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
        message = _explained(explain, expected, actual)
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
        return dumps({**(sidecar or {}), **self.provenance, **(provenance_extra or {}), SHA_KEY: golden_sha})

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
        sidecar = meta_path(path)
        if not os.path.exists(sidecar):
            return ""
        problem = sidecar_problem(path, sidecar)
        if problem:
            return (f"  provenance: not shown, the sidecar {sidecar.name} {problem}; re-record with "
                    "--snapshot-update\n")
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        current = {**self.provenance, **(extra or {})}
        try:
            changes = describe_changes(recorded, current)
        except (AttributeError, TypeError):  # a hand-edited sidecar with fields of the wrong type
            return f"  provenance: not shown, the sidecar {sidecar.name} has fields of unexpected types\n"

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

