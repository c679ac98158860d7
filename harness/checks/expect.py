"""``expect``: assertions on the decoded answer that survive a legitimate update.

A golden says "nothing changed"; an expectation says what must stay true when
something does (a new revision, a retrained adapter, another device): the
answer contains "Paris", starts with "Arr", parses as JSON matching a schema,
ends by itself within a token budget (where ``generate()`` stops: at an eos id of
the model's generation_config). Greedy by default; with ``sample:`` the prompt is
sampled ``n`` times from a fixed seed and the assertions must hold for at least
``min_pass_rate`` of the samples (sampling is what users run, and a rate
tolerates the odd bad draw where a single sample would be flaky). JSON Schema is
checked with the ``jsonschema`` package.

In reference mode (``--reference OLD``) a greedy expectation runs on OLD and NEW
and a failure says whether OLD held it. A sampled one draws the same seeded
samples from both: the same random stream makes sample ``i`` of OLD and of NEW a
pair, so a drop in NEW's pass rate is judged by an exact McNemar test on the
discordant pairs (one-sided: NEW worse), and the failure gives n, both rates
and the p-value.

This module is the check; the assertion language is ``expect_assertions.py``'s,
sampling and the paired test ``expect_sampling.py``'s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, ReferenceRun, register_check
from harness.checks.expect_assertions import Answer, Assertion, judge
from harness.checks.expect_sampling import Sampling, paired_drop, sample_rows
from harness.observe.prompts import (
    IF_NO_CHAT_TEMPLATE_HELP, MESSAGES_HELP, PROMPT_HELP, ChatMessages, PromptText, assert_fits_context,
    encode_or_skip, greedy_generate,
)
from harness.errors import CheckFailure


class ExpectSpec(CheckSpec):
    """Assertions on the decoded answer that must survive a legitimate update (a new revision, a retrained
    adapter, another device): contains, starts with, matches, parses as JSON, stops in time. Greedy, or a pass
    rate over seeded samples."""

    kind: Literal["expect"]
    prompt: PromptText | None = Field(None, description=PROMPT_HELP)
    messages: ChatMessages | None = Field(None, description=MESSAGES_HELP)
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens to generate (fewer where the model stops).")
    expect: list[Assertion] = Field(min_length=1, description=(
        "Assertions, all of which must hold; each is a mapping with exactly one key (see the table below)."))
    ignore_case: bool = Field(False, description=(
        "Compare text (contains, not_contains, starts_with, regex, one_of) ignoring case."))
    sample: Sampling | None = Field(None, description="Sample instead of decoding greedily (see the table below).")
    if_no_chat_template: Literal["fail", "skip"] = Field("fail", description=IF_NO_CHAT_TEMPLATE_HELP)

    @model_validator(mode="after")
    def _one_prompt(self) -> ExpectSpec:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (raw text) or 'messages' (chat)")
        for index, assertion in enumerate(self.expect):
            if assertion.max_tokens is not None and assertion.max_tokens >= self.max_new_tokens:
                raise ValueError(
                    f"expect[{index}]: max_tokens {assertion.max_tokens} can never fail, since generation stops at "
                    f"max_new_tokens {self.max_new_tokens}; lower max_tokens or raise max_new_tokens above it")
        return self


@register_check("expect")
class ExpectCheck(Check[ExpectSpec]):
    Spec = ExpectSpec

    def answers(self, ctx: CheckContext) -> list[Answer]:
        """The greedy answer, or the seeded samples, of ``ctx``'s model."""
        __tracebackhide__ = True
        prompt_ids = encode_or_skip(ctx.tokenizer, model=ctx.pool.resolved, prompt=self.spec.prompt,
                                    messages=self.spec.messages, if_no_chat_template=self.spec.if_no_chat_template)
        model = ctx.model
        assert_fits_context(model, len(prompt_ids), self.spec.max_new_tokens, what=self.spec.id)
        return generate_answers(model, ctx.tokenizer, prompt_ids, self.spec)

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        answers = self.answers(ctx)
        failures = [(a, self.failed(a)) for a in answers]
        passed = sum(1 for _, f in failures if not f)
        ctx.record(expect_pass_rate=passed / len(answers), expect_samples=len(answers))
        if self.spec.sample is None:
            answer, failed = failures[0]
            if failed:
                raise CheckFailure(
                    f"{self.spec.id}: the greedy answer {answer.text!r} ({answer.new_tokens} tokens, "
                    f"{'ended by eos' if answer.stopped else 'cut at max_new_tokens'}) fails:\n"
                    + "\n".join(f"  - {f}" for f in failed)
                    + "\nIf the new answer is right, change the expectation in the suite; expectations are "
                    "not goldens and are never re-recorded."
                )
            return
        sampling = self.spec.sample
        rate = passed / len(answers)
        if rate < sampling.min_pass_rate:
            shown = [(a, f) for a, f in failures if f][:3]
            raise CheckFailure(
                f"{self.spec.id}: {passed} of {len(answers)} samples (seed {sampling.seed}, temperature "
                f"{sampling.temperature:g}, top_p {sampling.top_p:g}) pass, a rate of {rate:.2f} < "
                f"min_pass_rate {sampling.min_pass_rate:g}. Failing samples:\n"
                + "\n".join(f"  - {a.text!r}: {'; '.join(f)}" for a, f in shown)
                + "\nFix: the model's answers changed; if they are still right, change the expectation."
            )

    def failed(self, answer: Answer) -> list[str]:
        """Each assertion the answer breaks, with what the answer has instead."""
        return [reason for a in self.spec.expect if (reason := judge(a, answer, self.spec.ignore_case))]

    def run_against_reference(self, pair: ReferenceRun) -> None:
        """Greedy: run on both (a failure says whether OLD held it). Sampled: the paired test."""
        __tracebackhide__ = True
        if self.spec.sample is None:
            super().run_against_reference(pair)
            return
        sampling = self.spec.sample
        old = [not self.failed(a) for a in self.answers(pair.on_old())]
        ctx = pair.on_new()
        answers = self.answers(ctx)
        new = [not self.failed(a) for a in answers]
        test = paired_drop(old, new)
        ctx.record(expect_samples=test.n, old_pass_rate=round(test.old_rate, 4), expect_pass_rate=round(test.new_rate, 4),
                   pairs_old_only=test.old_only, pairs_new_only=test.new_only, mcnemar_p=round(test.p_value, 6))
        sides = pair.sides
        figures = (f"n {test.n} samples (seed {sampling.seed}, temperature {sampling.temperature:g}, top_p "
                   f"{sampling.top_p:g}), the same seeds on both: pass rate {sides.expected_short} "
                   f"{test.old_rate:.2f}, {sides.actual_short} {test.new_rate:.2f}; {test.old_only} pair(s) pass on "
                   f"{sides.expected_short} only, {test.new_only} on {sides.actual_short} only; exact McNemar "
                   f"one-sided p = {test.p_value:.3g}")
        problems = []
        if test.p_value < sampling.alpha:
            problems.append(f"{sides.actual_short}'s pass rate is significantly lower than {sides.expected_short}'s "
                            f"(p {test.p_value:.3g} < alpha {sampling.alpha:g})")
        if test.new_rate < sampling.min_pass_rate:
            problems.append(f"{sides.actual_short}'s pass rate {test.new_rate:.2f} < min_pass_rate "
                            f"{sampling.min_pass_rate:g}" + (f" ({sides.expected_short}'s {test.old_rate:.2f} is "
                                                             "below it too)" if test.old_rate < sampling.min_pass_rate
                                                             else ""))
        if problems:
            shown = [(a, f) for a in answers if (f := self.failed(a))][:3]
            raise CheckFailure(
                f"{pair.label}: {self.spec.id}: " + "; ".join(problems) + f".\n{figures}.\nFailing samples of "
                f"{sides.actual_short}:\n" + "\n".join(f"  - {a.text!r}: {'; '.join(f)}" for a, f in shown)
                + "\nFix: the update made this expectation hold less often; if the new answers are still right, "
                "change the expectation."
            )


def generate_answers(model: Any, tokenizer: Any, prompt_ids: list[int], spec: ExpectSpec) -> list[Answer]:
    """The greedy answer, or ``n`` samples from a fixed seed, decoded without special tokens."""
    import torch

    from harness.observe.observation import eos_ids

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    mask = torch.ones_like(input_ids)
    if spec.sample is None:
        rows = greedy_generate(model, tokenizer, input_ids, mask, spec.max_new_tokens)
    else:
        rows = sample_rows(model, tokenizer, input_ids, spec.sample, spec.max_new_tokens)
    stop_ids = eos_ids(model)  # where generate() stops: the model's generation_config, not the tokenizer's eos
    answers: list[Answer] = []
    for row in rows[:, len(prompt_ids):].tolist():
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        kept = row if end is None else row[:end]
        answers.append(Answer(tokenizer.decode(kept, skip_special_tokens=True), len(kept), end is not None))
    return answers
