"""Check kinds: one module each, registered by name with ``@register_check``.

Importing this package imports every built-in kind so that the registry is
complete; third-party kinds register the same way from their own modules.
"""

from __future__ import annotations

from harness.checks.base import Check, CheckContext, CheckSpec, get_check, known_kinds, register_check
from harness.checks import (  # noqa: E402,F401  (registration)
    batch, cache, chat_template, drift, expect, generation_config, greedy, kernels, lora_merge, memory, padding,
    save_reload, throughput, tokenization,
)

__all__ = ["Check", "CheckContext", "CheckSpec", "get_check", "known_kinds", "register_check"]
