"""``drift``: how far a variant's next-token distributions move from a reference variant.

The reference (by default the variant's base: ``fp16`` for ``nf4``, ``fp16`` for
``fp16-lora``, ``nf4`` for ``nf4-lora``) generates a greedy continuation of each prompt;
both variants are then teacher-forced over prompt + continuation, and every position's
next-token distribution is compared: mean and max KL(reference || variant), top-1
agreement, and the first new token where the variant's greedy choice leaves the
reference's path.

The reference's log-probabilities are memoized in the pool (float32, on CPU) by the
reference's own item, while it is loaded; so in a normal session nothing loads twice.
A reference outside ``--variants`` is loaded once for the purpose (an extra load, shown
in the session summary), after which the variant under test is loaded again.

For an adapter compared with its own base, the check also asserts that the adapter
changes something (``min_mean_kl``, default 1e-4): a no-op adapter fails.

Budgets belong to a model (``budgets: {model: {variant: ...}}``, ``device_budgets:
{model: {device class: {variant: ...}}}``): how far NF4 moves a model depends on the
model. The reference variant's own item measures the reference and judges nothing, so it
skips, saying so; it is kept (not left out at collection) because it measures while its
variant is loaded, which spares a second load of the reference.

In reference mode (``--reference OLD``) every item, the reference variant's included, is
also judged NEW against OLD on the same variant: OLD's greedy continuations are
teacher-forced through NEW and each position's next-token distribution must agree
within the variant's noise (``compare_distributions``, the engine's tolerance), the KL
figures recorded beside. NEW's own budgets (where its name has them) still apply.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from harness.checks.base import Check, CheckContext, CheckSpec, ReferenceRun, register_check
from harness.observe.prompts import (
    CHATS_HELP, ChatMessages, PromptText, assert_fits_context, encode_chat_or_why, encode_prompt, leave_out_refused,
)
from harness.errors import CheckFailure
from harness.checks.budgets import (
    Budget, NoBudgetWarning, budget_for, missing_budget, nothing_judged, observation_key, validate_device_table,
    validate_model_table,
)
from harness.measure.drift import (
    DriftReference, DriftResult, compare_to_reference, default_reference, reference_observation, token_logprobs,
)
from harness.models.variants import ALL_KEYS, VariantSpec

ADAPTER_MIN_MEAN_KL = 1e-4


class DriftBudget(Budget):
    """Bounds on one variant's drift from its reference; set at least one."""

    max_mean_kl: float | None = Field(None, ge=0, description="Mean KL(reference || variant) over all positions, "
                                                              "in nats.")
    max_kl: float | None = Field(None, ge=0, description="KL(reference || variant) at any one position, in nats.")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description=(
        "Fraction of positions where both pick the same most likely token."))
    min_mean_kl: float | None = Field(None, ge=0, description=(
        "The variant must differ at least this much (an adapter against its base: default 0.0001, so a no-op "
        "adapter fails)."))
    min_first_divergence: int | None = Field(None, ge=0, description=(
        "New tokens that must match the reference's greedy output before the first difference."))


class DriftSpec(CheckSpec):
    """How far each variant's next-token distributions move from a reference variant (KL, top-1 agreement,
    first greedy divergence), against per-model budgets; an adapter must change something."""

    kind: Literal["drift"]
    reference: str | None = Field(None, description=(
        "The variant compared against (default: each variant's base: fp16 for nf4 and fp16-lora, nf4 for "
        "nf4-lora); its own item measures and judges nothing."), json_schema_extra={"enum": [*ALL_KEYS, None]})
    prompts: list[PromptText] = Field(default_factory=list, description="Raw prompts the reference continues "
                                                                          "greedily; give `prompts` and/or `chats`.")
    chats: list[ChatMessages] = Field(default_factory=list, description=CHATS_HELP)
    new_tokens: int = Field(16, ge=1, le=1024, description="Tokens of the reference's greedy continuation, over "
                                                           "which both variants are compared.")
    budgets: dict[str, dict[str, DriftBudget]] = Field(default_factory=dict, description=(
        "`{model: {variant: budget}}`: budgets belong to the model they were measured on; on a model with none, "
        "figures are recorded and nothing is judged (a skip saying so)."))
    device_budgets: dict[str, dict[str, dict[str, DriftBudget]]] = Field(default_factory=dict, description=(
        "`{model: {device class: {variant: budget}}}` (device class `cpu`, `cuda`, `cuda-smXY` or `any`): "
        "wins over `budgets` on that device."))

    @field_validator("reference")
    @classmethod
    def _reference_known(cls, value: str | None) -> str | None:
        if value is not None and value not in ALL_KEYS:
            raise ValueError(f"unknown variant {value!r} (known: {', '.join(ALL_KEYS)})")
        return value

    @field_validator("budgets", mode="before")
    @classmethod
    def _variant_keys(cls, value: Any) -> Any:
        return validate_model_table(value, _variant_table)

    @field_validator("device_budgets", mode="before")
    @classmethod
    def _table(cls, value: Any) -> Any:
        return validate_model_table(value, validate_device_table, where="device_budgets")

    @model_validator(mode="after")
    def _has_prompts(self) -> DriftSpec:
        if not self.prompts and not self.chats:
            raise ValueError("give at least one of 'prompts' (raw text) or 'chats' (lists of messages)")
        return self


def _variant_table(value: Any, *, where: str) -> Any:
    """One model's drift budgets, keyed by variant (per-device ones go under ``device_budgets``)."""
    if isinstance(value, dict):
        for key in value:
            if key not in ALL_KEYS:
                hint = ("; per-device budgets go under device_budgets: {model: {cpu: {nf4: {...}}}}"
                        if key in ("any", "cpu", "cuda") or str(key).startswith("cuda-") else "")
                raise ValueError(f"{where}: drift budgets are keyed by variant; {key!r} is not one "
                                 f"(known: {', '.join(ALL_KEYS)}){hint}")
    return value


@register_check("drift")
class DriftCheck(Check[DriftSpec]):
    Spec = DriftSpec

    def reference_for(self, variant: VariantSpec) -> VariantSpec:
        if self.spec.reference is not None:
            return VariantSpec.from_key(self.spec.reference)
        return default_reference(variant)

    def _referencing(self, variant: VariantSpec) -> list[str]:
        """Variants of this check that use ``variant`` as their reference."""
        keys = self.spec.variants or list(ALL_KEYS)
        return [k for k in keys if k != variant.key and self.reference_for(VariantSpec.from_key(k)) == variant]

    def _prompt_ids(self, ctx: CheckContext) -> list[list[int]]:
        tokenizer = ctx.tokenizer
        out = [encode_prompt(tokenizer, prompt=p, messages=None) for p in self.spec.prompts]
        refused: list[str] = []
        for index, chat in enumerate(self.spec.chats):
            ids, why = encode_chat_or_why(tokenizer, chat, model=ctx.pool.resolved, what="this drift check has `chats`")
            if ids is None:
                refused.append(f"chat {index}: {why}")
            else:
                out.append(ids)
        leave_out_refused(refused, kept=len(out), subject=ctx.subject, note=ctx.note)
        return out

    def _reference(self, ctx: CheckContext, variant: VariantSpec, prompts: list[list[int]]) -> DriftReference:
        def observe(loaded: Any) -> DriftReference:
            for ids in prompts:
                assert_fits_context(loaded.model, len(ids), self.spec.new_tokens, what=self.spec.id)
            return reference_observation(loaded.model, ctx.tokenizer, prompts, self.spec.new_tokens,
                                         variant=variant.key)

        fields = self.spec.model_dump(include={"prompts", "chats", "new_tokens"})
        return ctx.pool.observe(variant, observation_key(ctx, "drift-reference", fields), observe)

    def _budget(self, model: str, klass: str, variant: str) -> tuple[DriftBudget | None, str | None]:
        budget, key = budget_for(self.spec.device_budgets, model=model, device_class=klass, variant=variant)
        if budget is not None:
            return budget, f"device_budgets.{key}"
        per_variant = self.spec.budgets.get(model, {})
        if variant in per_variant:
            return per_variant[variant], f"budgets.{model}.{variant}"
        return None, None

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        import warnings

        variant = ctx.variant
        assert variant is not None
        klass, model = ctx.device.klass, ctx.pool.resolved.name
        where = f"{self.spec.id}[{variant.key}] on {klass}"
        prompts = self._prompt_ids(ctx)
        users = self._referencing(variant)
        if users:
            ctx.loaded()
            self._reference(ctx, variant, prompts)
        reference = self.reference_for(variant)
        if reference == variant:
            ctx.record(drift_reference=variant.key, reference_for=",".join(users) or "none")
            nothing_judged(where, f"{variant.key} is this check's reference" + (
                f" for {', '.join(users)}: its distributions were measured here" if users else ""))
        loads_before = ctx.pool.load_counts[reference.key]
        ref = self._reference(ctx, reference, prompts)
        if ctx.pool.load_counts[reference.key] > loads_before:
            ctx.record(reference_extra_load=reference.key)
        result = compare_to_reference(ctx.model, ref, variant=variant.key)
        ctx.record(**result.figures())
        problems: list[str] = []
        budget, key = self._budget(model, klass, variant.key)
        is_adapter = variant.lora and reference == variant.base
        min_mean = budget.min_mean_kl if budget is not None and budget.min_mean_kl is not None else (
            ADAPTER_MIN_MEAN_KL if is_adapter else None)
        label = f"KL({reference.key} || {variant.key})"
        context = f"device class {klass}, variant {variant.key}"
        if budget is None:
            missing = missing_budget({**self.spec.budgets, **self.spec.device_budgets}, model=model,
                                     device_class=klass, variant=variant.key)
            ctx.record(budget=missing)
            if not is_adapter:
                nothing_judged(where, missing)
            warnings.warn(NoBudgetWarning(f"{where}: {missing}; judged only that the adapter changes something"),
                          stacklevel=1)
        else:
            ctx.record(budget=f"{key}: {budget.model_dump(exclude_none=True)}")
            if budget.max_mean_kl is not None and result.mean_kl > budget.max_mean_kl:
                problems.append(f"mean {label} {result.mean_kl:.5f} > max_mean_kl {budget.max_mean_kl:g} ({key}; {context})")
            if budget.max_kl is not None and result.max_kl > budget.max_kl:
                problems.append(f"max {label} {result.max_kl:.5f} > max_kl {budget.max_kl:g} ({key}; {context})")
            if budget.min_top1_agreement is not None and result.top1_agreement < budget.min_top1_agreement:
                problems.append(f"top-1 agreement with {reference.key} {result.top1_agreement:.4f} < "
                                f"min_top1_agreement {budget.min_top1_agreement:g} ({key}; {context})")
            first = result.first_divergence
            if (budget.min_first_divergence is not None and first is not None
                    and first.new_token < budget.min_first_divergence):
                problems.append(f"greedy output leaves {reference.key}'s at new token {first.new_token} < "
                                f"min_first_divergence {budget.min_first_divergence} ({key}; {context})")
        if min_mean is not None and result.mean_kl < min_mean:
            if is_adapter:
                problems.append(
                    f"the adapter changes nothing measurable: mean {label} = {result.mean_kl:.3g} over "
                    f"{result.positions} positions (minimum {min_mean:g}), top-1 agreement "
                    f"{result.top1_agreement:.4f}. A no-op adapter (lora_A or lora_B all zero, or "
                    "keys that did not load) is a failure. Fix: re-save the trained adapter and check "
                    "its target_modules and key names"
                )
            else:
                problems.append(f"mean {label} {result.mean_kl:.3g} < min_mean_kl {min_mean:g} ({key}; {context})")
        if problems:
            detail = _describe_divergence(ctx.tokenizer, result, ref, reference.key, variant.key)
            raise CheckFailure(
                f"{where}: drift from {reference.key} out of budget:\n  " + "\n  ".join(problems)
                + (f"\n{detail}" if detail else "")
            )

    def run_against_reference(self, pair: ReferenceRun) -> None:
        """NEW's variant against OLD's same variant, within the variant's noise; NEW's own budgets too."""
        __tracebackhide__ = True
        import pytest

        variant = pair.new.variant
        assert variant is not None
        old_ctx = pair.on_old()
        old_ctx.loaded()
        old = self._reference(old_ctx, variant, self._prompt_ids(old_ctx))
        ctx = pair.on_new()
        problems: list[str] = []
        try:
            self.run(ctx)
        except pytest.skip.Exception:
            pass  # NEW has no budget of its own: NEW against OLD below is the verdict
        except CheckFailure as exc:
            problems.append(str(exc))
        problems += versus_old(ctx, old, tolerance=self._tolerance(variant, half=ctx.half))
        if problems:
            raise CheckFailure(f"{pair.label}: " + "\n".join(problems))

    @staticmethod
    def _tolerance(variant: VariantSpec, *, half: str) -> Any:
        from harness.judge.tolerance import NoiseModel, builtin_tolerances

        return NoiseModel(tolerances=builtin_tolerances(half)).tolerance(variant.key)


def versus_old(ctx: CheckContext, old: DriftReference, *, tolerance: Any) -> list[str]:
    """OLD's paths teacher-forced through NEW: every position within the variant's noise (reference mode)."""
    from harness.checks.consistency import Findings
    from harness.judge.compare import compare_distributions

    variant = ctx.variant.key if ctx.variant else ""
    result = compare_to_reference(ctx.model, old, variant=variant)
    ctx.record(**{f"{k}_vs_old": v for k, v in result.figures().items() if k != "drift_reference"})
    findings = Findings(f"{ctx.check_id}[{variant}]", ctx.tokenizer)
    for index, (sequence, n_prompt, old_lp) in enumerate(zip(old.sequences, old.prompt_lengths, old.logprobs)):
        labels = [f"position {p}" + (f" (new token {p - n_prompt + 1})" if p >= n_prompt - 1 else "")
                  for p in range(len(sequence))]
        findings.add(f"prompt {index}", compare_distributions(old_lp, token_logprobs(ctx.model, sequence), tolerance,
                                                              labels=labels))
    for tie in findings.ties:
        ctx.note(f"{ctx.subject}: {tie}")
    if not findings.problems:
        return []
    sides = ctx.sides
    detail = "\n".join(f"  - {p}" for p in findings.problems)
    return [f"{ctx.check_id}[{variant}]: {sides.actual_short}'s next-token distributions moved from "
            f"{sides.expected}'s beyond the noise of {variant} (tolerance{tolerance.describe()}: mean "
            f"{tolerance.mean_abs_dlogp:g}, per position {tolerance.max_abs_dlogp:g}, tie gap {tolerance.tie_gap:g}; "
            f"mean KL {result.mean_kl:.4g}, top-1 agreement {result.top1_agreement:.3f} over {result.positions} "
            f"positions, {sides.expected}'s greedy paths teacher-forced):\n{detail}"]


def _describe_divergence(tokenizer: Any, result: DriftResult, ref: DriftReference, reference: str,
                         variant: str) -> str:
    first = result.first_divergence
    summary = (f"mean KL {result.mean_kl:.5f}, max KL {result.max_kl:.5f}, top-1 agreement "
               f"{result.top1_agreement:.4f} over {result.positions} positions")
    if first is None:
        return f"{summary}; greedy paths identical for all {len(ref.sequences)} prompts"
    n_prompt = ref.prompt_lengths[first.prompt]
    before = tokenizer.decode(list(ref.sequences[first.prompt][n_prompt:n_prompt + first.new_token]))
    return (f"{summary}; first greedy divergence: prompt {first.prompt}, new token {first.new_token} "
            f"(after {before!r}): {reference} {tokenizer.decode([first.expected])!r} (id {first.expected}), "
            f"{variant} {tokenizer.decode([first.got])!r} (id {first.got})")
