"""``lora_merge``: an adapter merged into its base behaves like the adapter applied on the fly.

Users ship merged weights (``merge_and_unload()``) to skip the LoRA matmuls at
inference. On a 16-bit base the merge is exact up to rounding, so the merged
model's greedy output is judged against the unmerged adapter by the
comparison engine under the variant's noise tolerance. On an NF4 base the
merge dequantizes, adds the delta and quantizes again (peft warns that outputs
may differ): there the check reports the drift the merge causes (mean and max
|Δ log p| of the unmerged greedy tokens, teacher-forced through the merged
model, and the first step where the merged model's choice differs) and fails
only beyond ``nf4_budget``. The merge runs on a deep copy: the pool's loaded
model is never touched.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.checks.base import Check, CheckContext, register_check
from harness.checks.consistency import ConsistencySpec, Findings, encoded_prompts, greedy, rescorer, tolerance_for
from harness.errors import CheckFailure, NotJudged

ADAPTER_KEYS = ["fp16-lora", "nf4-lora"]


class MergeBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_mean_abs_dlogp: float | None = Field(None, ge=0)
    max_abs_dlogp: float | None = Field(None, ge=0)


class LoraMergeSpec(ConsistencySpec):
    kind: Literal["lora_merge"]
    nf4_budget: MergeBudget = Field(default_factory=MergeBudget)

    @model_validator(mode="before")
    @classmethod
    def _adapter_variants(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variants") is None:
            data = {**data, "variants": list(ADAPTER_KEYS)}
        return data

    def ignored(self) -> dict[str, str]:
        """nf4_budget judges only nf4-lora; the tolerance only fp16-lora (NF4 merges are judged by the budget)."""
        variants = set(self.variants or ADAPTER_KEYS)
        out: dict[str, str] = {}
        if "nf4-lora" not in variants and self.nf4_budget != MergeBudget():
            out["nf4_budget"] = (f"nf4_budget judges only the nf4-lora variant, and this check runs on "
                                 f"{', '.join(sorted(variants))}; add nf4-lora to `variants:` or remove nf4_budget")
        if "fp16-lora" not in variants and self.tolerance is not None:
            out["tolerance"] = (f"the tolerance judges only the fp16-lora merge (an NF4 merge is judged by "
                                f"nf4_budget), and this check runs on {', '.join(sorted(variants))}; use nf4_budget")
        return out


@register_check("lora_merge")
class LoraMergeCheck(Check[LoraMergeSpec]):
    Spec = LoraMergeSpec

    @classmethod
    def unjudgeable(cls, variant_key: str) -> str | None:
        if variant_key in ADAPTER_KEYS:
            return None
        return f"lora_merge compares an adapter with its merge, and {variant_key} has no adapter " \
               f"(use {' or '.join(ADAPTER_KEYS)})"

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        assert ctx.variant is not None
        why = self.unjudgeable(ctx.variant.key)
        if why:  # collection gives such variants no item; never a green skip if one runs anyway
            raise NotJudged(why)
        model, tokenizer = ctx.model, ctx.tokenizer
        prompts = encoded_prompts(ctx, self.spec)
        unmerged = [greedy(model, tokenizer, p, self.spec.max_new_tokens) for p in prompts]
        merged = merged_copy(model)
        try:
            if ctx.variant.quant == "nf4":
                self._nf4_drift(ctx, merged, prompts, unmerged)
            else:
                self._same_behaviour(ctx, merged, prompts, unmerged)
        finally:
            del merged

    def _same_behaviour(self, ctx: CheckContext, merged: Any, prompts: list[Any], unmerged: list[Any]) -> None:
        __tracebackhide__ = True
        from harness.compare import compare, sides

        named = sides("unmerged", "merged")
        tokenizer = ctx.tokenizer
        tol = tolerance_for(ctx, self.spec)
        findings = Findings(self.spec.id, tokenizer)
        for prompt, reference in zip(prompts, unmerged):
            actual = greedy(merged, tokenizer, prompt, self.spec.max_new_tokens)
            findings.add(f"prompt {prompt.label}, merged vs unmerged adapter",
                         compare(reference, actual, tol, rescore=rescorer(merged, tokenizer, prompt), sides=named),
                         named)
        findings.finish(
            ctx, headline="the merged adapter (merge_and_unload) does not behave like the unmerged one", tol=tol,
            fix="On a 16-bit base a merge only rounds. A larger change means a LoRA delta was lost or "
                "applied twice (a module the merge skipped, a wrong scaling, fan_in_fan_out), or the "
                "adapter's modules do not match the base. Check the adapter's target_modules and peft version.",
        )

    def _nf4_drift(self, ctx: CheckContext, merged: Any, prompts: list[Any], unmerged: list[Any]) -> None:
        __tracebackhide__ = True
        from harness.compare import teacher_force

        tokenizer = ctx.tokenizer
        deltas: list[float] = []
        first_changes: list[str] = []
        for prompt, reference in zip(prompts, unmerged):
            forced = teacher_force(merged, prompt.ids, list(reference.token_ids), tokenizer=tokenizer)
            steps = list(zip(reference.steps, forced))
            deltas.extend(abs(r.logprob - f.logprob) for r, f in steps)
            change = next((i for i, (r, f) in enumerate(steps) if f.best[0] != r.token_id), None)
            if change is not None:
                got = steps[change][1].best[0]
                first_changes.append(f"prompt {prompt.label}: at step {change} the merged model prefers "
                                     f"{tokenizer.decode([got])!r} over {tokenizer.decode([reference.token_ids[change]])!r}")
            if len(forced) < len(reference.steps):
                first_changes.append(f"prompt {prompt.label}: the merged model stops after {len(forced)} of "
                                     f"{len(reference.steps)} tokens")
        mean = sum(deltas) / len(deltas) if deltas else 0.0
        worst = max(deltas, default=0.0)
        ctx.record(merge_mean_abs_dlogp=round(mean, 6), merge_max_abs_dlogp=round(worst, 6),
                   merge_changed_prompts=len(first_changes))
        budget = self.spec.nf4_budget
        over: list[str] = []
        if not (mean == mean and worst == worst):
            over.append("the merged model's log-probabilities are NaN")
        if budget.max_mean_abs_dlogp is not None and not mean <= budget.max_mean_abs_dlogp:
            over.append(f"mean |Δ log p| {mean:.3g} > budget {budget.max_mean_abs_dlogp:g}")
        if budget.max_abs_dlogp is not None and not worst <= budget.max_abs_dlogp:
            over.append(f"max |Δ log p| {worst:.3g} > budget {budget.max_abs_dlogp:g}")
        summary = (f"merging into the NF4 base moves the unmerged greedy tokens' log-probs by mean {mean:.3g}, "
                   f"max {worst:.3g} over {len(deltas)} steps"
                   + ("; " + "; ".join(first_changes) if first_changes else "; no greedy choice changes"))
        if over:
            raise CheckFailure(
                f"{self.spec.id}: {'; '.join(over)} ({summary}). NF4 re-quantizes the merged weights (peft warns "
                "that outputs may differ); the drift is now larger than the suite accepts. Fix: ship the "
                "unmerged adapter (or merge into the 16-bit base and quantize after), or raise nf4_budget "
                "after reviewing the outputs."
            )
        if budget.max_mean_abs_dlogp is None and budget.max_abs_dlogp is None:
            warnings.warn(f"{self.spec.id}[{ctx.variant.key if ctx.variant else ''}]: {summary} (no nf4_budget "
                          "set, reported only)", UserWarning, stacklevel=1)


def merged_copy(model: Any) -> Any:
    """``merge_and_unload()`` on a deep copy: the pool's adapter model stays as it was."""
    clone = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Merge lora module to 4-bit linear.*")
        merged = clone.merge_and_unload()
    merged.eval()
    return merged
