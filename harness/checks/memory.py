"""``memory``: weights and peak memory per variant, against budgets and savings ratios.

Weights are ``model.get_memory_footprint()`` (parameters and buffers). The peak is
measured around a declared workload (``harness.measure.measure_peak``): GPU peak
allocated on CUDA, process RSS on CPU. Budgets are keyed by device class, then
variant; savings compare two variants measured in the same session (the pool
memoizes each variant's figures, so a reference is measured once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.errors import CheckFailure
from harness.checks.budgets import (
    NoBudgetWarning, VariantComparison, budget_for, device_matches, skip_unless_device, validate_budget_table, validate_device_list,
)
from harness.measure import (
    MIB, PeakMemory, measure_peak, mib, nf4_estimate, parallel_conflict, parallel_note, quant_state_bytes,
    run_workload,
)
from harness.variants import VariantSpec

if TYPE_CHECKING:
    from harness.devices import Device
    from harness.pool import Loaded


class Workload(BaseModel):
    """What runs while the peak is measured: prompts in batches, a fixed number of new tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[str] = Field(min_length=1)
    max_new_tokens: int = Field(16, ge=1, le=4096)
    batch_size: int = Field(1, ge=1, le=4096)


class MemoryBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_weights_mb: float | None = Field(None, gt=0)
    max_peak_mb: float | None = Field(None, gt=0)


class Savings(VariantComparison):
    """``reference``'s figure divided by ``variant``'s must be at least ``ratio``."""

    metric: Literal["weights", "peak"] = "weights"

class MemorySpec(CheckSpec):
    kind: Literal["memory"]
    workload: Workload
    budgets: dict[str, dict[str, MemoryBudget]] = Field(default_factory=dict)
    min_savings: list[Savings] = Field(default_factory=list)
    devices: list[str] | None = Field(None, description="run only on these device classes; skip elsewhere")

    @field_validator("devices")
    @classmethod
    def _device_keys(cls, value: list[str] | None) -> list[str] | None:
        return validate_device_list(value)

    @field_validator("budgets", mode="before")
    @classmethod
    def _table(cls, value: Any) -> Any:
        return validate_budget_table(value)


@dataclass(frozen=True)
class MemoryFigures:
    """One variant's memory, measured once per session and check."""

    variant: str
    weights_bytes: int
    peak: PeakMemory
    generated_tokens: int
    quant_state_bytes: int = 0
    # bitsandbytes' CPU backend un-nests double quantization on first use (absmax -> bf16)
    quant_state_after_bytes: int = 0
    expected_nf4_bytes: int | None = None

    def metric(self, name: str) -> int:
        return self.weights_bytes if name == "weights" else self.peak.peak_bytes

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights_mb": mib(self.weights_bytes), **self.peak.figures()}
        if self.quant_state_bytes:
            out["quant_state_mb"] = mib(self.quant_state_bytes)
            out["weights_with_quant_state_mb"] = mib(self.weights_bytes + self.quant_state_bytes)
        if self.quant_state_after_bytes and self.quant_state_after_bytes != self.quant_state_bytes:
            out["quant_state_after_workload_mb"] = mib(self.quant_state_after_bytes)
        if self.expected_nf4_bytes is not None:
            out["expected_nf4_mb"] = mib(self.expected_nf4_bytes)
        return out


def measure_memory(loaded: Loaded, tokenizer: Any, workload: Workload, *, device: Device) -> MemoryFigures:
    """Weights of the loaded variant and the peak while ``workload`` runs on it."""
    model = loaded.model
    is_nf4 = loaded.variant.quant == "nf4"
    state_before = quant_state_bytes(model) if is_nf4 else 0
    generated, peak = measure_peak(
        lambda: run_workload(model, tokenizer, workload.prompts, batch_size=workload.batch_size,
                             max_new_tokens=workload.max_new_tokens),
        device=device,
    )
    return MemoryFigures(
        variant=loaded.variant.key,
        weights_bytes=int(loaded.weights_bytes),
        peak=peak,
        generated_tokens=generated,
        quant_state_bytes=state_before,
        quant_state_after_bytes=quant_state_bytes(model) if is_nf4 else 0,
        expected_nf4_bytes=nf4_estimate(model).total_bytes if is_nf4 else None,
    )


@register_check("memory")
class MemoryCheck(Check[MemorySpec]):
    Spec = MemorySpec

    def _observe(self, ctx: CheckContext, variant: VariantSpec) -> MemoryFigures:
        return ctx.pool.observe(
            variant, f"{self.spec.id}:memory",
            lambda loaded: measure_memory(loaded, ctx.tokenizer, self.spec.workload, device=ctx.device),
        )

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        variant = ctx.variant
        assert variant is not None
        klass = ctx.device.klass
        where = f"{self.spec.id}[{variant.key}] on {klass}"
        skip_unless_device(self.spec.devices, ctx)
        conflict = parallel_conflict(ctx.device)
        if conflict:
            raise CheckFailure(f"{where}: refused to measure memory: {conflict}")
        ctx.loaded()
        mine = self._observe(ctx, variant)
        ctx.record(**mine.figures())
        note = parallel_note(ctx.device)
        if note:
            ctx.record(peak_note=note)
        problems: list[str] = []
        budget, key = budget_for(self.spec.budgets, device_class=klass, variant=variant.key)
        if budget is None:
            ctx.record(budget=f"none for {klass}")
            warnings.warn(NoBudgetWarning(
                f"{where}: the suite sets no memory budget for device class {klass!r} and variant "
                f"{variant.key!r}; figures recorded, nothing judged"), stacklevel=1)
        else:
            ctx.record(budget=f"{key}.{variant.key}: {budget.model_dump(exclude_none=True)}")
            problems += _over_budget(mine, budget, key=key, variant=variant.key, klass=klass)
        for saving in self.spec.min_savings:
            if saving.variant != variant.key or not device_matches(saving.devices, klass):
                continue
            reference = self._observe(ctx, VariantSpec.from_key(saving.reference))
            ratio = reference.metric(saving.metric) / max(mine.metric(saving.metric), 1)
            ctx.record(**{f"saving_{saving.metric}_vs_{saving.reference}": round(ratio, 3)})
            if ratio < saving.ratio:
                what = "weights" if saving.metric == "weights" else f"peak ({mine.peak.label})"
                problems.append(
                    f"{variant.key} saves only {ratio:.2f}x {what} vs {saving.reference} "
                    f"({reference.metric(saving.metric) / MIB:.1f} MB / {mine.metric(saving.metric) / MIB:.1f} MB, "
                    f"both measured in this session), below min_savings ratio {saving.ratio:g} "
                    f"(device class {klass}, variant {variant.key})"
                )
        if problems:
            raise CheckFailure(
                f"{where}: memory budget not met:\n  " + "\n  ".join(problems)
                + "\nFix: find what grew (model revision, adapter, dtype, quantization), or raise the "
                "budget in the suite if the growth is intended and reviewed."
            )


def _over_budget(figures: MemoryFigures, budget: MemoryBudget, *, key: str | None, variant: str,
                 klass: str) -> list[str]:
    problems: list[str] = []
    if budget.max_weights_mb is not None and figures.weights_bytes / MIB > budget.max_weights_mb:
        problems.append(
            f"weights {figures.weights_bytes / MIB:.2f} MB > max_weights_mb {budget.max_weights_mb:g} "
            f"(budgets.{key}.{variant}; device class {klass}, variant {variant})"
        )
    if budget.max_peak_mb is not None and figures.peak.peak_bytes / MIB > budget.max_peak_mb:
        problems.append(
            f"peak {figures.peak.label} {figures.peak.peak_bytes / MIB:.2f} MB > max_peak_mb "
            f"{budget.max_peak_mb:g} (budgets.{key}.{variant}; device class {klass}, variant {variant})"
        )
    return problems
