"""``throughput``: prefill and decode tokens/s for one declared shape, on pytest-benchmark.

Each item runs ``benchmark.pedantic`` with explicit rounds and warm-up rounds, so
``--benchmark-json``, ``--benchmark-save`` and ``--benchmark-compare`` work as usual
and carry tokens/s in ``extra_info``. When pytest-benchmark is disabled
(``--benchmark-disable``, or automatically under pytest-xdist, where timings are not
reliable) the round runs once, cold: its figures are recorded but no budget is judged.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.checks.prompts import assert_fits_context
from harness.errors import CheckFailure
from harness.checks.budgets import (
    NoBudgetWarning, VariantComparison, budget_for, device_matches, skip_unless_device, validate_budget_table,
    validate_device_list,
)
from harness.measure import RoundTiming, Shape, ThroughputFigures, measure_throughput, throughput_inputs, timed_round
from harness.variants import VariantSpec

METRICS = {"decode": "decode_tokens_per_s", "prefill": "prefill_tokens_per_s"}


class ThroughputBudget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_decode_tokens_per_s: float | None = Field(None, gt=0)
    min_prefill_tokens_per_s: float | None = Field(None, gt=0)


class SpeedRatio(VariantComparison):
    """``variant``'s tokens/s must be at least ``ratio`` times ``reference``'s (same session)."""

    metric: Literal["decode", "prefill"] = "decode"

class ThroughputSpec(CheckSpec):
    kind: Literal["throughput"]
    batch: int = Field(1, ge=1, le=4096)
    prompt_tokens: int = Field(32, ge=1)
    new_tokens: int = Field(16, ge=2, description="at least 2: the first new token comes from the prefill")
    rounds: int = Field(3, ge=1, le=1000)
    warmup_rounds: int = Field(1, ge=0, le=1000)
    budgets: dict[str, dict[str, ThroughputBudget]] = Field(default_factory=dict)
    min_ratios: list[SpeedRatio] = Field(default_factory=list)
    devices: list[str] | None = Field(None, description="run only on these device classes; skip elsewhere")

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: list[str] | None) -> list[str] | None:
        return validate_device_list(value)

    @field_validator("budgets", mode="before")
    @classmethod
    def _table(cls, value: Any) -> Any:
        return validate_budget_table(value)

    @property
    def shape(self) -> Shape:
        return Shape(batch=self.batch, prompt_tokens=self.prompt_tokens, new_tokens=self.new_tokens)


@register_check("throughput")
class ThroughputCheck(Check[ThroughputSpec]):
    Spec = ThroughputSpec

    @property
    def _key(self) -> str:
        return f"{self.spec.id}:throughput"

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        variant = ctx.variant
        assert variant is not None
        spec = self.spec
        klass = ctx.device.klass
        where = f"{spec.id}[{variant.key}] on {klass}"
        skip_unless_device(spec.devices, ctx)
        model, tokenizer = ctx.model, ctx.tokenizer
        assert_fits_context(model, spec.prompt_tokens, spec.new_tokens, what=spec.id)
        benchmark = ctx.request.getfixturevalue("benchmark")
        benchmark.group = f"{ctx.suite}::{spec.id} ({spec.shape})"
        inputs = throughput_inputs(model, tokenizer, spec.shape)
        timings: list[RoundTiming] = []

        def one_round() -> None:
            timings.append(timed_round(model, tokenizer, inputs, spec.shape, device=ctx.device))

        benchmark.pedantic(one_round, rounds=spec.rounds, warmup_rounds=spec.warmup_rounds, iterations=1)
        judged = not benchmark.disabled
        measured = tuple(timings[-spec.rounds:] if judged else timings)
        figures = ThroughputFigures(shape=spec.shape, rounds=measured, device=klass)
        values = figures.figures()
        benchmark.extra_info.update(values, variant=variant.key, device=ctx.device.description,
                                    device_class=klass)
        ctx.record(**values)
        if not judged:
            ctx.record(budget="not judged: pytest-benchmark is disabled, one cold round")
            warnings.warn(NoBudgetWarning(
                f"{where}: pytest-benchmark is disabled (--benchmark-disable, or pytest-xdist, where "
                "timings are unreliable): figures come from one cold round and no budget is judged"),
                stacklevel=1)
            return
        ctx.pool.observe(variant, self._key, lambda _loaded: figures)
        problems: list[str] = []
        budget, key = budget_for(spec.budgets, device_class=klass, variant=variant.key)
        if budget is None:
            ctx.record(budget=f"none for {klass}")
            warnings.warn(NoBudgetWarning(
                f"{where}: the suite sets no throughput budget for device class {klass!r} and variant "
                f"{variant.key!r}; figures recorded, nothing judged"), stacklevel=1)
        else:
            ctx.record(budget=f"{key}.{variant.key}: {budget.model_dump(exclude_none=True)}")
            for name, floor in (("decode_tokens_per_s", budget.min_decode_tokens_per_s),
                                ("prefill_tokens_per_s", budget.min_prefill_tokens_per_s)):
                value = getattr(figures, name)
                if floor is not None and value < floor:
                    problems.append(
                        f"{name.replace('_tokens_per_s', '')} {value:.1f} tokens/s < min_{name} {floor:g} "
                        f"(budgets.{key}.{variant.key}; device class {klass}, variant {variant.key}; "
                        f"{spec.shape}, median of {len(measured)} rounds)"
                    )
        for ratio in spec.min_ratios:
            if ratio.variant != variant.key:
                continue
            if not device_matches(ratio.devices, klass):
                continue
            reference = ctx.pool.observe(
                VariantSpec.from_key(ratio.reference), self._key,
                lambda loaded: measure_throughput(loaded.model, tokenizer, spec.shape, device=ctx.device,
                                                  rounds=spec.rounds, warmup_rounds=spec.warmup_rounds),
            )
            name = METRICS[ratio.metric]
            got = getattr(figures, name) / getattr(reference, name)
            ctx.record(**{f"{ratio.metric}_ratio_vs_{ratio.reference}": round(got, 3)})
            if got < ratio.ratio:
                problems.append(
                    f"{ratio.metric} is {got:.2f}x {ratio.reference} ({getattr(figures, name):.1f} vs "
                    f"{getattr(reference, name):.1f} tokens/s, same session), below min ratio "
                    f"{ratio.ratio:g} (device class {klass}, variant {variant.key})"
                )
        if problems:
            speed = "CPU" if not ctx.device.is_cuda else "GPU"
            raise CheckFailure(
                f"{where}: throughput budget not met ({speed} speed):\n  " + "\n  ".join(problems)
                + "\nFix: profile what slowed down, or lower the budget in the suite if the machine "
                "changed; compare runs with --benchmark-save / --benchmark-compare."
            )

