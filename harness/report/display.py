"""How file paths are shown to people: relative to the rootdir.

A report is pasted into pull requests and committed as documentation, so it must not
carry the layout of the machine that made it (``/home/ci/build-4711/golden/...``); a
path relative to the rootdir is also the one a reviewer can open in their checkout.
A path outside the rootdir (a model in a cache, an adapter elsewhere) is shown as given:
shortening it would point at the wrong file.
"""

from __future__ import annotations

import re
from pathlib import Path

# a path starts at the beginning of the text or after a character that cannot be inside one
_START = r"(?<![\w.~/\\-])"


def shown_path(path: Path | str, root: Path) -> str:
    """``path`` relative to ``root`` when it lies inside it, else as given."""
    text = str(path)
    for prefix in _prefixes(root):
        if text == prefix:
            return "."
        if text.startswith(prefix) and text[len(prefix)] in "/\\":
            return text[len(prefix) + 1:]
    return text


def relative_paths(text: str, root: Path) -> str:
    """``text`` with every absolute path inside ``root`` written relative to it (failure
    details, listings); other paths, and words that merely contain the root's name, unchanged."""
    for prefix in _prefixes(root):
        escaped = re.escape(prefix)
        text = re.sub(_START + escaped + r"[/\\]", "", text)
        text = re.sub(_START + escaped + r"(?![\w.~/\\-])", ".", text)
    return text


def _prefixes(root: Path) -> list[str]:
    """The root as pytest gives it and with symlinks resolved (``/tmp`` -> ``/private/tmp``),
    longest first; nothing for a filesystem root, where every path would lose its anchor."""
    candidates = {str(root.absolute()), str(root.resolve())}
    return sorted((c for c in candidates if Path(c).parent != Path(c)), key=len, reverse=True)
