"""``lora_merge``: an adapter merged into its base behaves like the adapter applied on the fly.

Users ship merged weights (``merge_and_unload()``) to skip the LoRA matmuls at
inference. On a 16-bit base the merge is exact up to rounding, so the merged
model's greedy output is judged against the unmerged adapter by the
comparison engine under the variant's noise tolerance.

On an NF4 base there are three ways to merge (``harness.models.quantized``), and the
check runs all three on copies and says which stays within the variant's noise
of the unmerged adapter:

- ``merge_and_unload()`` into the NF4 base: peft dequantizes each layer, adds
  the LoRA delta and quantizes the sum again;
- the same by hand: dequantize to 16-bit, merge, one fresh NF4 quantization;
- dequantize to 16-bit, merge, and keep the merged layers in 16-bit.

Re-quantizing rounds every weight back to one of 16 NF4 levels of its block.
A LoRA delta is small next to the gap between two levels (on the embedded
model about a tenth of half a gap), so most weights round back to the code they
had and the merge drops most of the adapter: the merged model answers like the
base model without it (README, "Merging an adapter into an NF4 base"). The
figures say how much of the adapter's own effect (the unmerged adapter against
its base with the adapter switched off) each path loses.

Judged: every path must give finite log-probabilities; the 16-bit path must
stay within the variant's noise (it is the same function up to rounding, and
the path to ship); the re-quantizing paths are held to ``nf4_budget`` (mean and
max |Δ log p| of the unmerged greedy tokens scored through the merged model,
against the same tokens scored through the unmerged one, each in one forward
pass, and ``max_adapter_lost``, the fraction of the adapter's effect the merge
may lose). The pool's loaded model is never touched.

The paths start from the plain 4-bit layout on every machine, so the verdict on the model and
adapter does not depend on the CPU. Where the loaded model holds bitsandbytes' CPU-packed
layout (a CPU with AVX512-BF16, after the first forward), peft's merge is also run on the
layout as loaded, as a user's script would: if it loses more than the plain merge, that is a
platform finding (peft reads the packed weights as plain ones), reported as a warning with a
standalone reproduction (``python -m harness.upstream.peft_merge_cpu_packed``), not as a verdict
on the model.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness.checks.base import Check, CheckContext, register_check
from harness.checks.consistency import (
    ConsistencySpec, Findings, Prompt, encoded_prompts, greedy, judge_run, tolerance_for,
)
from harness.errors import CheckFailure, NotJudged
from harness.models.quantized import LAYOUT_NAMES, MERGE_PATH_NAMES, MERGE_PATHS, MergePath, layouts, merged

ADAPTER_KEYS = ["fp16-lora", "nf4-lora"]
REQUANTIZING: tuple[MergePath, ...] = ("merge_and_unload", "requantize")


class PlatformFinding(UserWarning):
    """A defect of the libraries on this machine, not of the model or adapter under test."""


class MergeBudget(BaseModel):
    """Bounds for the merges that re-quantize into NF4 (the 16-bit merge is judged within noise)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_mean_abs_dlogp: float | None = Field(None, ge=0, description=(
        "Mean |Δ log p| of the unmerged adapter's greedy tokens, merged vs unmerged, in nats."))
    max_abs_dlogp: float | None = Field(None, ge=0, description="The same at any one token, in nats.")
    max_adapter_lost: float | None = Field(
        None, ge=0, description="The merge's mean |Δ log p| over the adapter's own (adapter on vs off): 0 keeps "
                                "the adapter, 1 is as if it was never applied.")


class LoraMergeSpec(ConsistencySpec):
    """An adapter merged into its base must behave like the adapter applied on the fly: on a 16-bit base within
    noise; on an NF4 base each merge path is measured, the re-quantizing ones against `nf4_budget`."""

    kind: Literal["lora_merge"]
    nf4_budget: MergeBudget = Field(default_factory=MergeBudget, description=(
        "Bounds for the merges that re-quantize into NF4 (nf4-lora only; unset: measured and reported, not "
        "judged). The 16-bit merge is always judged within noise."))

    @model_validator(mode="before")
    @classmethod
    def _adapter_variants(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("variants") is None:
            data = {**data, "variants": list(ADAPTER_KEYS)}
        return data

    def ignored(self) -> dict[str, str]:
        """nf4_budget judges only nf4-lora (the tolerance judges both: the 16-bit merges must stay within it)."""
        variants = set(self.variants or ADAPTER_KEYS)
        out: dict[str, str] = {}
        if "nf4-lora" not in variants and self.nf4_budget != MergeBudget():
            out["nf4_budget"] = (f"nf4_budget judges only the nf4-lora variant, and this check runs on "
                                 f"{', '.join(sorted(variants))}; add nf4-lora to `variants:` or remove nf4_budget")
        return out


@dataclass(frozen=True)
class PathResult:
    """One merge path against the unmerged adapter."""

    path: MergePath
    mean: float  # mean |Δ log p| of the unmerged greedy tokens through the merged model vs the unmerged one
    worst: float
    steps: int
    within_noise: bool  # the engine's verdict on the merged model's own greedy output
    changes: tuple[str, ...]  # where the merged model's greedy choice leaves the unmerged path

    @property
    def finite(self) -> bool:
        return math.isfinite(self.mean) and math.isfinite(self.worst)

    def lost(self, adapter_effect: float) -> float:
        return self.mean / adapter_effect if adapter_effect > 0 else math.inf

    def describe(self, adapter_effect: float) -> str:
        noise = "within the variant's noise" if self.within_noise else "not within the variant's noise"
        lost = f", {self.lost(adapter_effect):.2f} of the adapter's effect lost" if self.finite else ""
        change = f"; {self.changes[0]}" if self.changes else ""
        return (f"{MERGE_PATH_NAMES[self.path]}: mean |Δ log p| {self.mean:.3g}, max {self.worst:.3g} over "
                f"{self.steps} steps{lost}; {noise}{change}")


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
        if ctx.variant.quant == "nf4":
            self._nf4_paths(ctx, prompts, unmerged)
        else:
            self._same_behaviour(ctx, merged(model, "merge_and_unload"), prompts, unmerged)

    def _same_behaviour(self, ctx: CheckContext, merged_model: Any, prompts: list[Prompt], unmerged: list[Any]) -> None:
        __tracebackhide__ = True
        from harness.judge.compare import sides

        named = sides("unmerged", "merged")
        tokenizer = ctx.tokenizer
        tol = tolerance_for(ctx, self.spec)
        findings = Findings(self.spec.id, tokenizer)
        for prompt, reference in zip(prompts, unmerged):
            findings.add(f"prompt {prompt.label}, merged vs unmerged adapter",
                         judge_run(reference, merged_model, tokenizer, prompt, self.spec.max_new_tokens, tol,
                                   sides=named), named)
        findings.finish(
            ctx, headline="the merged adapter (merge_and_unload) does not behave like the unmerged one", tol=tol,
            fix="On a 16-bit base a merge only rounds. A larger change means a LoRA delta was lost or "
                "applied twice (a module the merge skipped, a wrong scaling, fan_in_fan_out), or the "
                "adapter's modules do not match the base. Check the adapter's target_modules and peft version.",
        )

    def _nf4_paths(self, ctx: CheckContext, prompts: list[Prompt], unmerged: list[Any]) -> None:
        """The three merges into an NF4 base, each against the unmerged adapter and the adapter's own effect."""
        __tracebackhide__ = True
        model = ctx.model
        base = scores_along(model, ctx.tokenizer, prompts, unmerged)
        effect = adapter_effect(model, ctx.tokenizer, prompts, unmerged, base=base)
        tol = tolerance_for(ctx, self.spec)
        results = [judge_path(model, ctx.tokenizer, path, prompts, unmerged, tol=tol,
                              max_new_tokens=self.spec.max_new_tokens, base=base) for path in MERGE_PATHS]
        ctx.record(adapter_effect_mean_abs_dlogp=round(effect, 6))
        for r in results:
            ctx.record(**{f"merge_{r.path}_mean_abs_dlogp": round(r.mean, 6),
                          f"merge_{r.path}_max_abs_dlogp": round(r.worst, 6),
                          f"merge_{r.path}_adapter_lost": round(r.lost(effect), 4) if r.finite else None,
                          f"merge_{r.path}_within_noise": r.within_noise})
        safe = [r.path for r in results if r.within_noise and r.finite]
        ctx.record(merge_within_noise=",".join(safe) or "none")
        self._merge_as_loaded(ctx, prompts, unmerged, base=base, effect=effect, tol=tol,
                              plain=next(r for r in results if r.path == "merge_and_unload"))
        summary = (f"the adapter's own effect (adapter on vs off) is mean |Δ log p| {effect:.3g}; tolerance for "
                   f"{ctx.variant.key if ctx.variant else ''}: mean {tol.mean_abs_dlogp:g}, step {tol.max_abs_dlogp:g}"
                   + "".join(f"\n  - {r.describe(effect)}" for r in results))
        problems = self._problems(results, effect)
        if problems:
            raise CheckFailure(
                f"{self.spec.id}: merging the adapter into the NF4 base: " + "; ".join(problems) + f"\n{summary}\n"
                "Re-quantizing rounds each merged weight back to one of the 16 NF4 levels of its block, and a "
                "LoRA delta is mostly smaller than half a level: the adapter is rounded away. Fix: ship the "
                "unmerged adapter, or the 16-bit merge (dequantize, merge, keep 16-bit), or merge into the "
                "original 16-bit checkpoint before quantizing; raise nf4_budget only after reviewing the outputs."
            )
        ctx.note(f"{ctx.subject}: merge paths within noise of the unmerged adapter: {', '.join(safe) or 'none'} "
                 f"({summary.splitlines()[0]})")
        budget = self.spec.nf4_budget
        if all(v is None for v in budget.model_dump().values()):
            warnings.warn(f"{ctx.subject}: no nf4_budget set, the re-quantizing merges are reported only: {summary}",
                          UserWarning, stacklevel=1)

    def _merge_as_loaded(self, ctx: CheckContext, prompts: list[Prompt], unmerged: list[Any], *,
                         base: list[tuple[Any, ...]], effect: float, tol: Any, plain: PathResult) -> None:
        """peft's merge on the CPU-packed layout as loaded: a platform finding where it loses more than from plain."""
        model = ctx.model
        if not layouts(model).get("cpu-packed"):
            return
        try:
            packed = judge_path(model, ctx.tokenizer, "merge_and_unload", prompts, unmerged, tol=tol,
                                max_new_tokens=self.spec.max_new_tokens, base=base, plain_first=False)
            what = packed.describe(effect)
            broken = not packed.finite or packed.mean > plain.mean + tol.mean_abs_dlogp
            ctx.record(merge_and_unload_cpu_packed_mean_abs_dlogp=round(packed.mean, 6),
                       merge_and_unload_cpu_packed_adapter_lost=round(packed.lost(effect), 4) if packed.finite else None)
        except Exception as exc:  # noqa: BLE001 - peft failing on the layout is the finding itself
            what, broken = f"merge_and_unload() raises {type(exc).__name__}: {exc}", True
        if not broken:
            ctx.note(f"{ctx.subject}: merge_and_unload() on the {LAYOUT_NAMES['cpu-packed']} as loaded agrees with "
                     f"the plain layout's ({what})")
            return
        message = (
            f"{ctx.subject}: platform finding, not a verdict on the model or adapter: the NF4 weights are in "
            f"{LAYOUT_NAMES['cpu-packed']} (bitsandbytes repacks them at the first forward on a CPU with "
            f"AVX512-BF16), and peft's merge_and_unload() reads them as the plain layout: {what}, against "
            f"mean |Δ log p| {plain.mean:.3g} merging the same model from the plain layout (judged above). A model "
            "merged this way after it has run on such a CPU is damaged. Instead: merge before any forward pass "
            "(a fresh load), merge on a GPU or into the 16-bit checkpoint, or ship the unmerged adapter. "
            "Reproduction for peft / bitsandbytes (imports only them): python -m "
            "harness.upstream.peft_merge_cpu_packed --model MODEL_DIR --adapter ADAPTER_DIR"
        )
        ctx.note(message)
        warnings.warn(PlatformFinding(message), stacklevel=1)

    def _problems(self, results: list[PathResult], effect: float) -> list[str]:
        """Non-finite anywhere, a 16-bit merge beyond noise, a re-quantizing merge beyond ``nf4_budget``."""
        budget = self.spec.nf4_budget
        problems = [f"{MERGE_PATH_NAMES[r.path]} gives NaN or infinite log-probabilities (mean |Δ log p| {r.mean}, "
                    f"max {r.worst})" for r in results if not r.finite]
        for r in results:
            if not r.finite:
                continue
            name = MERGE_PATH_NAMES[r.path]
            if r.path not in REQUANTIZING:
                if not r.within_noise:
                    problems.append(f"{name} is not within the variant's noise of the unmerged adapter, although "
                                    "it computes the same function up to rounding (a delta lost or applied twice?)")
                continue
            if budget.max_mean_abs_dlogp is not None and r.mean > budget.max_mean_abs_dlogp:
                problems.append(f"{name}: mean |Δ log p| {r.mean:.3g} > budget {budget.max_mean_abs_dlogp:g}")
            if budget.max_abs_dlogp is not None and r.worst > budget.max_abs_dlogp:
                problems.append(f"{name}: max |Δ log p| {r.worst:.3g} > budget {budget.max_abs_dlogp:g}")
            if budget.max_adapter_lost is not None and r.lost(effect) > budget.max_adapter_lost:
                problems.append(f"{name}: loses {r.lost(effect):.2f} of the adapter's effect > budget "
                                f"max_adapter_lost {budget.max_adapter_lost:g}")
        return problems


def scores_along(model: Any, tokenizer: Any, prompts: list[Prompt], unmerged: list[Any]) -> list[tuple[Any, ...]]:
    """``model``'s scores of the unmerged adapter's greedy tokens, one forward pass per prompt.

    The unmerged adapter, its merged copies and the base without it are all scored this way, so
    a |Δ log p| compares one computation with another and holds no KV-cache rounding of one side.
    """
    from harness.observe.scores import path_scores

    return [path_scores(model, tokenizer, prompt.ids, list(reference.token_ids))
            for prompt, reference in zip(prompts, unmerged)]


def judge_path(model: Any, tokenizer: Any, path: MergePath, prompts: list[Prompt], unmerged: list[Any], *,
               tol: Any, max_new_tokens: int, base: list[tuple[Any, ...]] | None = None,
               plain_first: bool = True) -> PathResult:
    """Merge a copy of ``model`` along ``path``; score the unmerged greedy tokens through it (one forward pass
    per prompt) against the unmerged scores ``base``, and judge its own greedy run against the unmerged one
    (the engine, the variant's tolerance; decoded step by step only where the one-pass verdict fails on the
    16-bit merge, which is judged: a re-quantizing merge's "within noise" is a figure, its verdict is
    ``nf4_budget``'s, so its one-pass verdict stands)."""
    from harness.judge.compare import sides

    base = base if base is not None else scores_along(model, tokenizer, prompts, unmerged)
    merged_model = merged(model, path, plain_first=plain_first)
    deltas: list[float] = []
    changes: list[str] = []
    within = True
    for prompt, reference, before, forced in zip(prompts, unmerged, base,
                                                 scores_along(merged_model, tokenizer, prompts, unmerged)):
        deltas += [abs(r.logprob - f.logprob) for r, f in zip(before, forced)]
        change = next((i for i, (r, f) in enumerate(zip(reference.steps, forced)) if f.best[0] != r.token_id), None)
        if change is not None:
            got = forced[change].best[0]
            changes.append(f"prompt {prompt.label}: at step {change} the merged model prefers "
                           f"{tokenizer.decode([got])!r} over {tokenizer.decode([reference.token_ids[change]])!r}")
        within = within and judge_run(reference, merged_model, tokenizer, prompt, max_new_tokens, tol,
                                      sides=sides("unmerged", path), scored=forced,
                                      confirm=path not in REQUANTIZING).ok
    del merged_model
    mean = sum(deltas) / len(deltas) if deltas else 0.0
    return PathResult(path=path, mean=mean, worst=max(deltas, default=0.0), steps=len(deltas),
                      within_noise=within, changes=tuple(changes))


def adapter_effect(model: Any, tokenizer: Any, prompts: list[Prompt], unmerged: list[Any], *,
                   base: list[tuple[Any, ...]] | None = None) -> float:
    """Mean |Δ log p| of the unmerged greedy tokens with the adapter switched off: what the adapter does."""
    base = base if base is not None else scores_along(model, tokenizer, prompts, unmerged)
    deltas: list[float] = []
    with model.disable_adapter():
        off = scores_along(model, tokenizer, prompts, unmerged)
    for before, after in zip(base, off):
        deltas += [abs(r.logprob - f.logprob) for r, f in zip(before, after)]
    return sum(deltas) / len(deltas) if deltas else 0.0
