"""``kernels``: the same prompts under each available attention implementation agree within noise.

The first implementation listed is the reference (by default ``sdpa``, what
transformers picks on CPU and most GPUs); every other one is switched in on
the loaded model with ``set_attn_implementation`` (transformers 5 dispatches
attention through ``AttentionInterface``, so this needs no reload), greedy
decoding is repeated, and the comparison engine judges it under the variant's
noise tolerance, scoring the reference's tokens after an accepted near-tie
with the other kernel. The model's own implementation is restored afterwards.
``flash_attention_2`` is tried only where ``flash_attn`` is installed and a GPU
is in use; any kernel a model cannot run is reported (figures), not failed,
unless the suite names it in ``require``. Where fewer than two can run because the
architecture or the machine has no other (Gemma 2 declares no sdpa; flash needs CUDA),
the check skips saying so; where one the model supports fails to switch, it fails.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from harness.checks.base import Check, CheckContext, register_check
from harness.checks.consistency import ConsistencySpec, Findings, encoded_prompts, greedy, judge_run, tolerance_for
from harness.errors import CheckFailure

FLASH = "flash_attention_2"


class KernelsSpec(ConsistencySpec):
    """The same prompts under each available attention implementation must agree within noise; one the model or
    machine cannot run is reported, not failed, unless required."""

    kind: Literal["kernels"]
    implementations: list[str] = Field(default_factory=lambda: ["sdpa", "eager", FLASH], min_length=2, description=(
        "Attention implementations to compare; the first is the reference. flash_attention_2 runs only with the "
        "flash_attn package on a GPU."))
    require: list[str] = Field(default_factory=list, description=(
        "Implementations (from `implementations`) that must run here: one that cannot fails instead of being "
        "reported."))

    @field_validator("implementations")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("list each attention implementation at most once")
        return value

    @model_validator(mode="after")
    def _required_listed(self) -> KernelsSpec:
        missing = [name for name in self.require if name not in self.implementations]
        if missing:
            raise ValueError(f"require names {missing} which are not in implementations")
        return self


def unavailable_reason(name: str, ctx: CheckContext) -> str | None:
    """Why ``name`` cannot run here, before trying it (flash-attention needs its package and CUDA)."""
    if name == FLASH:
        if importlib.util.find_spec("flash_attn") is None:
            return "the flash_attn package is not installed"
        if not ctx.device.is_cuda:
            return f"flash-attention needs CUDA; running on {ctx.device.description}"
    return None


def architecture_lacks(base: Any, name: str) -> str | None:
    """Why the model's architecture cannot run ``name`` at all (transformers' own support flags), or None.

    Gemma 2 declares no sdpa support, for one: on a CPU it has eager attention only, which is the
    model's design, not a fault the check should fail on.
    """
    flag = {"sdpa": "_supports_sdpa", FLASH: "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}.get(name)
    if flag is not None and getattr(type(base), flag, True) is False:
        return f"{type(base).__name__} does not support it ({flag} is False in transformers)"
    return None


def _base(model: Any) -> Any:
    """The transformers model under a peft wrapper (whose config carries the implementation)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@register_check("kernels")
class KernelsCheck(Check[KernelsSpec]):
    Spec = KernelsSpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        model, tokenizer = ctx.model, ctx.tokenizer
        base = _base(model)
        original = base.config._attn_implementation
        tol = tolerance_for(ctx, self.spec)
        findings = Findings(self.spec.id, tokenizer)
        prompts = encoded_prompts(ctx, self.spec)
        skipped: dict[str, str] = {}
        lacking: set[str] = set()  # not this model's or this machine's to run: skipped[name] says why
        compared: list[str] = []  # the first one ran decodes; each later one is judged against it
        reference: list[Any] = []
        try:
            for name in self.spec.implementations:
                reason = unavailable_reason(name, ctx) or architecture_lacks(base, name)
                if reason:
                    skipped[name], lacking = reason, lacking | {name}
                    continue
                reason = self._switch(base, name)
                if reason:
                    skipped[name] = reason
                    continue
                if not compared:
                    reference = [greedy(model, tokenizer, p, self.spec.max_new_tokens) for p in prompts]
                else:
                    from harness.judge.compare import sides

                    named = sides(compared[0], name)
                    for prompt, ref in zip(prompts, reference):
                        findings.add(f"prompt {prompt.label}, {name} vs {compared[0]}",
                                     judge_run(ref, model, tokenizer, prompt, self.spec.max_new_tokens, tol,
                                               sides=named), named)
                compared.append(name)
        finally:
            base.set_attn_implementation(original)
        ctx.record(kernels_compared=compared, kernels_unavailable=skipped)
        required = {n: r for n, r in skipped.items() if n in self.spec.require}
        if not required and len(compared) < 2 and all(n in lacking for n in skipped):
            import pytest

            pytest.skip(f"{self.spec.id}: only {compared or 'no'} attention implementation(s) exist for this model "
                        "here, so there is nothing to compare: " + "; ".join(f"{n}: {r}" for n, r in skipped.items())
                        + ". The check does not apply; list implementations in `require` to fail instead")
        if required or len(compared) < 2:
            raise CheckFailure(
                f"{self.spec.id}: " + (
                    "required attention implementation(s) unavailable: " if required else
                    f"only {compared or 'no'} implementation(s) could run, so nothing was compared: ")
                + "; ".join(f"{n}: {r}" for n, r in (required or skipped).items())
                + ". Fix: install the kernel, or list implementations this model and device support."
            )
        findings.finish(
            ctx, headline="attention implementations disagree beyond numerical noise", tol=tol,
            fix="One kernel computes attention differently (masking, scaling, softcapping, dtype), not just "
                "in another summation order. Pin the right one with the registry's attn_implementation, report "
                "the kernel bug, or raise `tolerance` if the differences are only numerical.",
        )

    @staticmethod
    def _switch(base: Any, name: str) -> str | None:
        """Switch the loaded model to ``name``; the reason it cannot, or None."""
        try:
            base.set_attn_implementation(name)
        except Exception as exc:  # noqa: BLE001 - an unsupported kernel is reported as such
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if base.config._attn_implementation != name:
            return f"the model kept {base.config._attn_implementation!r} (it cannot switch kernels on a loaded model)"
        return None
