"""``throughput``: prefill and decode tokens/s for one declared shape, on pytest-benchmark.

Each item runs ``benchmark.pedantic`` with explicit rounds and warm-up rounds, so
``--benchmark-json``, ``--benchmark-save`` and ``--benchmark-compare`` work as usual
and carry tokens/s in ``extra_info``. When pytest-benchmark is disabled
(``--benchmark-disable``, or automatically under pytest-xdist) or not loaded, the same
rounds run on the harness's own per-step clock and the budgets are judged all the same:
a floor is never waved through because a plugin switched itself off. Only where the
timing itself would be wrong (xdist workers sharing one GPU) is the item not judged,
which is an error, never a pass. Floors belong to a model, as goldens do. In reference
mode (``--reference OLD``) NEW's tokens/s are also judged as a ratio to OLD's same
variant, timed in this session on the same per-step clock (``vs_reference``).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, ReferenceRun, register_check
from harness.observe.prompts import assert_fits_context
from harness.errors import CheckFailure
from harness.checks.budgets import (
    BUDGETS_HELP, DEVICES_HELP, Budget, NoBudgetWarning, VariantComparison, budget_for, missing_budget, nothing_judged, observation_key,
    skip_unless_device, validate_budget_table, validate_device_list,
)
from harness.errors import NotJudged
from harness.measure import (
    RoundTiming, Shape, ThroughputFigures, measure_throughput, parallel_conflict, throughput_inputs, timed_round,
)
from harness.models.variants import VariantSpec

METRICS = {"decode": "decode_tokens_per_s", "prefill": "prefill_tokens_per_s"}


class ThroughputBudget(Budget):
    """Speed floors for one variant; set at least one."""

    min_decode_tokens_per_s: float | None = Field(None, gt=0, description="New tokens per second after the first.")
    min_prefill_tokens_per_s: float | None = Field(None, gt=0, description="Prompt tokens per second in the prefill.")


class SpeedRatio(VariantComparison):
    """``variant``'s tokens/s must be at least ``ratio`` times ``reference``'s (same session)."""

    metric: Literal["decode", "prefill"] = Field("decode", description="Which speed is compared.")
    ratio: float = Field(gt=0, description="The least factor: `variant`'s tokens/s over `reference`'s.")

class VersusReference(BaseModel):
    """Reference mode: NEW's tokens/s over OLD's (same variant, same session) must be at least this."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_decode_ratio: float = Field(0.5, gt=0, description="NEW's decode tokens/s over OLD's, at least.")
    min_prefill_ratio: float = Field(0.5, gt=0, description="NEW's prefill tokens/s over OLD's, at least.")


class ThroughputSpec(CheckSpec):
    """Prefill and decode tokens/s for one declared shape, on pytest-benchmark, against per-model floors and
    ratios between variants."""

    kind: Literal["throughput"]
    batch: int = Field(1, ge=1, le=4096, description="Rows per batch.")
    prompt_tokens: int = Field(32, ge=1, description="Prompt length in tokens.")
    new_tokens: int = Field(16, ge=2, description="Tokens generated; at least 2: the first new token comes from the "
                                                  "prefill.")
    rounds: int = Field(3, ge=1, le=1000, description="Timed rounds.")
    warmup_rounds: int = Field(1, ge=0, le=1000, description="Untimed rounds first.")
    budgets: dict[str, dict[str, dict[str, ThroughputBudget]]] = Field(default_factory=dict, description=(
        f"{BUDGETS_HELP} Floors belong to the model they were measured on."))
    min_ratios: list[SpeedRatio] = Field(default_factory=list, description=(
        "Speed ratios between two variants measured in the same session."))
    vs_reference: VersusReference = Field(default_factory=VersusReference, description=(
        "With `--reference OLD`: NEW's speed as a ratio to OLD's same variant."))
    devices: list[str] | None = Field(None, description=DEVICES_HELP)

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


def _benchmark(ctx: CheckContext) -> Any | None:
    """pytest-benchmark's fixture, or None where the plugin is not loaded (``-p no:benchmark``)."""
    import pytest

    try:
        return ctx.request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        return None


@register_check("throughput")
class ThroughputCheck(Check[ThroughputSpec]):
    Spec = ThroughputSpec

    def _key(self, ctx: CheckContext) -> str:
        spec = self.spec
        return observation_key(ctx, "throughput", {"shape": str(spec.shape), "rounds": spec.rounds,
                                                   "warmup_rounds": spec.warmup_rounds})

    def _measure(self, ctx: CheckContext, model: Any, tokenizer: Any) -> tuple[ThroughputFigures, str]:
        """Timed rounds, on pytest-benchmark when it is enabled, else on the harness's own clock."""
        spec = self.spec
        benchmark = _benchmark(ctx)
        if benchmark is None or benchmark.disabled:
            conflict = parallel_conflict(ctx.device, measuring="timings")
            if conflict:
                raise NotJudged(f"{spec.id}[{ctx.variant}] on {ctx.device.klass}: throughput not judged: {conflict}")
            why = "not loaded" if benchmark is None else "disabled (--benchmark-disable, or pytest-xdist)"

            def own_clock() -> ThroughputFigures:
                return measure_throughput(model, tokenizer, spec.shape, device=ctx.device, rounds=spec.rounds,
                                          warmup_rounds=spec.warmup_rounds)

            figures = benchmark.pedantic(own_clock) if benchmark is not None else own_clock()
            return figures, f"harness per-step clock (pytest-benchmark {why})"
        benchmark.group = f"{ctx.suite}::{spec.id} ({spec.shape})"
        inputs = throughput_inputs(model, tokenizer, spec.shape)
        timings: list[RoundTiming] = []

        def one_round() -> None:
            timings.append(timed_round(model, tokenizer, inputs, spec.shape, device=ctx.device))

        benchmark.pedantic(one_round, rounds=spec.rounds, warmup_rounds=spec.warmup_rounds, iterations=1)
        figures = ThroughputFigures(shape=spec.shape, rounds=tuple(timings[-spec.rounds:]), device=ctx.device.klass)
        benchmark.extra_info.update(figures.figures(), variant=str(ctx.variant), device=ctx.device.description,
                                    device_class=ctx.device.klass)
        return figures, "pytest-benchmark"

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        figures, timer = self._timed(ctx)
        problems, missing = self._judge(ctx, figures, timer)
        self._finish(ctx, problems, missing)

    def run_against_reference(self, pair: ReferenceRun) -> None:
        """NEW's floors as in a normal run, and NEW's tokens/s over OLD's (same variant, same clock)."""
        __tracebackhide__ = True
        spec = self.spec
        variant = pair.new.variant
        assert variant is not None
        old_ctx = pair.on_old()
        skip_unless_device(spec.devices, old_ctx)
        old = old_ctx.pool.observe(variant, self._key(old_ctx), lambda loaded: measure_throughput(
            loaded.model, old_ctx.tokenizer, spec.shape, device=old_ctx.device, rounds=spec.rounds,
            warmup_rounds=spec.warmup_rounds))
        old_ctx.record(**{name: round(getattr(old, name), 2) for name in METRICS.values()})
        ctx = pair.on_new()
        figures, timer = self._timed(ctx)
        problems, _ = self._judge(ctx, figures, timer)
        sides = ctx.sides
        for metric, floor in (("decode", spec.vs_reference.min_decode_ratio),
                              ("prefill", spec.vs_reference.min_prefill_ratio)):
            name = METRICS[metric]
            ratio = getattr(figures, name) / getattr(old, name)
            ctx.record(**{f"{metric}_ratio_vs_old": round(ratio, 3)})
            if ratio < floor:
                problems.append(f"{metric} {getattr(figures, name):.1f} tokens/s on {sides.actual_short}, "
                                f"{getattr(old, name):.1f} on {sides.expected} (same session, {spec.shape}): "
                                f"{ratio:.2f}x < vs_reference.min_{metric}_ratio {floor:g}")
        self._finish(ctx, problems, None)  # judged: NEW against OLD

    def _timed(self, ctx: CheckContext) -> tuple[ThroughputFigures, str]:
        __tracebackhide__ = True
        variant = ctx.variant
        assert variant is not None
        spec = self.spec
        skip_unless_device(spec.devices, ctx)
        model, tokenizer = ctx.model, ctx.tokenizer
        assert_fits_context(model, spec.prompt_tokens, spec.new_tokens, what=spec.id)
        figures, timer = self._measure(ctx, model, tokenizer)
        ctx.record(**figures.figures(), timer=timer)
        ctx.pool.observe(variant, self._key(ctx), lambda _loaded: figures)
        return figures, timer

    def _where(self, ctx: CheckContext) -> str:
        return f"{self.spec.id}[{ctx.variant.key if ctx.variant else ''}] on {ctx.device.klass}"

    def _judge(self, ctx: CheckContext, figures: ThroughputFigures, timer: str) -> tuple[list[str], str | None]:
        """Problems with the floors and the ratios; why nothing was judged (None: something was)."""
        variant = ctx.variant
        assert variant is not None
        spec = self.spec
        klass, model_name = ctx.device.klass, ctx.pool.resolved.name
        problems: list[str] = []
        budget, key = budget_for(spec.budgets, model=model_name, device_class=klass, variant=variant.key)
        judged = budget is not None
        missing = None
        if budget is None:
            missing = missing_budget(spec.budgets, model=model_name, device_class=klass, variant=variant.key)
            ctx.record(budget=missing)
        else:
            ctx.record(budget=f"{key}: {budget.model_dump(exclude_none=True)}")
            for name, floor in (("decode_tokens_per_s", budget.min_decode_tokens_per_s),
                                ("prefill_tokens_per_s", budget.min_prefill_tokens_per_s)):
                value = getattr(figures, name)
                if floor is not None and value < floor:
                    problems.append(
                        f"{name.replace('_tokens_per_s', '')} {value:.1f} tokens/s < min_{name} {floor:g} "
                        f"(budgets.{key}; device class {klass}, variant {variant.key}; "
                        f"{spec.shape}, median of {len(figures.rounds)} rounds, {timer})"
                    )
        for ratio in spec.min_ratios:
            if not ratio.applies(variant=variant.key, device_class=klass, model=model_name):
                continue
            judged = True
            reference = ctx.pool.observe(
                VariantSpec.from_key(ratio.reference), self._key(ctx),
                lambda loaded: measure_throughput(loaded.model, ctx.tokenizer, spec.shape, device=ctx.device,
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
        if judged and budget is None:
            warnings.warn(NoBudgetWarning(f"{self._where(ctx)}: {missing}; ratios judged, absolute speed not"),
                          stacklevel=1)
        return problems, None if judged else missing

    def _finish(self, ctx: CheckContext, problems: list[str], missing: str | None) -> None:
        __tracebackhide__ = True
        if problems:
            speed = "CPU" if not ctx.device.is_cuda else "GPU"
            raise CheckFailure(
                f"{self._where(ctx)}: throughput budget not met ({speed} speed):\n  " + "\n  ".join(problems)
                + "\nFix: profile what slowed down, or lower the budget in the suite if the machine "
                "changed; compare runs with --benchmark-save / --benchmark-compare."
            )
        if missing is not None:
            nothing_judged(self._where(ctx), missing)
