"""``memory``: weights and peak memory per variant, against per-model budgets and savings.

Weights are ``model.get_memory_footprint()`` (parameters and buffers). The peak is
measured around a declared workload (``harness.measure.measure_peak``): GPU peak
allocated on CUDA, process RSS on CPU. Absolute budgets belong to a model
(``budgets: {model: {device class: {variant: ...}}}``); savings compare two variants
measured in the same session, either against a fixed ``ratio`` or against what the
model's own layer shapes predict (``of_expected``), which holds for any model. The pool
memoizes each variant's figures per suite, check and workload, so a reference is
measured once. In reference mode (``--reference OLD``) NEW's weights and peak are also
judged as a ratio to OLD's same variant, measured in this session with the other model
freed (``vs_reference``).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, ReferenceRun, register_check
from harness.checks.budgets import (
    BUDGETS_HELP, DEVICES_HELP, Budget, NoBudgetWarning, VariantComparison, budget_for, missing_budget, nothing_judged, observation_key,
    skip_unless_device, validate_budget_table, validate_device_list,
)
from harness.errors import CheckFailure
from harness.measure import MIB, mib, parallel_conflict, parallel_note
from harness.measure.footprint import MemoryFigures, Workload, measure_memory
from harness.models.variants import VariantSpec


class MemoryBudget(Budget):
    """Memory ceilings for one variant, in MiB; set at least one."""

    max_weights_mb: float | None = Field(None, gt=0, description="Parameters and buffers (`get_memory_footprint()`).")
    max_peak_mb: float | None = Field(None, gt=0, description=(
        "Peak during the workload: GPU peak allocated on CUDA, process RSS on CPU."))


class Savings(VariantComparison):
    """``reference``'s figure divided by ``variant``'s, against a fixed ``ratio`` or the expectation.

    ``of_expected`` (weights of an NF4 variant against its 16-bit twin only): the measured
    saving must be at least this fraction of the saving the model's own layer shapes predict
    (``harness.measure.nf4_estimate``), and at most ``max_of_expected`` times it. A large
    untied embedding and head stay 16-bit, so a fixed ratio right for one model is wrong for
    another; the expectation is right for each.
    """

    metric: Literal["weights", "peak"] = Field("weights", description="Which figure is compared.")
    ratio: float | None = Field(None, gt=0, description="The least saving: `reference`'s figure over `variant`'s.")
    of_expected: float | None = Field(None, gt=0, le=1, description=(
        "Weights of an nf4 variant against its 16-bit twin: at least this fraction of the saving the model's own "
        "layer shapes predict. Give `ratio` or `of_expected`."))
    max_of_expected: float | None = Field(None, ge=1, description="With `of_expected`: at most this many times the "
                                                                  "predicted saving.")

    @model_validator(mode="after")
    def _one_criterion(self) -> Savings:
        if (self.ratio is None) == (self.of_expected is None):
            raise ValueError("give exactly one of `ratio` (a fixed saving) or `of_expected` (a fraction of "
                             "the saving this model's layer shapes predict)")
        if self.max_of_expected is not None and self.of_expected is None:
            raise ValueError("`max_of_expected` goes with `of_expected`")
        if self.of_expected is not None:
            variant, reference = VariantSpec.from_key(self.variant), VariantSpec.from_key(self.reference)
            if (self.metric != "weights" or variant.quant != "nf4" or reference.quant != "fp16"
                    or variant.lora != reference.lora):
                raise ValueError("`of_expected` compares the weights of an nf4 variant with its 16-bit twin "
                                 "(nf4 vs fp16, nf4-lora vs fp16-lora); use `ratio` for anything else")
        return self


class VersusReference(BaseModel):
    """Reference mode: NEW's figure over OLD's (same variant, same session) may be at most this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_weights_ratio: float = Field(1.02, gt=0, description="NEW's weights over OLD's, at most.")
    max_peak_ratio: float = Field(1.25, gt=0, description="NEW's peak over OLD's, at most.")


class MemorySpec(CheckSpec):
    """Weights and peak memory per variant around a declared workload, against per-model budgets and savings
    between variants."""

    kind: Literal["memory"]
    workload: Workload = Field(description="What runs while the peak is measured (see the table below).")
    budgets: dict[str, dict[str, dict[str, MemoryBudget]]] = Field(default_factory=dict, description=(
        f"{BUDGETS_HELP} Budgets belong to the model they were measured on."))
    min_savings: list[Savings] = Field(default_factory=list, description=(
        "Savings of one variant over another, measured in the same session."))
    vs_reference: VersusReference = Field(default_factory=VersusReference, description=(
        "With `--reference OLD`: NEW's figures as a ratio to OLD's same variant."))
    devices: list[str] | None = Field(None, description=DEVICES_HELP)

    @field_validator("devices")
    @classmethod
    def _device_keys(cls, value: list[str] | None) -> list[str] | None:
        return validate_device_list(value)

    @field_validator("budgets", mode="before")
    @classmethod
    def _table(cls, value: Any) -> Any:
        return validate_budget_table(value)


@register_check("memory")
class MemoryCheck(Check[MemorySpec]):
    Spec = MemorySpec

    def _observe(self, ctx: CheckContext, variant: VariantSpec, *, comparable: bool = False) -> MemoryFigures:
        key = observation_key(ctx, "memory", {**self.spec.workload.model_dump(), "comparable": comparable})
        return ctx.pool.observe(
            variant, key, lambda loaded: measure_memory(loaded, ctx.tokenizer, self.spec.workload, device=ctx.device,
                                                        comparable=comparable),
        )

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        mine = self._measure(ctx)
        problems, missing = self._judge(ctx, mine)
        self._finish(ctx, problems, missing)

    def run_against_reference(self, pair: ReferenceRun) -> None:
        """NEW's budgets as in a normal run, and NEW over OLD (same variant), each measured alone."""
        __tracebackhide__ = True
        variant = pair.new.variant
        assert variant is not None
        old_ctx = pair.on_old(alone=True)
        skip_unless_device(self.spec.devices, old_ctx)
        old_ctx.loaded()
        old = self._observe(old_ctx, variant, comparable=True)
        old_ctx.record(weights_mb=mib(old.weights_bytes), peak_mb=mib(old.peak.peak_bytes))
        ctx = pair.on_new(alone=True)
        mine = self._measure(ctx, comparable=True)
        problems, missing = self._judge(ctx, mine)
        problems += _versus_old(ctx, mine, old, self.spec.vs_reference)
        self._finish(ctx, problems, None)  # judged: NEW against OLD

    def _where(self, ctx: CheckContext) -> str:
        return f"{self.spec.id}[{ctx.variant.key if ctx.variant else ''}] on {ctx.device.klass}"

    def _measure(self, ctx: CheckContext, *, comparable: bool = False) -> MemoryFigures:
        __tracebackhide__ = True
        variant = ctx.variant
        assert variant is not None
        skip_unless_device(self.spec.devices, ctx)
        conflict = parallel_conflict(ctx.device)
        if conflict:
            raise CheckFailure(f"{self._where(ctx)}: refused to measure memory: {conflict}")
        ctx.loaded()
        mine = self._observe(ctx, variant, comparable=comparable)
        ctx.record(**mine.figures())
        note = parallel_note(ctx.device)
        if note:
            ctx.record(peak_note=note)
        return mine

    def _judge(self, ctx: CheckContext, mine: MemoryFigures) -> tuple[list[str], str | None]:
        """Problems with the absolute budget and the savings; why nothing was judged (None: something was)."""
        variant = ctx.variant
        assert variant is not None
        klass, model = ctx.device.klass, ctx.pool.resolved.name
        problems: list[str] = []
        budget, key = budget_for(self.spec.budgets, model=model, device_class=klass, variant=variant.key)
        judged = budget is not None
        missing = None
        if budget is None:
            missing = missing_budget(self.spec.budgets, model=model, device_class=klass, variant=variant.key)
            ctx.record(budget=missing)
        else:
            ctx.record(budget=f"{key}: {budget.model_dump(exclude_none=True)}")
            problems += _over_budget(mine, budget, key=key, variant=variant.key, klass=klass)
        for saving in self.spec.min_savings:
            if not saving.applies(variant=variant.key, device_class=klass, model=model):
                continue
            judged = True
            reference = self._observe(ctx, VariantSpec.from_key(saving.reference))
            problem = _judge_saving(ctx, saving, mine, reference, klass=klass)
            if problem:
                problems.append(problem)
        if judged and budget is None:
            warnings.warn(NoBudgetWarning(f"{self._where(ctx)}: {missing}; savings judged, absolute size not"),
                          stacklevel=1)
        return problems, None if judged else missing

    def _finish(self, ctx: CheckContext, problems: list[str], missing: str | None) -> None:
        __tracebackhide__ = True
        where = self._where(ctx)
        if problems:
            raise CheckFailure(
                f"{where}: memory budget not met:\n  " + "\n  ".join(problems)
                + "\nFix: find what grew (model revision, adapter, dtype, quantization), or raise the "
                "budget in the suite if the growth is intended and reviewed."
            )
        if missing is not None:
            nothing_judged(where, missing)


def _versus_old(ctx: CheckContext, mine: MemoryFigures, old: MemoryFigures, limits: VersusReference) -> list[str]:
    """NEW's weights and peak over OLD's, both measured in this session (reference mode).

    The peaks compared are the comparable ones (``measure_tensor_peak``): a process-wide RSS peak
    would carry whichever side ran first into the other, and judge the order, not the model.
    """
    sides = ctx.sides
    weights = mine.weights_bytes / max(old.weights_bytes, 1)
    new_peak, old_peak = mine.comparable_peak or mine.peak, old.comparable_peak or old.peak
    peak = new_peak.peak_bytes / max(old_peak.peak_bytes, 1)
    ctx.record(weights_ratio_vs_old=round(weights, 4), peak_ratio_vs_old=round(peak, 4),
               peak_compared=new_peak.label)
    problems = []
    if weights > limits.max_weights_ratio:
        problems.append(f"weights {mine.weights_bytes / MIB:.2f} MB on {sides.actual_short}, "
                        f"{old.weights_bytes / MIB:.2f} MB on {sides.expected}: {weights:.3f}x > "
                        f"vs_reference.max_weights_ratio {limits.max_weights_ratio:g}")
    if peak > limits.max_peak_ratio:
        problems.append(f"peak {new_peak.label} {new_peak.peak_bytes / MIB:.1f} MB on {sides.actual_short}, "
                        f"{old_peak.peak_bytes / MIB:.1f} MB on {sides.expected} (each measured with the other "
                        f"model freed): {peak:.3f}x > vs_reference.max_peak_ratio {limits.max_peak_ratio:g}")
    return problems


def _judge_saving(ctx: CheckContext, saving: Savings, mine: MemoryFigures, reference: MemoryFigures, *,
                  klass: str) -> str | None:
    """One ``min_savings`` entry: its figures recorded, a problem returned when it is not met."""
    variant = mine.variant
    context = f"device class {klass}, variant {variant}"
    if saving.of_expected is None:
        assert saving.ratio is not None
        ratio = reference.metric(saving.metric) / max(mine.metric(saving.metric), 1)
        ctx.record(**{f"saving_{saving.metric}_vs_{saving.reference}": round(ratio, 3)})
        if ratio >= saving.ratio:
            return None
        what = "weights" if saving.metric == "weights" else f"peak ({mine.peak.label})"
        return (f"{variant} saves only {ratio:.2f}x {what} vs {saving.reference} "
                f"({reference.metric(saving.metric) / MIB:.1f} MB / {mine.metric(saving.metric) / MIB:.1f} MB, "
                f"both measured in this session), below min_savings ratio {saving.ratio:g} ({context})")
    assert mine.expected_nf4_bytes and mine.expected_16bit_bytes
    measured = reference.weights_bytes / max(mine.held_bytes, 1)
    expected = mine.expected_16bit_bytes / mine.expected_nf4_bytes
    fraction = measured / expected
    ctx.record(**{f"saving_with_quant_state_vs_{saving.reference}": round(measured, 3),
                  f"expected_saving_vs_{saving.reference}": round(expected, 3),
                  f"saving_of_expected_vs_{saving.reference}": round(fraction, 3)})
    figures = (f"{variant} saves {measured:.3f}x weights vs {saving.reference} "
               f"({reference.weights_bytes / MIB:.1f} MB / {mine.held_bytes / MIB:.1f} MB with quantization "
               f"constants), {fraction:.3f} of the {expected:.3f}x this model's layer shapes predict "
               f"({mine.expected_16bit_bytes / MIB:.1f} MB at 16 bits / {mine.expected_nf4_bytes / MIB:.1f} MB in NF4)")
    if fraction < saving.of_expected:
        return (f"{figures}: below of_expected {saving.of_expected:g} ({context}). Some weights that should be "
                "4-bit are not (a module left out of quantization, an adapter merged at 16 bits?)")
    if saving.max_of_expected is not None and fraction > saving.max_of_expected:
        return (f"{figures}: above max_of_expected {saving.max_of_expected:g} ({context}). The reference "
                f"is larger than 16 bits would make it, or {variant} lost weights")
    return None


def _over_budget(figures: MemoryFigures, budget: MemoryBudget, *, key: str | None, variant: str,
                 klass: str) -> list[str]:
    problems: list[str] = []
    layout = f"; {figures.layout}" if figures.layout else ""
    if budget.max_weights_mb is not None and figures.weights_bytes / MIB > budget.max_weights_mb:
        problems.append(
            f"weights {figures.weights_bytes / MIB:.2f} MB > max_weights_mb {budget.max_weights_mb:g} "
            f"(budgets.{key}; device class {klass}, variant {variant}{layout})"
        )
    if budget.max_peak_mb is not None and figures.peak.peak_bytes / MIB > budget.max_peak_mb:
        problems.append(
            f"peak {figures.peak.label} {figures.peak.peak_bytes / MIB:.2f} MB > max_peak_mb "
            f"{budget.max_peak_mb:g} (budgets.{key}; device class {klass}, variant {variant})"
        )
    return problems
