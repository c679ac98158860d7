"""``padding``: a batch must score and generate like its prompts run one at a time.

A self-consistency check, so it has no golden: every prompt is run alone
(unpadded) and then in a padded batch, and the two must agree. Right padding is
how scoring batches are built; left padding is how generation batches are
built. A model (or a wrapper, a quantized kernel, an attention backend) that
ignores the attention mask lets real tokens attend to the pad tokens, which
shows up as large logit differences and diverging continuations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.checks.greedy import generate_greedy
from harness.checks.prompts import assert_fits_context, describe_token, greedy_generate
from harness.errors import CheckFailure

Side = Literal["left", "right"]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Hello!",
    "The capital of France is",
    "Water boils at a temperature of one hundred degrees",
)

# Max |logit difference| tolerated between a padded batch row and the same
# prompt run alone, by quantization (LoRA variants use their base's). Measured
# on SmolLM2-135M on CPU, 7 prompts of 2-14 tokens, as max over prompts:
#   fp16 0.0625, fp16-lora 0.098 (4-6 fp16 ulps at logits of 16-32)
#   nf4 0.227, nf4-lora 0.318 (bf16 compute: 2-3 ulps)
# identical for left and right padding, so the noise is the batch shape, not
# the padding. With the mask ignored, the padded rows are off by 1.8 to 31
# (1.8 with a single pad token, nf4). The defaults sit 2.4x above the noise
# and 2.5x (nf4) to 7x (fp16) below the smallest leak.
DEFAULT_ATOL: dict[str, float] = {"fp16": 0.25, "nf4": 0.75}


def default_atol(variant_key: str | None) -> float:
    quant = (variant_key or "fp16").split("-")[0]
    return DEFAULT_ATOL.get(quant, DEFAULT_ATOL["nf4"])


class PaddingSpec(CheckSpec):
    kind: Literal["padding"]
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=2)
    max_new_tokens: int = Field(8, ge=1, le=256)
    atol: float | None = Field(None, gt=0)
    sides: list[Side] = Field(default_factory=lambda: ["left", "right"], min_length=1)

    @field_validator("prompts")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("prompts must be distinct (padding needs prompts of different lengths)")
        if any(not p for p in value):
            raise ValueError("prompts must not be empty")
        return value

    @field_validator("sides")
    @classmethod
    def _unique_sides(cls, value: list[Side]) -> list[Side]:
        if len(set(value)) != len(value):
            raise ValueError("each side may be listed once")
        return value


@dataclass
class _Single:
    """One prompt run alone: the reference a padded batch row must match."""

    ids: list[int]
    last_logits: Any
    new_ids: list[int]
    step_logits: Any


@register_check("padding")
class PaddingCheck(Check[PaddingSpec]):
    Spec = PaddingSpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        tokenizer = ctx.tokenizer
        model = ctx.model
        prompt_ids = [list(tokenizer(p)["input_ids"]) for p in self.spec.prompts]
        lengths = [len(ids) for ids in prompt_ids]
        if len(set(lengths)) < 2:
            raise CheckFailure(
                f"{self.spec.id}: every prompt encodes to {lengths[0]} tokens, so nothing gets padded. "
                "Fix: use prompts of different lengths."
            )
        assert_fits_context(model, max(lengths), self.spec.max_new_tokens, what=self.spec.id)
        if tokenizer.pad_token_id is None:
            raise CheckFailure(f"{self.spec.id}: the tokenizer has no pad token, so batches cannot be padded.")
        atol = self.spec.atol if self.spec.atol is not None else default_atol(ctx.variant.key if ctx.variant else None)

        singles = [self._single(model, tokenizer, ids) for ids in prompt_ids]
        problems: list[str] = []
        figures: dict[str, float] = {"padding_atol": atol}
        for side in self.spec.sides:
            batch_logits = padded_last_logits(model, tokenizer, prompt_ids, side=side)
            worst = 0.0
            for index, single in enumerate(singles):
                diff = float((batch_logits[index] - single.last_logits).abs().max())
                worst = max(worst, diff)
                if not diff <= atol:
                    problems.append(
                        f"prompt {index} {self._label(index)}, {side} padding: last-token logits differ from "
                        f"the unpadded run by max |diff| {diff:.4g} > atol {atol:g} "
                        f"(padded to {max(lengths)} tokens from {len(single.ids)})"
                    )
            figures[f"padding_max_abs_diff_{side}"] = worst
            if side == "left":
                problems.extend(self._compare_generation(model, tokenizer, prompt_ids, singles, atol))
        ctx.record(**figures)
        if problems:
            raise CheckFailure(
                f"{self.spec.id}: a padded batch does not behave like its prompts run one at a time "
                f"({len(problems)} problem{'s' if len(problems) > 1 else ''}):\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\nA model that ignores the attention mask (or mishandles position ids under padding) "
                "lets real tokens attend to pad tokens. If the differences are small and only numerical, "
                "raise `atol` in the suite."
            )

    def _label(self, index: int) -> str:
        text = self.spec.prompts[index]
        return repr(text if len(text) <= 40 else text[:37] + "...")

    def _single(self, model: Any, tokenizer: Any, ids: list[int]) -> _Single:
        new_ids, step_logits = generate_greedy(model, tokenizer, ids, self.spec.max_new_tokens)
        # generate's first-step logits are the unpadded prompt's last-token logits
        return _Single(ids=ids, last_logits=step_logits[0], new_ids=new_ids, step_logits=step_logits)

    def _compare_generation(
        self, model: Any, tokenizer: Any, prompt_ids: list[list[int]], singles: list[_Single], atol: float
    ) -> list[str]:
        batch_new = generate_left_padded(model, tokenizer, prompt_ids, self.spec.max_new_tokens)
        problems: list[str] = []
        for index, (single, row) in enumerate(zip(singles, batch_new)):
            # a row that finished early is filled with pad tokens: compare what the single run produced
            got = row[: len(single.new_ids)]
            want = single.new_ids
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
            if at is None and len(got) < len(want):
                at = len(got)
            if at is None:
                continue
            w = want[at] if at < len(want) else None
            g = got[at] if at < len(got) else None
            line = (
                f"prompt {index} {self._label(index)}, left padding: greedy continuation diverges at new "
                f"token {at}: unpadded {describe_token(tokenizer, w)}, batched {describe_token(tokenizer, g)}"
            )
            margin = _margin(single.step_logits, at, w, g)
            if margin is not None:
                line += f"; unpadded logits margin {margin:.4g}" + (
                    " (a near-tie: within the logits tolerance)" if margin <= 2 * atol else ""
                )
            problems.append(line)
        return problems


def _pad(tokenizer: Any, prompt_ids: list[list[int]], side: Side) -> tuple[Any, Any]:
    """Pad with the tokenizer itself (its pad token and side), restoring its padding side."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt",
                              return_attention_mask=True)
    finally:
        tokenizer.padding_side = previous
    return batch["input_ids"], batch["attention_mask"]


def padded_last_logits(model: Any, tokenizer: Any, prompt_ids: list[list[int]], *, side: Side) -> Any:
    """Each row's logits at its true last token, from one padded forward pass (float32, CPU)."""
    import torch

    device = next(model.parameters()).device
    input_ids, mask = _pad(tokenizer, prompt_ids, side)
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                       use_cache=False).logits
    if side == "left":
        last = torch.full((len(prompt_ids),), input_ids.shape[1] - 1, device=device)
    else:
        last = torch.tensor([len(ids) - 1 for ids in prompt_ids], device=device)
    rows = torch.arange(len(prompt_ids), device=device)
    return logits[rows, last].float().cpu()


def generate_left_padded(model: Any, tokenizer: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch (generate derives positions from the mask)."""

    device = next(model.parameters()).device
    input_ids, mask = _pad(tokenizer, prompt_ids, "left")
    out = greedy_generate(model, tokenizer, input_ids.to(device), mask.to(device), max_new_tokens)
    return out[:, input_ids.shape[1]:].tolist()


def _margin(step_logits: Any, index: int, want: int | None, got: int | None) -> float | None:
    if step_logits is None or index >= len(step_logits) or want is None or got is None:
        return None
    step = step_logits[index]
    return float(step[want] - step[got])
