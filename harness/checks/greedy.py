"""``greedy``: greedy-generation snapshots (text and token ids) per variant and device class."""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import Field, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.checks.prompts import ChatMessages, NoChatTemplate, PromptText, assert_fits_context, describe_token, encode_prompt, greedy_generate


class GreedySpec(CheckSpec):
    kind: Literal["greedy"]
    prompt: PromptText | None = None
    messages: ChatMessages | None = None
    max_new_tokens: int = Field(32, ge=1, le=4096)
    if_no_chat_template: Literal["fail", "skip"] = "fail"

    @model_validator(mode="after")
    def _one_prompt(self) -> GreedySpec:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (raw text) or 'messages' (chat)")
        return self


@register_check("greedy")
class GreedyCheck(Check[GreedySpec]):
    Spec = GreedySpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        import pytest

        try:
            prompt_ids = encode_prompt(ctx.tokenizer, prompt=self.spec.prompt, messages=self.spec.messages)
        except NoChatTemplate:
            message = (f"{ctx.pool.resolved.name!r} has no chat template, and this check renders chat "
                       "messages")
            if self.spec.if_no_chat_template == "skip":
                pytest.skip(message)
            from harness.errors import CheckFailure

            raise CheckFailure(message + ". Fix: use `prompt:` for a base model, or set "
                               "if_no_chat_template: skip.") from None
        model = ctx.model
        assert_fits_context(model, len(prompt_ids), self.spec.max_new_tokens, what=self.spec.id)
        new_ids, logits = generate_greedy(model, ctx.tokenizer, prompt_ids, self.spec.max_new_tokens)
        tokenizer = ctx.tokenizer
        actual = {
            "prompt_tokens": len(prompt_ids),
            "max_new_tokens": self.spec.max_new_tokens,
            "new_token_ids": new_ids,
            "text": tokenizer.decode(new_ids, skip_special_tokens=False),
        }
        ctx.assert_golden(actual, lambda exp, act: explain_divergence(exp, act, logits, tokenizer))


def generate_greedy(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], Any]:
    """Greedy decoding until eos or ``max_new_tokens``; returns new ids and per-step logits."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    out = greedy_generate(model, tokenizer, input_ids, torch.ones_like(input_ids), max_new_tokens,
                          return_dict_in_generate=True, output_logits=True)
    new_ids = out.sequences[0, len(prompt_ids):].tolist()
    logits = torch.stack([step[0].float().cpu() for step in out.logits]) if out.logits else None
    return new_ids, logits


def explain_divergence(expected: dict[str, Any], actual: dict[str, Any], logits: Any, tokenizer: Any) -> str:
    """First diverging token with its logit margin (near-tie or real change), then a text diff."""
    lines: list[str] = []
    for key in ("prompt_tokens", "max_new_tokens"):
        if expected.get(key) != actual.get(key):
            lines.append(f"{key}: expected {expected.get(key)}, got {actual.get(key)}")
    exp_ids, act_ids = expected.get("new_token_ids", []), actual["new_token_ids"]
    index = next((i for i, (a, b) in enumerate(zip(exp_ids, act_ids)) if a != b), None)
    if index is None and len(exp_ids) != len(act_ids):
        index = min(len(exp_ids), len(act_ids))
    if index is not None:
        want = exp_ids[index] if index < len(exp_ids) else None
        got = act_ids[index] if index < len(act_ids) else None
        lines.append(
            f"greedy output diverges at new token {index}: expected {describe_token(tokenizer, want)}, "
            f"got {describe_token(tokenizer, got)}"
        )
        margin = _margin(logits, index, want, got)
        if margin:
            lines.append(margin)
    elif expected.get("text") != actual.get("text"):
        lines.append("token ids are identical but the decoded text differs: the tokenizer's decoding changed")
    diff = list(difflib.unified_diff(
        str(expected.get("text", "")).splitlines(), actual["text"].splitlines(),
        "expected", "actual", lineterm="", n=1,
    ))
    if diff:
        lines.append("text diff:")
        lines.extend("  " + d for d in diff[:24])
        if len(diff) > 24:
            lines.append(f"  ... ({len(diff) - 24} more diff lines)")
    return "\n".join(lines)


def _margin(logits: Any, index: int, want: int | None, got: int | None) -> str | None:
    if logits is None or index >= len(logits) or want is None or got is None:
        return None
    step = logits[index]
    gap = float(step[got] - step[want])
    rank = int((step > step[want]).sum().item()) + 1
    kind = "a near-tie (numerical noise can flip it)" if gap < 0.05 * max(1.0, float(step[got].abs())) else "a real change"
    return (f"logits at that step: got {float(step[got]):.3f}, expected token {float(step[want]):.3f} "
            f"(rank {rank}), margin {gap:.3f}: {kind}")
