"""Which names may become a component of a golden path: one rule for every name that does.

A model name, a suite name, a device class and a variant key each name a folder of the
golden tree; a check id names a file in it. They share one rule, stated here and nowhere
else, so that a name a suite accepts is never one the golden store refuses (or the other
way round). This is a bottom module: it imports nothing from the harness, so the
registry, the suite spec, the check contract and the golden store can all use it.

Why ASCII only: a name written with non-ASCII letters can be stored in two Unicode
normalizations (macOS keeps NFD, Linux keeps what it is given), so one checkout would not
find the goldens another wrote. Why no leading '-' or '.': a leading '-' reads as an option
to the command-line tools a reviewer uses on goldens, and a leading '.' hides the folder
(and ``.``/``..`` leave it).
"""

from __future__ import annotations

import hashlib
import re

# a name is one path component: ASCII letters and digits, then also '-', '_' and '.'
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# file names are limited (255 bytes on most file systems); suffixes such as ".meta.json" are added
MAX_NAME_LENGTH = 100
# the sidecar next to each golden ``<check>.json``: ``<check>.meta.json``
META_SUFFIX = ".meta.json"
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_.-]+")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one component of a golden path (a folder or a file name), or None.

    The one rule for model names, suite names, check ids, variant keys and device classes;
    The answer does not repeat the name: callers say which name it is (the YAML key, the
    value written), never restate the rule.
    """
    if not SAFE_NAME.fullmatch(name):
        return ("it names a file or folder of the golden tree, so it must start with an ASCII letter or digit "
                "and use only ASCII letters, digits, '-', '_' and '.' (no spaces, no '/', no other alphabets: "
                "macOS and Linux checkouts spell non-ASCII file names differently)")
    if len(name) > MAX_NAME_LENGTH:
        return (f"it names a file or folder of the golden tree, so it is at most {MAX_NAME_LENGTH} characters; "
                f"this one has {len(name)} (file names are limited)")
    return None


def check_id_problem(check_id: str) -> str | None:
    """Why a check id cannot name a golden file, or None: the name rule, plus the sidecar's suffix."""
    problem = name_problem(check_id)
    if problem:
        return problem
    stem = META_SUFFIX.removesuffix(".json")
    if check_id.casefold().endswith(stem):
        base = check_id[: -len(stem)]
        return (f"an id ending in {stem!r} names the file that holds the provenance sidecar of a check "
                f"{base!r} ({base}{META_SUFFIX}), so the two would overwrite each other")
    return None


def safe_name(text: str, *, fallback: str = "model") -> str:
    """``text`` made into a name that passes ``name_problem``'s character rule (golden folders,
    cache entries, the rename offered in a hint); ``fallback`` when nothing of it survives."""
    return _UNSAFE_RUN.sub("-", text).lstrip("-._").rstrip("-.") or fallback


def golden_folder_name(text: str) -> str:
    """The folder a model's goldens live in: safe, short and one-to-one with the name given.

    A name that is already safe is used as it is; any other gets a short hash of the
    original, so ``my model`` and ``my@model`` do not share (and overwrite) one folder.
    """
    safe = safe_name(text)[:64]
    if safe == text:
        return safe
    return f"{safe}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"
