"""``padding``: a batch must score and generate like its prompts run one at a time.

A self-consistency check, so it has no golden: every prompt is run alone
(unpadded, the reference) and then in a padded batch, and the two are judged
by the comparison engine (``harness.compare``) in log-probabilities, with the
variant's noise model, so that the verdict does not depend on the model's logit
scale. What each side checks:

- **left** (pads before the prompt, how generation batches are built): the
  next-token distribution at *every* real position of each row must match the
  unpadded run (``compare_distributions``): a model that lets real tokens attend
  to pads, or takes positions from the padded length, moves them all. Then the
  greedy continuation generated from the padded batch must match the unpadded
  one (``compare``, with its near-tie rule and teacher forcing of the reference
  path after an accepted tie): that covers the cache and the growing mask.
- **right** (pads after the prompt, how scoring batches are built): under a
  causal mask no real position can see a pad, so the distributions at every
  real position check only that padding changes nothing else (batch shape,
  kernels). The continuation generated *after* the pads is where an ignored
  mask (new tokens attending to pads) or mishandled position ids (new tokens
  placed after the pads) shows, and it is judged like the left side's.

NaN or inf anywhere in a compared row is named as such and never passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from pydantic import Field, field_validator

from harness.checks.base import Check, CheckContext, CheckSpec, register_check
from harness.checks.prompts import assert_fits_context
from harness.compare import NoiseModel, Tolerance, ToleranceSpec, Verdict, compare, compare_distributions, render_tokens
from harness.errors import CheckFailure
from harness.observation import Observation, Step, observe_greedy, observe_greedy_batch, teacher_force_batch

Side = Literal["left", "right"]

MAX_REASONS_PER_ROW = 3
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Hello!",
    "The capital of France is",
    "Water boils at a temperature of one hundred degrees",
)


class PaddingSpec(CheckSpec):
    kind: Literal["padding"]
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), min_length=2)
    max_new_tokens: int = Field(8, ge=1, le=256)
    sides: list[Side] = Field(default_factory=lambda: ["left", "right"], min_length=1)
    tolerance: ToleranceSpec | None = None
    atol: float | None = None

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

    def tolerance_for(self, variant_key: str | None) -> Tolerance:
        return self.noise_model().tolerance(variant_key)


@dataclass
class _Single:
    """One prompt run alone: the reference its padded row must match."""

    ids: list[int]
    logprobs: Any  # [len(ids), vocab], float32
    continuation: dict[Side, Observation]


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
        tol = self.spec.tolerance_for(ctx.variant.key if ctx.variant else None)
        singles = [_Single(ids, prompt_logprobs(model, ids), self._continuations(model, tokenizer, ids))
                   for ids in prompt_ids]
        problems: list[str] = []
        figures: dict[str, float] = {}
        for side in self.spec.sides:
            verdicts = self._judge_side(model, tokenizer, singles, side, tol)
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

    def _label(self, index: int) -> str:
        text = self.spec.prompts[index]
        return f"prompt {index} " + repr(text if len(text) <= 40 else text[:37] + "...")

    def _continuations(self, model: Any, tokenizer: Any, ids: list[int]) -> dict[Side, Observation]:
        """The unpadded references: ``generate`` for the left side, the same hand-written decoding loop
        the right side uses (raw scores, no logits processors) for the right."""
        import torch

        refs: dict[Side, Observation] = {}
        if "left" in self.spec.sides:
            refs["left"] = observe_greedy(model, tokenizer, ids, self.spec.max_new_tokens)
        if "right" in self.spec.sides:
            one = torch.tensor([ids])
            refs["right"] = decode_after_prefill(model, one, torch.ones_like(one), self.spec.max_new_tokens)[0]
        return refs

    def _judge_side(self, model: Any, tokenizer: Any, singles: list[_Single], side: Side,
                    tol: Tolerance) -> list[Verdict]:
        """Every real position's distribution, then each row's continuation, against the unpadded runs."""
        prompt_ids = [s.ids for s in singles]
        input_ids, mask = pad_batch(tokenizer, prompt_ids, side)
        rows = padded_logprobs(model, input_ids, mask)
        verdicts: list[Verdict] = []
        for index, single in enumerate(singles):
            real = mask[index].bool()
            got = rows[index][real]
            labels = [f"{self._label(index)}, {side} padding, position {p} of {len(single.ids)}"
                      for p in range(len(single.ids))]
            verdicts.append(compare_distributions(single.logprobs, got, tol, labels=labels))
        references = [s.continuation[side] for s in singles]
        paths = [list(r.token_ids) for r in references]
        if side == "left":
            batch = observe_greedy_batch(model, tokenizer, input_ids, mask, self.spec.max_new_tokens)
            forced = _lazy(lambda: teacher_force_batch(
                model, input_ids.to(_device(model)), mask.to(_device(model)), paths,
                pad_token_id=tokenizer.pad_token_id))
        else:
            batch = decode_after_prefill(model, input_ids, mask, self.spec.max_new_tokens)
            forced = _lazy(lambda: [o.steps for o in decode_after_prefill(
                model, input_ids, mask, self.spec.max_new_tokens, paths=paths)])
        for index, (reference, row) in enumerate(zip(references, batch)):
            verdict = compare(reference, row, tol, rescore=lambda _ids, i=index: forced()[i])
            prefix = f"{self._label(index)}, {side} padding, continuation: "
            verdicts.append(replace(
                verdict,
                accepted_ties=tuple(replace(t, where=prefix + f"step {t.step}") for t in verdict.accepted_ties),
                reasons=tuple(prefix + r.replace("the golden", "the unpadded run").replace("golden", "unpadded")
                              for r in verdict.reasons)))
        return verdicts


def _lazy(make: Callable[[], list[tuple[Step, ...]]]) -> Callable[[], list[tuple[Step, ...]]]:
    """Teacher forcing of the whole batch, run only if some row needs it (an accepted near-tie)."""
    cache: list[list[tuple[Step, ...]]] = []

    def get() -> list[tuple[Step, ...]]:
        if not cache:
            cache.append(make())
        return cache[0]

    return get


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


def prompt_logprobs(model: Any, ids: list[int]) -> Any:
    """Next-token log-probabilities at every position of one unpadded prompt (float32, CPU)."""
    import torch

    input_ids = torch.tensor([ids], device=_device(model))
    return padded_logprobs(model, input_ids, torch.ones_like(input_ids))[0]


def padded_logprobs(model: Any, input_ids: Any, mask: Any) -> Any:
    """Every position's next-token log-probabilities from one forward pass (positions from the mask)."""
    import torch

    device = _device(model)
    input_ids, mask = input_ids.to(device), mask.to(device)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def decode_after_prefill(model: Any, input_ids: Any, mask: Any, max_new_tokens: int, *,
                         paths: list[list[int]] | None = None) -> list[Observation]:
    """Greedy decoding by hand after a (right-)padded prefill, one observation per row.

    ``generate`` would continue every row from the last column, a pad for the
    shorter rows; here each row continues from its own last real token, its new
    tokens take its own next positions, and its pads stay masked in the cache:
    exactly what a model that ignores the mask or mishandles positions gets
    wrong. Scores are the raw logits (no logits processors), for the padded batch
    and for its unpadded reference alike. With ``paths``, each row is forced
    along its path instead (teacher forcing after an accepted near-tie).
    """
    import torch

    from harness.observation import eos_ids, step_from_scores

    device = _device(model)
    input_ids, mask = input_ids.to(device), mask.to(device).long()
    batch = input_ids.shape[0]
    lengths = mask.sum(-1)
    stops = eos_ids(model)
    n = max_new_tokens if paths is None else max((len(p) for p in paths), default=0)
    steps: list[list[Step]] = [[] for _ in range(batch)]
    done = [paths is not None and not paths[r] for r in range(batch)]
    with torch.inference_mode():
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True)
        scores = out.logits[torch.arange(batch, device=device), lengths - 1]
        for i in range(n):
            chosen = []
            for r in range(batch):
                token = int(scores[r].argmax())
                if paths is not None and i < len(paths[r]):
                    token = paths[r][i]
                if not done[r]:
                    steps[r].append(step_from_scores(scores[r], token))
                    done[r] = (token in stops) if paths is None else i + 1 >= len(paths[r])
                chosen.append(token)
            if all(done) or i + 1 == n:
                break
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
            out = model(input_ids=torch.tensor(chosen, device=device)[:, None], attention_mask=mask,
                        position_ids=(lengths + i)[:, None], use_cache=True, **_cache_of(out))
            scores = out.logits[:, -1]
    observations = []
    for r in range(batch):
        prompt = tuple(int(t) for t, m in zip(input_ids[r].tolist(), mask[r].tolist()) if m)
        ended = bool(steps[r]) and steps[r][-1].token_id in stops
        observations.append(Observation(prompt_ids=prompt, steps=tuple(steps[r]), stop="eos" if ended else "length"))
    return observations


def _cache_of(out: Any) -> dict[str, Any]:
    """The KV cache to pass back: ``cache`` in transformers 5, ``past_key_values`` before."""
    if getattr(out, "cache", None) is not None:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}
