"""``cache``: greedy decoding with the KV cache must behave like recomputing everything each step.

The reference is ``generate(use_cache=False)``: every step runs the whole
sequence again, so no cache can be wrong. The same prompts are then decoded
with the default dynamic cache and, where the model supports it, a static
(pre-allocated) cache; each is judged against the reference by the comparison
engine under the variant's noise tolerance. A cache that is ignored, stale,
mis-positioned (rope offsets) or mis-masked shows up as a divergence with the
log-prob evidence; kernels that merely order sums differently stay within noise.
After an accepted near-tie, the reference's remaining tokens are scored with
the dynamic cache (teacher forcing); the static mode leaves them unjudged
(counted in the figures) because the engine's teacher forcing uses the dynamic cache.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, register_check
from harness.checks.consistency import ConsistencySpec, Findings, encoded_prompts, greedy, rescorer, tolerance_for

CacheMode = Literal["dynamic", "static"]


class CacheSpec(ConsistencySpec):
    kind: Literal["cache"]
    caches: list[CacheMode] = Field(default_factory=lambda: ["dynamic", "static"], min_length=1)

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
        model, tokenizer = ctx.model, ctx.tokenizer
        tol = tolerance_for(ctx, self.spec)
        findings = Findings(self.spec.id, tokenizer)
        unsupported: list[str] = []
        for prompt in encoded_prompts(ctx, self.spec):
            reference = greedy(model, tokenizer, prompt, self.spec.max_new_tokens, use_cache=False)
            for cache in self.spec.caches:
                kwargs: dict[str, Any] = {} if cache == "dynamic" else {"cache_implementation": "static"}
                try:
                    actual = greedy(model, tokenizer, prompt, self.spec.max_new_tokens, **kwargs)
                except Exception as exc:  # noqa: BLE001 - an unsupported cache is reported, not a crash
                    if cache == "dynamic":
                        raise
                    unsupported.append(f"{cache}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    continue
                from harness.compare import compare, sides

                rescore = rescorer(model, tokenizer, prompt) if cache == "dynamic" else None
                named = sides("no-cache", f"{cache}-cache")
                findings.add(f"prompt {prompt.label}, {cache} cache vs no cache",
                             compare(reference, actual, tol, rescore=rescore, sides=named), named)
        if unsupported:
            ctx.record(cache_unsupported=sorted(set(unsupported)))
        findings.finish(
            ctx, headline="decoding with the KV cache differs from recomputing without it", tol=tol,
            fix="A cache that is ignored, stale or wrongly positioned (rope offsets, cache_position, the "
                "attention mask over cached keys) makes cached decoding drift from the full recompute. "
                "Fix the model's cache handling; if the differences are only numerical, raise `tolerance`.",
        )
