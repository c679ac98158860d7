"""``greedy``: greedy-generation snapshots per variant and device class, judged up to numerical noise.

A golden (format 2) holds what a reviewer reads first, the text and the token
ids, then the effective generation settings and one trace line per step: the
chosen token's log-probability and the top-k alternatives with theirs, from the
scores decoding actually used. A run passes when it is the same behaviour up to
the noise of its variant (``harness.judge.compare``): identical ids with log-probs
within tolerance, or a reported near-tie whose remaining golden tokens still
score within tolerance under the model.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.observe.prompts import (
    IF_NO_CHAT_TEMPLATE_HELP, MESSAGES_HELP, PROMPT_HELP, ChatMessages, PromptText, assert_fits_context,
    describe_token, encode_or_skip, greedy_generate,
)
from harness.judge import path_noise
from harness.judge.allowance import Allowance, NoiseRecordError, PathNoise, as_allowance, recorded_allowance
from harness.judge.compare import GOLDEN_SIDES, Sides, Verdict, compare, render_tokens, top2_margin
from harness.judge.path_noise import free_run_of, path_scores, processors_act, standing_for, undecided
from harness.judge.tolerance import (
    CROSS_DEVICE_FACTOR, CROSS_DEVICE_LABEL, DEFAULT_TOLERANCES, TOLERANCE_HELP, Tolerance, ToleranceSpec,
)
from harness.diff.activations import compute_dtype
from harness.diff.fingerprints import fingerprint_noise, sidecar_fingerprint, sidecar_localization
from harness.errors import CheckFailure, GoldenError
from harness.golden import judged_record, meta_path
from harness.observe.observation import (
    DEFAULT_TOP_K, Observation, Step, TraceError, from_trace, generation_settings, observe_greedy,
    teacher_force, to_trace,
)

FORMAT = 2
GOLDEN_KEYS = frozenset({"format", "text", "new_token_ids", "prompt_tokens", "max_new_tokens", "stop",
                         "generation", "top_k", "trace"})


class GreedySpec(CheckSpec):
    """A greedy generation is a golden per variant and device class: text, token ids and each step's
    log-probabilities, judged up to numerical noise. A changed token fails with the first divergence."""

    kind: Literal["greedy"]
    prompt: PromptText | None = Field(None, description=PROMPT_HELP)
    messages: ChatMessages | None = Field(None, description=MESSAGES_HELP)
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Tokens to generate (fewer where the model stops).")
    if_no_chat_template: Literal["fail", "skip"] = Field("fail", description=IF_NO_CHAT_TEMPLATE_HELP)
    tolerance: ToleranceSpec | None = Field(None, description=TOLERANCE_HELP)
    match: Literal["noise", "exact"] = Field("noise", description=(
        "`noise`: a different token passes as a reported near-tie within `tie_gap`; `exact`: every token must "
        "match (log-probabilities still within noise)."))

    @model_validator(mode="after")
    def _one_prompt(self) -> GreedySpec:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (raw text) or 'messages' (chat)")
        return self

    def ignored(self) -> dict[str, str]:
        if self.match == "exact" and self.tolerance is not None and self._sets_tie_gap():
            return {"tolerance": "match: exact accepts no flip at all, so a tie_gap cannot take effect; remove "
                                 "tie_gap, or set `match: noise` to accept near-ties within it"}
        return {}

    def _sets_tie_gap(self) -> bool:
        override = self.tolerance.as_override() if self.tolerance is not None else {}
        return "tie_gap" in override or any(isinstance(v, dict) and "tie_gap" in v for v in override.values())

    def judging(self, variant_key: str | None, *, cross_device: bool, half: str = "float16") -> Tolerance:
        """This check's tolerance; ``match: exact`` accepts no near-tie (log-probs still within noise)."""
        tol = self.noise_model(half=half).tolerance(variant_key, cross_device=cross_device)
        return replace(tol, tie_gap=0.0, source=f"{tol.source}, match: exact") if self.match == "exact" else tol


@register_check("greedy")
class GreedyCheck(Check[GreedySpec]):
    Spec = GreedySpec
    uses_goldens = True

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        prompt_ids = encode_or_skip(ctx.tokenizer, model=ctx.pool.resolved, prompt=self.spec.prompt,
                                    messages=self.spec.messages, if_no_chat_template=self.spec.if_no_chat_template,
                                    recorded=ctx.recorded_against)
        model, tokenizer = ctx.model, ctx.tokenizer
        assert_fits_context(model, len(prompt_ids), self.spec.max_new_tokens, what=self.spec.id)
        settings = generation_settings(model)
        run = _Run(ctx=ctx, spec=self.spec, model=model, tokenizer=tokenizer, prompt_ids=list(prompt_ids),
                   settings=settings, processors_act=processors_act(settings))
        run.judge_and_record()


@dataclass
class _Run:
    """One greedy item: score the golden's path (one forward); decode wherever that pass does not decide."""

    ctx: CheckContext
    spec: GreedySpec
    model: Any
    tokenizer: Any
    prompt_ids: list[int]
    settings: dict[str, Any]
    processors_act: bool
    golden: Observation | None = None  # the golden as peeked before judging (None: missing, unreadable, live record)

    @property
    def other(self) -> str | None:
        return self.ctx.goldens.judged_against()

    def free_run(self) -> Observation:
        return observe_greedy(self.model, self.tokenizer, self.prompt_ids, self.spec.max_new_tokens)

    def record(self, observed: Observation) -> dict[str, Any]:
        return golden_record(observed, self.tokenizer, settings=self.settings, max_new_tokens=self.spec.max_new_tokens)

    def judge_and_record(self) -> None:
        __tracebackhide__ = True
        ctx, path = self.ctx, self.ctx.golden_path()
        golden_data = ctx.goldens.peek(path)
        golden = _parsed(golden_data)
        update = ctx.goldens.update
        noise, noise_note = (None, "")
        if golden is not None and update:  # this machine's noise around the golden's own path
            noise = self.measure(Observation(tuple(self.prompt_ids), teacher_force(
                self.model, self.prompt_ids, golden.token_ids, tokenizer=self.tokenizer), golden.stop))
        elif golden is not None:
            noise, noise_note = recorded_path_noise(ctx.goldens.sidecar_of(path), len(golden.steps),
                                                    gate=ctx.goldens.gate)
        self.golden = golden
        judgement, observed = None, None
        scored = self.scored_path(golden)
        if scored is not None:  # the golden's path in one pass: judged without decoding where it passes
            observed = free_run_of(scored, golden, self.prompt_ids)  # type: ignore[arg-type]
            judgement = self.judgement(noise, observed, rescore=lambda _ids: scored)
            if not self.ctx.one_pass_goldens and undecided(scored, golden, as_allowance(judgement.tol, len(scored))):
                judgement = None  # not decisive: only a real decode's verdict counts
        if judgement is None or not judgement.judge(golden_data, self.record(observed)):  # type: ignore[arg-type]
            observed = self.free_run()  # decode step by step: the verdict and its evidence come from the real run
            judgement = self.judgement(noise, observed)
        actual = self.record(observed)
        sidecar, recorded = None, None
        if update:
            refuse_nonfinite(observed, ctx.subject)
            kept = golden_data is not None and judgement.judge(golden_data, actual)
            recorded = golden if kept else observed
            if not kept:
                if golden_data is not None:
                    ctx.note(f"{ctx.subject} re-recorded: " + _first_line(judgement.explain(golden_data, actual)))
                noise = self.measure(observed, repeat=self.second_recording(observed) if self.may_vary() else None)
            sidecar = {**sidecar_fingerprint(meta_path(path), self.model, self.prompt_ids, rule=self.rule()),
                       "path_noise": noise.to_json()}
        ctx.assert_golden(actual, judgement.explain, judge=judgement.judge, sidecar=sidecar)
        self.notes(judgement, noise_note, recorded=recorded, noise=noise)

    # -- pieces ----------------------------------------------------------------------------------
    def scored_path(self, golden: Observation | None) -> tuple[Step, ...] | None:
        """The model's scores of the golden's whole path in one pass (None: nothing to score)."""
        if golden is None or not 0 < len(golden.steps) <= self.spec.max_new_tokens:
            return None
        return standing_for(path_scores(self.model, self.tokenizer, self.prompt_ids, golden.token_ids,
                                        processors_act=self.processors_act), len(golden.steps))

    def judgement(self, noise: PathNoise | None, observed: Observation,
                  rescore: Callable[[list[int]], tuple[Step, ...]] | None = None) -> GoldenJudgement:
        ctx, model, tokenizer, prompt_ids = self.ctx, self.model, self.tokenizer, self.prompt_ids
        sidecar_file = ctx.goldens.sidecar_of(ctx.golden_path())  # None: a live reference, no recording
        other, rule = self.other, self.rule()
        return GoldenJudgement(
            observed=observed, tokenizer=tokenizer, tol=self.allowance(noise),
            rescore=rescore or (lambda ids: teacher_force(model, prompt_ids, ids, tokenizer=tokenizer)),
            judged_against=other,
            golden=ctx.goldens.reference(ctx.golden_path()), update=ctx.goldens.update, sides=ctx.sides,
            recorded_environment=noise.environment if noise is not None else None,
            environment=path_noise.environment(model),
            localize=None if sidecar_file is None else
            lambda: sidecar_localization(sidecar_file, model, prompt_ids, rule=rule,
                                          caveat=f", recorded on {other}" if other else ""),
        )

    def allowance(self, noise: PathNoise | None) -> Tolerance | Allowance:
        """The golden's recorded noise where it has one; the flat tolerance otherwise."""
        key = self.ctx.variant.key if self.ctx.variant else None
        cross = self.other is not None
        flat = self.spec.judging(key, cross_device=cross, half=self.ctx.half)
        if noise is None:
            return flat
        chosen = [step.logprob for step in self.golden.steps] if self.golden is not None else None
        built_in = DEFAULT_TOLERANCES[self.ctx.variant.quant if self.ctx.variant else "fp16"]
        return recorded_allowance(noise, chosen_logprobs=chosen, overrides=flat if flat.where else None,
                                  built_in=built_in,
                                  exact=self.spec.match == "exact",
                                  scale=CROSS_DEVICE_FACTOR if cross else 1.0,
                                  scale_label=CROSS_DEVICE_LABEL if cross else "")

    def rule(self) -> Any:
        quant = self.ctx.variant.quant if self.ctx.variant else "fp16"
        return fingerprint_noise(quant, dtype=compute_dtype(self.model), cross_device=self.other is not None)

    def measure(self, recorded: Observation, *, repeat: Observation | None = None) -> PathNoise:
        return path_noise.measure(
            self.model, self.tokenizer, self.prompt_ids, recorded, processors_act=self.processors_act, repeat=repeat,
            environment=path_noise.environment(self.model))

    def may_vary(self) -> bool:
        """Whether two recordings on this device can differ: CUDA kernels need not be deterministic (atomics,
        split-K); CPU kernels are, for a fixed thread count, so a second CPU recording repeats the first bit for
        bit and only costs a decode (another thread count is a benign change, judged against the recorded noise
        like any other)."""
        return any(p.device.type != "cpu" for p in self.model.parameters())

    def second_recording(self, first: Observation) -> Observation:
        """A new golden is recorded twice: a path this machine does not reproduce is never written."""
        __tracebackhide__ = True
        again = self.free_run()
        if again.token_ids != first.token_ids:
            at = next((i for i, (a, b) in enumerate(zip(first.token_ids, again.token_ids)) if a != b),
                      min(len(first.token_ids), len(again.token_ids)))
            raise CheckFailure(
                f"{self.ctx.subject}: not recorded, the model is not reproducible on this machine: recorded twice, "
                f"the greedy output differs from new token {at} on (nondeterministic kernels, or a model that "
                "samples). A golden that its own machine cannot reproduce would fail at random. Fix: make decoding "
                "deterministic (on CUDA: torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG), then record "
                "again.")
        return again

    def notes(self, judgement: GoldenJudgement, noise_note: str, *, recorded: Observation | None,
              noise: PathNoise | None) -> None:
        """Never silent: what was forgiven, what is fragile, what was judged against what."""
        ctx, other = self.ctx, self.other
        label = f" (judged against {other} goldens)" if other else ""
        if other:
            ctx.note(f"{ctx.subject} judged against {other} goldens, tolerance {describe(judgement.tol)}")
        if noise_note:
            ctx.note(f"{ctx.subject}: {noise_note}")
        steps = len(judgement.expected.steps) if judgement.expected is not None else self.spec.max_new_tokens
        for line in as_allowance(judgement.tol, steps).widened:
            ctx.forgive(f"widened tolerance for {ctx.subject}: {line}")
        if judgement.passed and judgement.verdict is not None and judgement.expected is not None:
            for tie in judgement.verdict.accepted_ties:
                ctx.forgive(render_tokens(tie.describe(ctx.subject, ctx.sides), self.tokenizer) + label)
            allowance = as_allowance(judgement.tol, len(judgement.expected.steps))
            ctx.count_flips(len(judgement.verdict.accepted_ties),
                            allowance.flip_probabilities([top2_margin(s) for s in judgement.expected.steps]))
        if recorded is not None and noise is not None:  # an update: what the golden now carries
            repeat = noise.flips.get("a second recording")
            if "a second recording" in noise.conditions:
                ctx.note(f"{ctx.subject}: recorded twice, the log-probabilities differed (kept in its noise record)"
                         + (f"; the second recording preferred other tokens at steps {list(repeat)}" if repeat else ""))
            fragile = fragile_steps(recorded, noise)
            if fragile:
                ctx.note(f"fragile golden {ctx.subject}: at {len(fragile)} step(s) its margin is within its own "
                         f"recorded noise, where a benign change can flip it (steps {', '.join(map(str, fragile))}); "
                         "flips there are accepted within a budget. A shorter max_new_tokens or another prompt "
                         "judges more strictly")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "the golden differs")


def fragile_steps(golden: Observation, noise: PathNoise) -> list[int]:
    """Steps whose recorded margin is within the margin allowance its noise gives."""
    allowance = recorded_allowance(noise, chosen_logprobs=[s.logprob for s in golden.steps[: len(noise)]])
    return [i for i, step in enumerate(golden.steps[: len(noise)]) if top2_margin(step) < allowance.margin_bound(i)]


def _parsed(data: Any) -> Observation | None:
    """A golden's observation where this version reads it; None lets the store name what is wrong."""
    if data is None:
        return None
    try:
        return parse_golden(data)
    except GoldenFormatError:
        return None


def recorded_path_noise(sidecar: Path | None, steps: int, *, gate: bool = False) -> tuple[PathNoise | None, str]:
    """The noise record a golden's sidecar holds, or None with a note saying why it is judged with the defaults.

    A record is a tolerance: outside a gate run, one that is missing, unreadable, above the cap
    or not vouched for by its sidecar's sha256 falls back to the built-in defaults (said in a
    note). A gate run does not judge with what it cannot trust, and the defaults can forgive
    more than the record they stand in for, so there each of those is a ``GoldenError``.
    """
    __tracebackhide__ = True
    if sidecar is None:
        return None, ""  # a live reference: nothing was recorded
    record, untrusted = judged_record(sidecar, "path_noise", label="noise record",
                                      missing=" (recorded before goldens carried their noise)")
    problem = untrusted
    noise = None
    if record is not None and problem is None:
        try:
            noise = PathNoise.from_json(record)
        except NoiseRecordError as exc:
            problem = f"its noise record cannot be read ({exc})"
    if noise is not None and len(noise) != steps:
        problem = (f"its noise record has {len(noise)} steps and the golden {steps} (the golden was replaced "
                   "without its sidecar?)")
    if problem is None:
        return noise, ""
    if gate:
        raise GoldenError(
            f"Golden sidecar {sidecar} is not vouched for as this gate run's tolerance: {problem}. The noise record "
            "is the golden's tolerance, and a gate does not judge with one it cannot trust (nor with the built-in "
            "defaults in its place, which may forgive more). Fix: record the golden with --snapshot-update, which "
            "writes its noise record and that record's sha256, review and commit both; or restore the sidecar "
            "from version control.")
    return None, f"{problem}: judged with the built-in defaults; re-record with --snapshot-update"


def describe(tol: Tolerance | Allowance) -> str:
    if isinstance(tol, Allowance):
        steps, margins = tol.step, tol.margin
        return (f"per step |Δ log p| {min(steps):.3g}-{max(steps):.3g}, margin {min(margins):.3g}-{max(margins):.3g}"
                f"{tol.describe()}")
    return (f"mean |Δ log p| {tol.mean_abs_dlogp:g}, per step {tol.max_abs_dlogp:g}, tie gap {tol.tie_gap:g}"
            f"{tol.describe()}")


def environment_changes(recorded: Any, current: Any) -> list[str]:
    """Where the golden's noise was measured vs this run: the numerics' context, shown on failure."""
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return []
    changed = [f"{k} {recorded.get(k, '(not recorded)')} -> {current.get(k, '(not recorded)')}"
               for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    return [f"  numerics: recorded with {', '.join(changed)} (within the recorded noise only where the change is benign)"] \
        if changed else []


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
    """Judges a greedy golden and explains the verdict (once per golden: the store asks again)."""

    observed: Observation
    tokenizer: Any
    tol: Tolerance | Allowance
    rescore: Any
    judged_against: str | None = None
    golden: Any = None  # the golden file read (named in a format error)
    update: bool = False
    sides: Sides = GOLDEN_SIDES  # how messages name the two runs (reference mode: OLD and NEW)
    localize: Callable[[], str] | None = None  # one line: where the model first changed (computed on failure only)
    recorded_environment: Any = None  # where the golden's noise was measured (kernel, ISA, threads, dtypes)
    environment: Any = None  # the same for this run
    expected: Observation | None = None
    verdict: Verdict | None = None
    problem: str | None = None
    passed: bool = False
    changes: list[str] = field(default_factory=list)
    _judged: tuple[str, tuple[int, ...]] | None = None

    def judge(self, expected: Any, actual: dict[str, Any]) -> bool:
        key = (json.dumps(expected, sort_keys=True, default=str), tuple(actual.get("new_token_ids", ())),
               json.dumps(actual.get("generation"), sort_keys=True, default=str))  # a settings change is judged too
        if self._judged == key:
            return self.passed
        self._judged = key
        self.verdict, self.problem, self.changes = None, None, []
        try:
            self.expected = parse_golden(expected)
        except OtherFormat as exc:
            if self.golden is not None and not self.update:
                raise GoldenError(f"Golden file {self.golden} cannot be judged: {exc}.") from None
            self.problem = str(exc)
            self.passed = False
            return False
        except GoldenFormatError as exc:
            self.problem = str(exc)
            self.passed = False
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
                lines += environment_changes(self.recorded_environment, self.environment)
            if self.localize is not None:
                lines.append(self.localize())
        if self.judged_against:
            lines.append(f"judged against {self.judged_against} goldens, with the {CROSS_DEVICE_LABEL} tolerance")
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
