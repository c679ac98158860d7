"""What the self-consistency kinds share: the prompts they run, their tolerance, how they fail.

``cache``, ``kernels``, ``batch``, ``lora_merge`` and ``save_reload`` all ask one
question of two runs of the same model that should agree: the same behaviour,
up to numerical noise? The answer comes from the comparison engine
(``harness.judge.compare``); this module only turns a suite's prompts into token ids,
picks the tolerance the engine judges with, and gathers the engine's verdicts
into one failure a reviewer can read (the first divergence, the log-prob
evidence, which prompt and which pair of runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from harness.checks.base import CheckSpec
from harness.observe.prompts import (
    CHATS_HELP, PROMPTS_HELP, ChatMessages, PromptText, assert_fits_context, encode_chat_or_why, encode_prompt, leave_out_refused,
)
from harness.judge.tolerance import ToleranceSpec
from harness.judge.tolerance import TOLERANCE_HELP
from harness.errors import CheckFailure

if TYPE_CHECKING:
    from harness.checks.base import CheckContext
    from harness.judge.compare import Sides, Verdict
    from harness.judge.tolerance import Tolerance
    from harness.observe.observation import Observation, Step

DEFAULT_PROMPTS: tuple[str, ...] = ("The capital of France is",)


class ConsistencySpec(CheckSpec):
    """Prompts (raw text and/or chats) and the tolerance override every consistency kind takes."""

    prompts: list[PromptText] = Field(default_factory=list, description=PROMPTS_HELP)
    chats: list[ChatMessages] = Field(default_factory=list, description=CHATS_HELP)
    max_new_tokens: int = Field(8, ge=1, le=1024, description="Greedy tokens generated per prompt.")
    tolerance: ToleranceSpec | None = Field(None, description=TOLERANCE_HELP)

    @model_validator(mode="before")
    @classmethod
    def _default_prompts(cls, data: Any) -> Any:
        """The default prompt only where neither ``prompts`` nor ``chats`` is given."""
        if isinstance(data, dict) and data.get("prompts") is None and not data.get("chats"):
            data = {**data, "prompts": list(DEFAULT_PROMPTS)}
        return data

    @model_validator(mode="after")
    def _has_prompts(self) -> ConsistencySpec:
        if not self.prompts and not self.chats:
            raise ValueError("give at least one of 'prompts' (raw text) or 'chats' (lists of messages)")
        return self


def tolerance_for(ctx: CheckContext, spec: ConsistencySpec) -> Tolerance:
    """The engine's tolerance for this variant, with the check's override applied."""
    return spec.noise_model(half=ctx.half).tolerance(ctx.variant.key if ctx.variant else None)


EXACT_SOURCE = "exact: the two runs must be bit-identical"


def exact_tolerance() -> Tolerance:
    """No noise allowed: two runs of the same weights and kernels on one machine."""
    from harness.judge.tolerance import Tolerance

    return Tolerance(mean_abs_dlogp=0.0, max_abs_dlogp=0.0, tie_gap=0.0, source=EXACT_SOURCE)


@dataclass(frozen=True)
class Prompt:
    label: str
    ids: list[int]


def encoded_prompts(ctx: CheckContext, spec: ConsistencySpec) -> list[Prompt]:
    """Raw prompts encoded with the tokenizer's defaults, chats rendered with the generation prompt."""
    __tracebackhide__ = True
    out: list[Prompt] = []
    for text in spec.prompts:
        out.append(Prompt(_short(text), encode_prompt(ctx.tokenizer, prompt=text, messages=None)))
    refused: list[str] = []
    for index, messages in enumerate(spec.chats):
        label = f"chat {index} ({_short(messages[-1].content)})"
        ids, why = encode_chat_or_why(ctx.tokenizer, messages, model=ctx.pool.resolved, what=f"{spec.id} has `chats`")
        if ids is None:
            refused.append(f"{label}: {why}")
        else:
            out.append(Prompt(label, ids))
    leave_out_refused(refused, kept=len(out), subject=ctx.subject, note=ctx.note)
    model = ctx.model
    for prompt in out:
        assert_fits_context(model, len(prompt.ids), spec.max_new_tokens, what=f"{spec.id} {prompt.label}")
    return out


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def greedy(model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int, **generate_kwargs: Any) -> Observation:
    from harness.observe.observation import observe_greedy

    return observe_greedy(model, tokenizer, prompt.ids, max_new_tokens, **generate_kwargs)


def rescorer(model: Any, tokenizer: Any, prompt: Prompt) -> Callable[[list[int]], tuple[Step, ...]]:
    """Teacher forcing on ``model``: how the engine scores a reference's tokens after an accepted near-tie."""
    from harness.observe.scores import teacher_force

    return lambda ids: teacher_force(model, prompt.ids, ids, tokenizer=tokenizer)


def judge_run(reference: Observation, model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int,
              tol: Tolerance, *, sides: Sides, scored: Sequence[Step] | None = None, one_pass: bool = True,
              confirm: bool = True) -> Verdict:
    """``model``'s greedy run judged against ``reference``, decoding only where the one-pass verdict fails.

    The reference's path scored in one pass (``scored``, or scored here) gives what free greedy
    decoding would do until its first flip (``scores.free_run_of``), and the scores to
    teacher-force the rest: where that passes, decoding step by step would reproduce it, as a
    greedy golden is judged. Agreement of cached decoding with one pass is the ``cache`` kind's
    question. A failing verdict is decided by a real decode, whose evidence the failure shows.
    Each decoded step of an NF4 model dequantizes every layer again, so on CPU this is most of
    such a check's time. ``one_pass=False`` decodes at once (a bit-for-bit comparison needs the
    same computation on both sides). ``confirm=False`` lets a failing one-pass verdict stand
    undecoded: for a verdict that is only a figure (no item fails on it), where the decode
    would cost time and show evidence nobody is asked to read.
    """
    from harness.judge.compare import compare
    from harness.observe.scores import free_run_of, path_scores, standing_for

    if one_pass:
        if scored is None:
            scored = path_scores(model, tokenizer, prompt.ids, reference.token_ids)
        standing = standing_for(scored, len(reference.steps))
        if standing is not None:
            verdict = compare(reference, free_run_of(standing, reference, prompt.ids), tol,
                              rescore=lambda _ids: standing, sides=sides)
            if verdict.ok or not confirm:
                return verdict
    actual = greedy(model, tokenizer, prompt, max_new_tokens)
    return compare(reference, actual, tol, rescore=rescorer(model, tokenizer, prompt), sides=sides)


@dataclass
class Findings:
    """The engine's verdicts for one item, gathered into one failure (or figures on a pass)."""

    check_id: str
    tokenizer: Any
    problems: list[str] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)
    worst_mean: float = 0.0
    worst_max: float = 0.0

    def add(self, what: str, verdict: Verdict, sides: Sides | None = None) -> None:
        """``sides`` names the two runs in the reasons ("no cache" / "static cache"), not a golden."""
        from harness.judge.compare import GOLDEN_SIDES, render_tokens

        sides = sides or GOLDEN_SIDES

        self.worst_mean = max(self.worst_mean, verdict.stats.get("mean_abs_dlogp", 0.0))
        self.worst_max = max(self.worst_max, verdict.stats.get("max_abs_dlogp", 0.0))
        self.ties.extend(f"{what}: {render_tokens(t.describe(sides=sides), self.tokenizer)}" for t in verdict.accepted_ties)
        if not verdict.ok:
            detail = verdict.explain(self.tokenizer, sides).replace("\n", "\n      ")
            self.problems.append(f"{what}:\n      {detail}")

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def finish(self, ctx: CheckContext, *, headline: str, fix: str, tol: Tolerance | None) -> None:
        """Record the figures; raise one CheckFailure naming every disagreeing pair."""
        __tracebackhide__ = True
        ctx.record(worst_mean_abs_dlogp=round(self.worst_mean, 6), worst_max_abs_dlogp=round(self.worst_max, 6))
        for tie in self.ties:
            ctx.forgive(f"{ctx.subject}: {tie}")
        if tol is not None:
            ctx.forgive_widened(tol)
        if not self.problems:
            return
        judged = f" (tolerance{tol.describe()}: mean {tol.mean_abs_dlogp:g}, step {tol.max_abs_dlogp:g}, " \
                 f"tie gap {tol.tie_gap:g})" if tol is not None else ""
        lines = [f"{self.check_id}: {headline}{judged}; {len(self.problems)} disagreement"
                 f"{'s' if len(self.problems) > 1 else ''}:"]
        lines.extend(f"  - {p}" for p in self.problems)
        if self.ties:
            lines.append("accepted near-ties (numerical noise, not failures):")
            lines.extend(f"  - {t}" for t in self.ties)
        lines.append(fix)
        raise CheckFailure("\n".join(lines))
