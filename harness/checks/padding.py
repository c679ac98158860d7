"""``padding``: a batch must score and generate like its prompts run one at a time.

A self-consistency check, so it has no golden: every prompt is run alone
(unpadded, the reference) and then in a padded batch, and the two are judged
by the comparison engine (``harness.judge.compare``) in log-probabilities, with the
variant's noise model, so that the verdict does not depend on the model's logit
scale. What each side checks:

- **left** (pads before the prompt, how generation batches are built): the
  next-token distribution at *every* real position of each row must match the
  unpadded run (``compare_distributions``): a model that lets real tokens attend
  to pads, or takes positions from the padded length, moves them all. Then the
  greedy continuation generated from the padded batch must be what the prompt
  alone prefers: the row's path is scored unpadded (one forward pass over prompt
  + path, no pads, no cache) and judged like a golden (``compare``: identical
  preferences within noise, a flip only as a reported near-tie); that covers the
  cache and the growing mask.
- **right** (pads after the prompt, how scoring batches are built): under a
  causal mask no real position can see a pad, so the distributions at every
  real position check only that padding changes nothing else (batch shape,
  kernels). The continuation generated *after* the pads is where an ignored
  mask (new tokens attending to pads) or mishandled position ids (new tokens
  placed after the pads) shows, and it is judged like the left side's.

The unpadded side is scored in one forward pass per prompt instead of being
decoded token by token: where it prefers every token of the padded row's path,
decoding it alone would have produced that path (within noise, and the KV cache's
agreement with a full forward is the ``cache`` kind's to judge). Where a logits
processor acts under greedy decoding, the path is forced through ``generate`` so
both sides see processed scores.

NaN or inf anywhere in a compared row is named as such and never passes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.observe.prompts import assert_fits_context
from harness.judge.compare import Sides, Verdict, compare, compare_distributions, render_tokens
from harness.judge.tolerance import Tolerance, ToleranceSpec
from harness.judge.tolerance import TOLERANCE_HELP
from harness.errors import CheckFailure
from harness.observe.observation import Observation, Step, observe_greedy_batch
from harness.observe.scores import free_run_of, processors_act_in

Side = Literal["left", "right"]

MAX_REASONS_PER_ROW = 3
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Hello!",
    "The capital of France is",
    "Water boils at a temperature of one hundred degrees",
)


class PaddingSpec(CheckSpec):
    """A padded batch must score and generate like its prompts run one at a time, within noise: fails on a
    model, kernel or wrapper that ignores the attention mask."""

    kind: Literal["padding"]
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=2, description=(
        "At least two distinct prompts, of different lengths (so that some are padded)."))
    max_new_tokens: int = Field(8, ge=1, le=256, description="Greedy tokens generated per prompt (left padding).")
    sides: list[Side] = Field(default_factory=lambda: ["left", "right"], min_length=1, description=(
        "`left`: pads before the prompt, how generation batches are built (scores and generation checked); "
        "`right`: pads after it, how scoring batches are built."))
    tolerance: ToleranceSpec | None = Field(None, description=TOLERANCE_HELP)
    atol: float | None = Field(None, description="Removed: use `tolerance`.", json_schema_extra={"deprecated": True})

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

    @field_validator("atol")
    @classmethod
    def _atol_is_gone(cls, value: float | None) -> float | None:
        if value is not None:
            raise ValueError(
                "atol bounded raw logits, whose scale differs between models; padding is now judged in "
                "log-probabilities with the variant's noise model. Use `tolerance: {max_abs_dlogp: ..., "
                "mean_abs_dlogp: ..., tie_gap: ...}` (any subset) instead"
            )
        return value

    def tolerance_for(self, variant_key: str | None, *, half: str = "float16") -> Tolerance:
        return self.noise_model(half=half).tolerance(variant_key)


@register_check("padding")
class PaddingCheck(Check[PaddingSpec]):
    Spec = PaddingSpec

    def run(self, ctx: CheckContext) -> None:
        __tracebackhide__ = True
        tokenizer, model = ctx.tokenizer, ctx.model
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
        tol = self.spec.tolerance_for(ctx.variant.key if ctx.variant else None, half=ctx.half)
        processors = processors_act_in(model)
        problems: list[str] = []
        figures: dict[str, float] = {}
        alone = AloneScores(model, tokenizer)
        for side in self.spec.sides:
            verdicts = self._judge_side(model, tokenizer, prompt_ids, side, tol, alone,
                                        processors_act=processors)
            figures[f"padding_max_abs_dlogp_{side}"] = max(v.stats.get("max_abs_dlogp", 0.0) for v in verdicts)
            for verdict in verdicts:
                shown = [render_tokens(r, tokenizer) for r in verdict.reasons[:MAX_REASONS_PER_ROW]]
                if len(verdict.reasons) > MAX_REASONS_PER_ROW:
                    shown.append(f"... and {len(verdict.reasons) - MAX_REASONS_PER_ROW} more for that prompt "
                                 f"(mean |Δ log p| {verdict.stats.get('mean_abs_dlogp', float('nan')):.3g}, "
                                 f"max {verdict.stats.get('max_abs_dlogp', float('nan')):.3g})")
                problems += shown
                for tie in verdict.accepted_ties:
                    ctx.forgive(render_tokens(tie.describe(ctx.subject), tokenizer))
        ctx.forgive_widened(tol)
        ctx.record(**figures)
        if problems:
            raise CheckFailure(
                f"{self.spec.id}: a padded batch does not behave like its prompts run one at a time "
                f"({len(problems)} problem{'s' if len(problems) > 1 else ''}; log-probabilities, tolerance "
                f"mean {tol.mean_abs_dlogp:g}, per position {tol.max_abs_dlogp:g}, tie gap {tol.tie_gap:g}"
                f"{tol.describe()}):\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\nA model that ignores the attention mask (or mishandles position ids under padding) "
                "lets real tokens attend to pad tokens. If the differences are numerical noise of this model "
                "and device, measure it and set `tolerance:` in the suite."
            )

    def _judge_side(self, model: Any, tokenizer: Any, prompt_ids: list[list[int]], side: Side, tol: Tolerance,
                    alone_scores: AloneScores, *, processors_act: bool) -> list[Verdict]:
        """Every real position's distribution, then each row's continuation, against the prompt alone."""
        input_ids, mask = pad_batch(tokenizer, prompt_ids, side)
        if side == "left":
            rows = padded_logprobs(model, input_ids, mask)
            batch = observe_greedy_batch(model, tokenizer, input_ids, mask, self.spec.max_new_tokens)
        else:
            batch, rows = decode_after_prefill(model, input_ids, mask, self.spec.max_new_tokens)
        named = Sides(expected="the padded batch", actual="the prompt alone", expected_short="padded",
                      actual_short="alone")
        verdicts: list[Verdict] = []
        for index, (ids, row) in enumerate(zip(prompt_ids, batch)):
            path = list(row.token_ids)
            alone, scored = alone_scores(ids, path, processors_act=processors_act and side == "left")
            labels = [f"{self._label(index)}, {side} padding, position {p} of {len(ids)}" for p in range(len(ids))]
            verdicts.append(compare_distributions(alone, rows[index][mask[index].bool()], tol, labels=labels))
            verdict = compare(row, free_run_of(scored, row, ids), tol, rescore=lambda _ids, s=scored: s, sides=named)
            prefix = f"{self._label(index)}, {side} padding, continuation: "
            verdicts.append(replace(
                verdict,
                accepted_ties=tuple(replace(t, where=prefix + f"step {t.step}") for t in verdict.accepted_ties),
                reasons=tuple(prefix + r for r in verdict.reasons)))
        return verdicts

    def _label(self, index: int) -> str:
        text = self.spec.prompts[index]
        return f"prompt {index} " + repr(text if len(text) <= 40 else text[:37] + "...")


class AloneScores:
    """``unpadded`` memoized for one item: both sides usually continue a prompt along the same path,
    and the prompt alone scores that path the same whichever side's batch produced it."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, tokenizer
        self._seen: dict[tuple[tuple[int, ...], tuple[int, ...], bool], tuple[Any, tuple[Step, ...]]] = {}

    def __call__(self, ids: list[int], path: list[int], *, processors_act: bool) -> tuple[Any, tuple[Step, ...]]:
        key = (tuple(ids), tuple(path), processors_act)
        if key not in self._seen:
            self._seen[key] = unpadded(self.model, self.tokenizer, ids, path, processors_act=processors_act)
        return self._seen[key]


def unpadded(model: Any, tokenizer: Any, ids: list[int], path: list[int], *,
             processors_act: bool) -> tuple[Any, tuple[Step, ...]]:
    """One prompt alone, in one forward pass over prompt + path: every prompt position's next-token
    log-probabilities, and the path's scores (forced through ``generate`` where processors act)."""
    import torch

    from harness.observe.observation import step_from_scores
    from harness.observe.scores import teacher_force

    full = torch.tensor([ids + path], device=_device(model))
    logprobs = padded_logprobs(model, full, torch.ones_like(full))[0]
    if processors_act:
        return logprobs[: len(ids)], teacher_force(model, ids, path, tokenizer=tokenizer)
    start = len(ids) - 1
    return logprobs[: len(ids)], tuple(step_from_scores(logprobs[start + i], t) for i, t in enumerate(path))


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def pad_batch(tokenizer: Any, prompt_ids: list[list[int]], side: Side) -> tuple[Any, Any]:
    """Pad with the tokenizer itself (its pad token), restoring its padding side."""
    previous = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt",
                              return_attention_mask=True)
    finally:
        tokenizer.padding_side = previous
    return batch["input_ids"], batch["attention_mask"]


def padded_logprobs(model: Any, input_ids: Any, mask: Any) -> Any:
    """Every position's next-token log-probabilities from one forward pass (positions from the mask)."""
    import torch

    device = _device(model)
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def decode_after_prefill(model: Any, input_ids: Any, mask: Any, max_new_tokens: int) -> tuple[list[Observation], Any]:
    """Greedy decoding by hand after a (right-)padded prefill: one observation per row, and the
    prefill's next-token log-probabilities at every position.

    ``generate`` would continue every row from the last column, a pad for the
    shorter rows; here each row continues from its own last real token, its new
    tokens take its own next positions, and its pads stay masked in the cache:
    exactly what a model that ignores the mask or mishandles positions gets
    wrong. Scores are the raw logits (no logits processors), for the padded batch
    and for its unpadded reference alike. The prefill's log-probabilities are
    ``padded_logprobs`` of the same batch, bit for bit (the cache changes what is
    kept, not what is computed), without a second pass.
    """
    import torch

    from harness.observe.observation import cache_kwargs, eos_ids, step_from_scores

    device = _device(model)
    input_ids, mask = input_ids.to(device), mask.to(device).long()
    batch = input_ids.shape[0]
    lengths = mask.sum(-1)
    stops = eos_ids(model)
    steps: list[list[Step]] = [[] for _ in range(batch)]
    done = [False] * batch
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True)
        prefill = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        scores = out.logits[torch.arange(batch, device=device), lengths - 1]
        for i in range(max_new_tokens):
            chosen = [int(scores[r].argmax()) for r in range(batch)]
            for r, token in enumerate(chosen):
                if not done[r]:
                    steps[r].append(step_from_scores(scores[r], token))
                    done[r] = token in stops
            if all(done) or i + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
            out = model(input_ids=torch.tensor(chosen, device=device)[:, None], attention_mask=mask,
                        position_ids=(lengths + i)[:, None], use_cache=True, **cache_kwargs(out))
            scores = out.logits[:, -1]
    observations = []
    for r in range(batch):
        prompt = tuple(int(t) for t, m in zip(input_ids[r].tolist(), mask[r].tolist()) if m)
        ended = bool(steps[r]) and steps[r][-1].token_id in stops
        observations.append(Observation(prompt_ids=prompt, steps=tuple(steps[r]), stop="eos" if ended else "length"))
    return observations, prefill
