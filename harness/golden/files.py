"""Writing golden (and obtained) files: atomically, with the mode a plain write would give, and
OSErrors turned into one paragraph that says what failed, what is left and the fix.

A write goes to a temporary file that is renamed over the old one, so an interrupted
update leaves the previous file intact; the temporary files a kill leaves behind are
found (and, before the next update, removed) here too.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import GoldenError

# ".<name>.<8 random characters>.tmp", what atomic_write leaves behind when killed
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def dumps(data: Any) -> str:
    """The one serialization of goldens: sorted keys, indent 2, UTF-8 text kept readable."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def normalize(data: Any) -> Any:
    """What the observation looks like once written and read back (tuples become lists)."""
    return json.loads(json.dumps(data, ensure_ascii=False))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
    return unlink_all(leftover_temp_files(root))


def unlink_all(files: list[Path]) -> list[Path]:
    """Remove ``files`` (those already gone included); returns them, for the summary."""
    for file in files:
        file.unlink(missing_ok=True)
    return files

