"""Model diff: what changed between two models or adapters, and where behaviour first changes.

``harness-diff OLD NEW`` (``cli.py``) writes the report; ``fingerprints.fingerprint`` and
``fingerprints.localize`` let a golden alone say where a model changed.
"""

from __future__ import annotations

from harness.judge.fingerprints import fingerprint, localize

__all__ = ["fingerprint", "localize"]
