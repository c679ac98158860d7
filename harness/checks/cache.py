"""``cache``: greedy decoding with the KV cache must behave like recomputing everything each step.

The reference is ``generate(use_cache=False)``: every step runs the whole
sequence again, so no cache can be wrong (its run is read from one forward
pass along a cached run's path where that pass picks the same tokens:
``no_cache_run``). The same prompts are decoded with the default dynamic cache
and, where listed, a static (pre-allocated) cache; each is judged against the
reference by the comparison engine under the variant's noise tolerance. A
cache that is ignored, stale, mis-positioned (rope offsets) or mis-masked shows
up as a divergence with the log-prob evidence; kernels that merely order sums
differently stay within noise. After an accepted near-tie, the reference's
remaining tokens are scored (teacher forcing) with the same cache that
diverged, dynamic or static.

Neither side is assumed right: the no-cache path has been the broken one in
transformers before. Where a cache and the recompute disagree beyond noise, a
float32 forward of the same tokens (the model's 4-bit layers dequantized) is
asked which of the two it agrees with, and the failure says so.

A cache that raises (a static cache the model does not support, or a bug) is
never passed over: the item is NOT JUDGED with the real error, unless another
cache already failed it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, register_check
from harness.checks.consistency import ConsistencySpec, Findings, encoded_prompts, greedy, rescorer, tolerance_for

if TYPE_CHECKING:
    from harness.checks.consistency import Prompt
    from harness.observe.observation import Observation

CacheMode = Literal["dynamic", "static"]


class CacheSpec(ConsistencySpec):
    """Greedy decoding with a KV cache must behave like recomputing the whole sequence at every step, within
    noise."""

    kind: Literal["cache"]
    caches: list[CacheMode] = Field(default_factory=lambda: ["dynamic", "static"], min_length=1,
                                    description="The caches compared with recomputing: dynamic (the default one of "
                                                "`generate`) and static (pre-allocated).")

    @field_validator("caches")
    @classmethod
    def _unique(cls, value: list[CacheMode]) -> list[CacheMode]:
        if len(set(value)) != len(value):
            raise ValueError("list each cache at most once")
        return value


@register_check("cache")
class CacheCheck(Check[CacheSpec]):
    Spec = CacheSpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        from harness.judge.compare import compare, sides
        from harness.errors import NotJudged

        model, tokenizer = ctx.model, ctx.tokenizer
        tol = tolerance_for(ctx, self.spec)
        findings = Findings(self.spec.id, tokenizer)
        errors: list[str] = []
        arbiter = Float32Arbiter(model)
        for prompt in encoded_prompts(ctx, self.spec):
            runs: dict[CacheMode, Observation] = {}
            for cache in self.spec.caches:
                try:
                    runs[cache] = greedy(model, tokenizer, prompt, self.spec.max_new_tokens, **cache_mode_kwargs(cache))
                except Exception as exc:  # noqa: BLE001 - the real error is the verdict's reason
                    errors.append(f"prompt {prompt.label}, {cache} cache: {type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:300]}")
            if not runs:
                continue
            reference = no_cache_run(model, tokenizer, prompt, self.spec.max_new_tokens, next(iter(runs.values())))
            for cache, actual in runs.items():
                named = sides("no-cache", f"{cache}-cache")
                with cache_default(model, cache):
                    verdict = compare(reference, actual, tol, rescore=rescorer(model, tokenizer, prompt), sides=named)
                what = f"prompt {prompt.label}, {cache} cache vs no cache"
                findings.add(what, verdict, named)
                if not verdict.ok:
                    findings.problems[-1] += "\n      " + arbiter.verdict(prompt, reference, actual, cache)
        if errors:
            ctx.record(cache_errors=errors)
        findings.finish(
            ctx, headline="decoding with the KV cache differs from recomputing without it", tol=tol,
            fix="A cache that is ignored, stale or wrongly positioned (rope offsets, cache_position, the "
                "attention mask over cached keys) makes cached decoding drift from the full recompute; a "
                "recompute that masks or positions tokens wrongly does the same the other way round (the "
                "float32 line says which side is wrong). If the differences are only numerical, raise "
                "`tolerance`." + (f" Also not judged: {'; '.join(errors)}." if errors else ""),
        )
        if errors:
            raise NotJudged(
                f"{ctx.subject}: decoding raised, so that cache was not judged: {'; '.join(errors)}. A cache the "
                "model does not support is left out with `caches: [dynamic]`; otherwise this is a bug in the "
                "model's cache handling (or the harness's)"
            )


def no_cache_run(model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int, cached: Observation) -> Observation:
    """What ``generate(use_cache=False)`` decodes, from one forward pass where it can be had so.

    A no-cache decoding step is a forward pass over the whole sequence so far, and its scores are
    the ones a single forward pass over prompt + path gives at that position (another matrix
    shape, the same sums). So where that pass, along a cached run's path, prefers the same token
    at every step, recomputing step by step would reproduce the path with these scores; where it
    prefers another token anywhere (or a logits processor acts), the recompute is decoded for real.
    """
    from harness.observe.scores import forward_scores, free_run_of, processors_act_in, standing_for

    if cached.steps and not processors_act_in(model):
        scored = standing_for(forward_scores(model, prompt.ids, cached.token_ids).steps, len(cached.steps))
        run = free_run_of(scored, cached, prompt.ids) if scored is not None else None
        if run is not None and run.token_ids == cached.token_ids:
            return run
    return greedy(model, tokenizer, prompt, max_new_tokens, use_cache=False)


def cache_mode_kwargs(cache: CacheMode) -> dict[str, Any]:
    return {} if cache == "dynamic" else {"cache_implementation": cache}


@contextlib.contextmanager
def cache_default(model: Any, cache: CacheMode) -> Iterator[None]:
    """Make ``cache`` what ``generate`` uses when the call names none, so that the engine's teacher forcing
    (after an accepted near-tie) scores the reference's tokens through the cache under test."""
    config = getattr(model, "generation_config", None)
    if config is None or cache == "dynamic":
        yield
        return
    previous = getattr(config, "cache_implementation", None)
    config.cache_implementation = cache
    try:
        yield
    finally:
        config.cache_implementation = previous


class Float32Arbiter:
    """A float32 forward of the same tokens, in one pass without any cache: which decoding it sides with.

    Built lazily (only when a pair disagrees) and once per item: a float32 copy costs twice a
    16-bit model's memory, eight times an NF4 one's.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._copy: Any = None
        self._error: str | None = None

    def _float32(self) -> Any:
        if self._copy is None and self._error is None:
            from harness.models.quantized import float32_copy

            try:
                self._copy = float32_copy(self.model)
            except Exception as exc:  # noqa: BLE001 - the arbiter is extra evidence, not the verdict
                self._error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        return self._copy

    def verdict(self, prompt: Prompt, no_cache: Observation, cached: Observation, cache: str) -> str:
        """One line: which run the float32 forward agrees with, with the figures."""
        f32 = self._float32()
        if f32 is None:
            return f"float32 arbiter unavailable ({self._error}), so which side is wrong is not known"
        gaps = {name: chosen_gap(f32, prompt.ids, obs) for name, obs in (("no-cache", no_cache), (cache, cached))}
        choice = first_choice(f32, prompt.ids, no_cache, cached)
        closer = min(gaps, key=lambda n: gaps[n])
        other = next(n for n in gaps if n != closer)
        broken = (f"the {cache} cache is the broken path" if closer == "no-cache"
                  else "the no-cache recompute is the broken path, not the cache")
        return (f"float32 forward of the same tokens (one pass, no cache): agrees with the {closer} run (mean "
                f"|Δ log p| {gaps[closer]:.4g} on its chosen tokens, against {gaps[other]:.4g} for the {other} "
                f"run){choice}: {broken}")


def chosen_gap(f32: Any, prompt_ids: list[int], observation: Observation) -> float:
    """Mean |Δ log p| of a run's chosen tokens between that run and a float32 forward of the same tokens."""
    steps = observation.steps
    if not steps:
        return 0.0
    logprobs = _forward(f32, prompt_ids, [s.token_id for s in steps])
    deltas = [abs(float(logprobs[i, s.token_id]) - s.logprob) for i, s in enumerate(steps)]
    return sum(deltas) / len(deltas)


def first_choice(f32: Any, prompt_ids: list[int], a: Observation, b: Observation) -> str:
    """At the first step where the two runs chose differently, the token float32 prefers."""
    first = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
    if first is None:
        return ""
    logprobs = _forward(f32, prompt_ids, list(a.token_ids[:first]))
    best = int(logprobs[first].argmax())
    which = ("the no-cache run's" if best == a.token_ids[first] else "the cached run's" if best == b.token_ids[first]
             else "neither run's")
    return f"; at step {first} it prefers token {best} ({which} choice)"


def _forward(model: Any, prompt_ids: list[int], token_ids: list[int]) -> Any:
    """Log-probs (float32, CPU) of the next token after the prompt and each of ``token_ids``: one row each."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids) + list(token_ids)], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)[len(prompt_ids) - 1:].cpu()
