"""Check kinds: one module each, registered by name with ``@register_check``.

Importing this package imports every built-in kind so that the registry is
complete; third-party kinds register the same way from their own modules.
"""

from __future__ import annotations

from harness.checks.base import Check, CheckContext, CheckSpec, get_check, known_kinds, register_check
from harness.checks import chat_template, drift, greedy, memory, padding, throughput, tokenization  # noqa: E402,F401  (registration)

__all__ = ["Check", "CheckContext", "CheckSpec", "get_check", "known_kinds", "register_check"]
