"""Sidecars: the ``.meta.json`` next to each golden, with its provenance and the sha256 of the golden it
describes; shown on failure, never compared. And the end-of-session report of what an interrupted
update or a hand edit left in the golden tree (stale sidecars, leftover temporary files).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.golden.files import leftover_temp_files, unlink_all
from harness.golden.layout import meta_path
from harness.suites.names import META_SUFFIX
from harness.models.provenance import describe_changes

SHA_KEY = "golden_sha256"
# Records in a sidecar that a comparison judges with (a greedy golden's recorded noise): each is
# vouched for by its own sha256 next to it, as the golden is by ``SHA_KEY``.
JUDGED_RECORDS = ("path_noise",)


def record_sha_key(name: str) -> str:
    return f"{name}_sha256"


def record_sha256(record: Any) -> str:
    """The sha256 of a sidecar record in a canonical JSON form (what a JSON round trip keeps)."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def with_record_hashes(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with the sha256 of each judged record it holds: what an update writes."""
    return {**meta, **{record_sha_key(name): record_sha256(meta[name]) for name in JUDGED_RECORDS if name in meta}}


def judged_record(sidecar: Path, name: str, *, label: str = "", missing: str = "") -> tuple[Any, str | None]:
    """The record ``name`` of a sidecar, and why it is not vouched for (None when its sha256 matches).

    The record is None where the sidecar or the record is missing or unreadable (the reason
    says which); a record whose sha256 is absent or another one's was not written with it
    by ``--snapshot-update`` (an older harness, or a hand edit).
    """
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"there is no sidecar, so no {label or name}"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"its sidecar does not parse ({type(exc).__name__})"
    label = label or f"{name} record"
    if not isinstance(meta, dict) or meta.get(name) is None:
        return None, f"its sidecar has no {label}{missing}"
    recorded = meta.get(record_sha_key(name))
    if recorded is None:
        return meta[name], (f"its sidecar names no {record_sha_key(name)}, so nothing vouches for its {label} "
                            "(recorded by an older harness, or the field was removed)")
    if recorded != _sha_or_none(meta[name]):
        return meta[name], (f"its {label} is not the one its sidecar's {record_sha_key(name)} vouches for "
                            "(edited by hand?)")
    return meta[name], None


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
    for name in JUDGED_RECORDS:  # a record whose sha256 is absent is an older harness's, not an edit
        vouched = meta.get(record_sha_key(name))
        if vouched is not None and (name not in meta or _sha_or_none(meta[name]) != vouched):
            return f"holds another {name} record than the one its {record_sha_key(name)} names (it was edited)"
    return None


def _sha_or_none(record: Any) -> str | None:
    try:
        return record_sha256(record)
    except ValueError:  # a non-finite number: not what an update writes
        return None


def orphan_sidecars(root: Path) -> list[Path]:
    """Sidecars whose golden file does not exist: they describe nothing."""
    if not root.is_dir():
        return []
    return [sidecar for sidecar in sorted(root.rglob(f"*{META_SUFFIX}"))
            if not sidecar.with_name(sidecar.name.removesuffix(META_SUFFIX) + ".json").exists()]


def remove_orphan_sidecars(root: Path) -> list[Path]:
    """Called when an update starts (as for temporary files): what ``tree_report`` says the update fixes."""
    return unlink_all(orphan_sidecars(root))


def trust_problem(golden: Path) -> str | None:
    """Why ``golden``'s content is not vouched for by its sidecar (missing, without a sha256, or naming
    another one), or None. A gate run judges only against vouched goldens: a sidecar without a
    sha256 (an older harness wrote it, or the field was deleted) vouches for nothing.
    """
    sidecar = meta_path(golden)
    if not sidecar.exists():
        return f"it has no sidecar ({sidecar.name}), which --snapshot-update always writes with it"
    problem = sidecar_problem(golden, sidecar)
    if problem is None:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        if meta.get(SHA_KEY) is None:
            problem = (f"names no {SHA_KEY}, so it vouches for no version of its golden (written by an older "
                       "harness, or the field was removed)")
    return None if problem is None else f"its sidecar {sidecar.name} {problem}"


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


def recorded_provenance(goldens: Iterable[Path]) -> list[dict[str, Any]]:
    """The provenance beside each golden whose sidecar vouches for it: what a run's report shows its machine
    and versions against. Missing or untrusted sidecars are left out (``tree_report`` names them)."""
    found: list[dict[str, Any]] = []
    for golden in goldens:
        sidecar = meta_path(golden)
        if os.path.exists(sidecar) and sidecar_problem(golden, sidecar) is None:
            found.append(json.loads(sidecar.read_text(encoding="utf-8")))
    return found


def provenance_lines(path: Path, current: dict[str, Any]) -> str:
    """What changed between the provenance recorded next to the golden at ``path`` and ``current``,
    as lines for a failure message ("" when nothing did, or there is no sidecar)."""
    sidecar = meta_path(path)
    if not os.path.exists(sidecar):
        return ""
    problem = sidecar_problem(path, sidecar)
    if problem:
        return (f"  provenance: not shown, the sidecar {sidecar.name} {problem}; re-record with "
                "--snapshot-update\n")
    recorded = json.loads(sidecar.read_text(encoding="utf-8"))
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
