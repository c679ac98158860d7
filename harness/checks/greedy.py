"""``greedy``: greedy-generation snapshots per variant and device class, judged up to numerical noise.

A golden (format 2) holds what a reviewer reads first, the text and the token
ids, then the effective generation settings and one trace line per step: the
chosen token's log-probability and the top-k alternatives with theirs, from the
scores decoding actually used. A run passes when it is the same behaviour up to
the noise of its variant (``harness.compare``): identical ids with log-probs
within tolerance, or a reported near-tie whose remaining golden tokens still
score within tolerance under the model.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import Field, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.checks.prompts import (
    ChatMessages, PromptText, assert_fits_context, describe_token, encode_or_skip, greedy_generate,
)
from harness.compare import GOLDEN_SIDES, NoiseModel, Sides, Tolerance, ToleranceSpec, Verdict, compare, render_tokens
from harness.diff.activations import compute_dtype
from harness.diff.fingerprints import fingerprint_noise, sidecar_fingerprint, sidecar_localization
from harness.errors import CheckFailure, GoldenError
from harness.golden import meta_path
from harness.observation import (
    DEFAULT_TOP_K, Observation, TraceError, from_trace, generation_settings, near_ties, observe_greedy,
    teacher_force, to_trace,
)

FORMAT = 2
GOLDEN_KEYS = frozenset({"format", "text", "new_token_ids", "prompt_tokens", "max_new_tokens", "stop",
                         "generation", "top_k", "trace"})


class GreedySpec(CheckSpec):
    kind: Literal["greedy"]
    prompt: PromptText | None = None
    messages: ChatMessages | None = None
    max_new_tokens: int = Field(32, ge=1, le=4096)
    if_no_chat_template: Literal["fail", "skip"] = "fail"
    tolerance: ToleranceSpec | None = None
    match: Literal["noise", "exact"] = "noise"

    @model_validator(mode="after")
    def _one_prompt(self) -> GreedySpec:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (raw text) or 'messages' (chat)")
        return self

    def noise_model(self) -> NoiseModel:
        return NoiseModel().overridden(self.tolerance.as_override() if self.tolerance else None, where="check")

    def judging(self, variant_key: str | None, *, cross_device: bool) -> Tolerance:
        """This check's tolerance; ``match: exact`` accepts no near-tie (log-probs still within noise)."""
        tol = self.noise_model().tolerance(variant_key, cross_device=cross_device)
        return replace(tol, tie_gap=0.0, source=f"{tol.source}, match: exact") if self.match == "exact" else tol


@register_check("greedy")
class GreedyCheck(Check[GreedySpec]):
    Spec = GreedySpec
    uses_goldens = True

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        prompt_ids = encode_or_skip(ctx.tokenizer, model_name=ctx.pool.resolved.name, prompt=self.spec.prompt,
                                    messages=self.spec.messages, if_no_chat_template=self.spec.if_no_chat_template)
        model, tokenizer = ctx.model, ctx.tokenizer
        assert_fits_context(model, len(prompt_ids), self.spec.max_new_tokens, what=self.spec.id)
        observed = observe_greedy(model, tokenizer, prompt_ids, self.spec.max_new_tokens)
        actual = golden_record(observed, tokenizer, settings=generation_settings(model),
                               max_new_tokens=self.spec.max_new_tokens)
        if ctx.goldens.update:
            refuse_nonfinite(observed, ctx.subject)
        other = ctx.goldens.judged_against()
        key = ctx.variant.key if ctx.variant else None
        rule = fingerprint_noise(ctx.variant.quant if ctx.variant else "fp16", dtype=compute_dtype(model),
                                 cross_device=other is not None)
        golden = ctx.goldens.reference(ctx.golden_path())
        sidecar_file = ctx.goldens.sidecar_of(ctx.golden_path())  # None: a live reference, no recording
        judgement = GoldenJudgement(
            observed=observed, tokenizer=tokenizer, tol=self.spec.judging(key, cross_device=other is not None),
            rescore=lambda ids: teacher_force(model, prompt_ids, ids, tokenizer=tokenizer), judged_against=other,
            golden=golden, update=ctx.goldens.update, sides=ctx.sides,
            localize=None if sidecar_file is None else
            lambda: sidecar_localization(sidecar_file, model, prompt_ids, rule=rule,
                                          caveat=f", recorded on {other}" if other else ""),
        )
        sidecar = sidecar_fingerprint(meta_path(ctx.golden_path()), model, prompt_ids, rule=rule) \
            if ctx.goldens.update else None
        ctx.assert_golden(actual, judgement.explain, judge=judgement.judge, sidecar=sidecar)
        label = f" (judged against {other} goldens)" if other else ""
        if other:
            ctx.note(f"{ctx.subject} judged against {other} goldens, tolerance {describe(judgement.tol)}")
        if judgement.verdict is not None:
            for tie in judgement.verdict.accepted_ties:
                ctx.note(render_tokens(tie.describe(ctx.subject, ctx.sides), tokenizer) + label)
        if ctx.goldens.update:
            recorded = judgement.expected if judgement.passed and judgement.expected else observed
            fragile = near_ties(recorded, self.spec.noise_model().tolerance(key).tie_gap)
            if fragile:
                where = ", ".join(f"step {s} (gap {g:.3g})" for s, g in fragile)
                ctx.note(f"fragile golden {ctx.subject}: its recorded path has near-ties that noise can flip "
                         f"at {where}; consider a shorter max_new_tokens or another prompt")


def describe(tol: Tolerance) -> str:
    return (f"mean |Δ log p| {tol.mean_abs_dlogp:g}, per step {tol.max_abs_dlogp:g}, tie gap {tol.tie_gap:g}"
            f"{tol.describe()}")


def refuse_nonfinite(observed: Observation, subject: str) -> None:
    """A golden is never recorded from NaN or infinite scores."""
    __tracebackhide__ = True
    bad = [i for i, step in enumerate(observed.steps) if not step.finite]
    if bad:
        raise CheckFailure(
            f"{subject}: the model's scores are NaN or infinite at step {bad[0]} (of {len(observed.steps)}), so "
            "no golden was recorded: NaN never becomes a reference. Fix the model (fp16 overflow, a broken "
            "kernel or attention mask), then record again."
        )


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


@dataclass
class GoldenJudgement:
    """Judges a greedy golden once and explains the verdict (the teacher forcing runs once)."""

    observed: Observation
    tokenizer: Any
    tol: Tolerance
    rescore: Any
    judged_against: str | None = None
    golden: Any = None  # the golden file read (named in a format error)
    update: bool = False
    sides: Sides = GOLDEN_SIDES  # how messages name the two runs (reference mode: OLD and NEW)
    localize: Callable[[], str] | None = None  # one line: where the model first changed (computed on failure only)
    expected: Observation | None = None
    verdict: Verdict | None = None
    problem: str | None = None
    passed: bool = False
    changes: list[str] = field(default_factory=list)

    def judge(self, expected: Any, actual: dict[str, Any]) -> bool:
        try:
            self.expected = parse_golden(expected)
        except OtherFormat as exc:
            if self.golden is not None and not self.update:
                raise GoldenError(f"Golden file {self.golden} cannot be judged: {exc}.") from None
            self.problem = str(exc)
            return False
        except GoldenFormatError as exc:
            self.problem = str(exc)
            return False
        self.changes = [f"{k}: {self.sides.expected_short} {expected.get(k)}, {self.sides.actual_short} {actual[k]}"
                        for k in ("prompt_tokens", "max_new_tokens") if expected.get(k) != actual[k]]
        self.verdict = compare(self.expected, self.observed, self.tol, rescore=self.rescore, sides=self.sides)
        same_ids = self.expected.token_ids == self.observed.token_ids
        if same_ids and expected.get("text") != actual["text"]:
            self.changes.append("the token ids are identical but the decoded text differs: the tokenizer's "
                                "decoding changed")
        settings = setting_changes(expected.get("generation"), actual["generation"], self.sides)
        self.passed = self.verdict.ok and not self.changes and not settings  # a changed setting fails, named
        return self.passed

    def explain(self, expected: Any, actual: dict[str, Any]) -> str:
        if self.problem is not None:
            return f"golden not judged: {self.problem}."
        lines = setting_changes(expected.get("generation"), actual["generation"], self.sides)
        lines += self.changes
        if self.verdict is not None and self.expected is not None:
            lines += [render_tokens(r, self.tokenizer) for r in self.verdict.reasons]
            lines += self._divergence_context()
            lines += [render_tokens(t.describe(sides=self.sides), self.tokenizer) for t in self.verdict.accepted_ties]
            lines.append(self.verdict.summary())
            if self.verdict.ok:
                lines.append("(the log-probabilities agree within noise)")
            else:
                lines.append(f"tolerance: {describe(self.tol)}")
            if self.localize is not None:
                lines.append(self.localize())
        if self.judged_against:
            lines.append(f"judged against {self.judged_against} goldens, with cross-device tolerance")
        lines += text_diff(str(expected.get("text", "")), actual["text"])
        return "\n".join(line for line in lines if line)

    def _divergence_context(self) -> list[str]:
        """The first differing step's top-k in both runs, as a reviewer reads them."""
        assert self.expected is not None and self.verdict is not None
        first = int(self.verdict.stats.get("first_divergence", -1))
        if first < 0 or first >= min(len(self.expected.steps), len(self.observed.steps)):
            return []
        def top(step: Any) -> str:
            return ", ".join(f"{describe_token(self.tokenizer, t)} {lp:.3f}" for t, lp in step.top)
        return [f"  {self.sides.expected_short} top-{len(self.expected.steps[first].top)} at new token {first}: "
                f"{top(self.expected.steps[first])}",
                f"  {self.sides.actual_of} top-{len(self.observed.steps[first].top)}: {top(self.observed.steps[first])}"]


def setting_changes(recorded: Any, current: dict[str, Any], sides: Sides = GOLDEN_SIDES) -> list[str]:
    """Effective generation settings that differ from the golden's, named (they apply under greedy too)."""
    if not isinstance(recorded, dict):
        return []
    def plain(name: str, value: Any) -> Any:
        return [value] if name == "eos_token_id" and isinstance(value, int) else value

    lines = []
    for name in sorted(set(recorded) | set(current)):
        if plain(name, recorded.get(name)) != plain(name, current.get(name)):
            lines.append(f"generation setting {name} changed: {sides.expected_short} {recorded.get(name)!r}, "
                         f"{sides.actual_short} {current.get(name)!r} (from the model's generation_config; it applies under greedy "
                         "decoding too, so it can explain this failure)")
    return lines


def text_diff(expected: str, actual: str) -> list[str]:
    diff = list(difflib.unified_diff(expected.splitlines(), actual.splitlines(), "expected", "actual",
                                     lineterm="", n=1))
    if not diff:
        return []
    lines = ["text diff:"] + ["  " + d for d in diff[:24]]
    if len(diff) > 24:
        lines.append(f"  ... ({len(diff) - 24} more diff lines)")
    return lines


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
