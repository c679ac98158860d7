"""Whether this session is a gate run: the one reading of the ``CI`` environment variable."""

from __future__ import annotations

import os

_FALSE = frozenset({"", "0", "false", "no", "off", "n", "f"})


def in_ci() -> bool:
    """``CI`` set to anything but an explicit false (``CI=false``, ``CI=0``, empty) means a gate run.

    CI services set ``CI=true``; developers switch it off with ``CI=false`` or ``CI=0``,
    which a plain truthiness test of the string would read as "on".
    """
    return os.environ.get("CI", "").strip().lower() not in _FALSE
