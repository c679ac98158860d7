"""The greedy golden file (format 2): what it holds, how it is written and read back.

A golden holds what a reviewer reads first, the text and the token ids, then the effective
generation settings and one trace line per step: the chosen token's log-probability and the
top-k alternatives with theirs. The format lives apart from the check that records it and the
judge that reads it, so tools (``harness-calibrate``) read goldens without importing a check kind.
"""

from __future__ import annotations

from typing import Any

from harness.observe.observation import DEFAULT_TOP_K, Observation, TraceError, from_trace, to_trace

FORMAT = 2
GOLDEN_KEYS = frozenset({"format", "text", "new_token_ids", "prompt_tokens", "max_new_tokens", "stop",
                         "generation", "top_k", "trace"})


def golden_record(observed: Observation, tokenizer: Any, *, settings: dict[str, Any], max_new_tokens: int,
                  top_k: int = DEFAULT_TOP_K) -> dict[str, Any]:
    """The golden file's content (format 2)."""
    ids = list(observed.token_ids)
    return {
        "format": FORMAT,
        "text": tokenizer.decode(ids, skip_special_tokens=False),
        "new_token_ids": ids,
        "prompt_tokens": len(observed.prompt_ids),
        "max_new_tokens": max_new_tokens,
        "stop": observed.stop,
        "generation": settings,
        "top_k": top_k,
        "trace": to_trace(observed, tokenizer),
    }


class GoldenFormatError(ValueError):
    """A golden this version cannot judge: an older or newer format, or a damaged trace."""


class OtherFormat(GoldenFormatError):
    """A golden written by another version of the harness: re-recorded by an update, named otherwise."""


def parse_golden(data: Any) -> Observation:
    """The golden's observation; a GoldenFormatError says why it cannot be judged and what to do."""
    if not isinstance(data, dict):
        raise GoldenFormatError(f"the golden is a JSON {type(data).__name__}, not an object")
    version = data.get("format", 1)
    if version == 1 or "trace" not in data:
        raise OtherFormat(
            "this golden was recorded in format 1 by an earlier harness (token ids only, no per-step "
            "log-probabilities, so numerical noise cannot be told from a regression); re-record it with "
            "--snapshot-update and review the diff (the token ids should not change)"
        )
    if version != FORMAT:
        raise OtherFormat(f"this golden was recorded in format {version!r}; this harness reads format "
                                f"{FORMAT}. Upgrade the harness, or re-record with --snapshot-update and review")
    extra, missing = sorted(set(data) - GOLDEN_KEYS), sorted(GOLDEN_KEYS - set(data))
    if extra or missing:
        what = f"has key {extra[0]!r}, which this check does not record" if extra else f"lacks key {missing[0]!r}"
        raise GoldenFormatError(f"the golden {what} (edited by hand?); restore it from version control or "
                                "re-record it with --snapshot-update and review")
    ids, trace, top_k = data.get("new_token_ids"), data.get("trace"), data.get("top_k")
    if not isinstance(ids, list) or not isinstance(trace, list) or not isinstance(top_k, int) \
            or not all(isinstance(i, int) for i in ids):
        raise GoldenFormatError("its new_token_ids, trace or top_k have the wrong type (edited by hand?); "
                                "restore it from version control or re-record it")
    try:
        steps = from_trace(trace, top_k=top_k)
    except TraceError as exc:
        raise GoldenFormatError(f"its trace does not parse ({exc}); restore it or re-record it") from None
    traced = [s.token_id for s in steps]
    if traced != ids:
        at = next((i for i, (a, b) in enumerate(zip(ids, traced)) if a != b), min(len(ids), len(traced)))
        raise GoldenFormatError(
            f"its new_token_ids and its trace disagree at new token {at} (edited by hand?): the trace's "
            "log-probabilities belong to the recorded tokens; restore it or re-record it")
    stop = data.get("stop")
    if stop not in ("eos", "length"):
        raise GoldenFormatError(f"its stop is {stop!r}, expected 'eos' or 'length'")
    return Observation(prompt_ids=(), steps=steps, stop=stop)


def parsed_golden(data: Any) -> Observation | None:
    """A golden's observation where this version reads it; None lets the store name what is wrong."""
    if data is None:
        return None
    try:
        return parse_golden(data)
    except GoldenFormatError:
        return None
