"""``greedy``: greedy-generation snapshots per variant and device class, judged up to numerical noise.

The golden's format is ``harness.golden.greedy_format``, its judge ``harness.judge.greedy``;
this module observes and records. A run passes when it is the same behaviour up to
the noise of its variant (``harness.judge.compare``): identical ids with log-probs
within tolerance, or a reported near-tie whose remaining golden tokens still
score within tolerance under the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.observe.prompts import (
    IF_NO_CHAT_TEMPLATE_HELP, MESSAGES_HELP, PROMPT_HELP, ChatMessages, PromptText, assert_fits_context,
    encode_or_skip,
)
from harness.judge import path_noise
from harness.judge.allowance import (
    Allowance, NoiseRecordError, PathNoise, as_allowance, flat_allowance, recorded_allowance,
)
from harness.judge.compare import render_tokens
from harness.judge.greedy import GoldenJudgement, describe
from harness.judge.tolerance import DEFAULT_TOLERANCES, TOLERANCE_HELP, Tolerance, ToleranceSpec
from harness.models.introspect import compute_dtype
from harness.judge.fingerprints import fingerprint_noise, sidecar_fingerprint, sidecar_localization
from harness.errors import CheckFailure, GoldenError
from harness.golden import judged_record, meta_path
from harness.golden.greedy_format import golden_record, parsed_golden
from harness.observe.observation import Observation, Step, generation_settings, observe_greedy
from harness.observe.scores import free_run_of, path_scores, processors_act, standing_for, teacher_force, top2_margin


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
        """This check's tolerance, named with its ``match:`` (``Allowance.exact`` is what refuses every flip)."""
        tol = self.noise_model(half=half).tolerance(variant_key, cross_device=cross_device)
        return replace(tol, source=f"{tol.source}, match: exact") if self.match == "exact" else tol


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
        golden = parsed_golden(golden_data)
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
            if not self.ctx.one_pass_goldens and path_noise.undecided(scored, golden, as_allowance(judgement.tol, len(scored))):
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
        exact = self.spec.match == "exact"
        if noise is None:
            steps = len(self.golden.steps) if self.golden is not None else self.spec.max_new_tokens
            return flat_allowance(flat, steps, exact=True) if exact else flat
        chosen = [step.logprob for step in self.golden.steps] if self.golden is not None else None
        built_in = DEFAULT_TOLERANCES[self.ctx.variant.quant if self.ctx.variant else "fp16"]
        return recorded_allowance(noise, chosen_logprobs=chosen, overrides=flat if flat.where else None,
                                  built_in=built_in,
                                  exact=exact,
                                  cross_device=cross)

    def rule(self) -> Any:
        quant = self.ctx.variant.quant if self.ctx.variant else "fp16"
        return fingerprint_noise(quant, dtype=compute_dtype(self.model), cross_device=self.other is not None)

    def measure(self, recorded: Observation, *, repeat: Observation | None = None) -> PathNoise:
        return path_noise.measure_path_noise(
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
