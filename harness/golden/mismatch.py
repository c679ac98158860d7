"""What a failed comparison says when the check kind's own explanation cannot: a damaged golden's
layout problem, or a generic account of the values that differ.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Explain = Callable[[Any, Any], str]


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


def explained(explain: Explain, expected: Any, actual: Any) -> str:
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

