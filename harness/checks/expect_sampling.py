"""Sampled expectations: seeded samples of one prompt, and the paired test that compares two models' rates.

``expect`` with ``sample:`` judges a pass rate over samples drawn from a fixed seed; in
reference mode the same seeds make sample ``i`` of OLD and of NEW a pair, and a drop in
NEW's rate is judged by an exact McNemar test on the discordant pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MIN_TEMPERATURE = 1e-3


class Sampling(BaseModel):
    """``sample:``: judge a pass rate over seeded samples instead of one greedy answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(8, ge=1, le=256, description="Samples drawn.")
    seed: int = Field(0, description="Random seed of the first sample: the same seed draws the same samples.")
    # Below 0.001 sampling is greedy decoding in disguise, and near 1e-38 logits / temperature
    # overflows float32 to inf, so generate() fails on NaN probabilities.
    temperature: float = Field(0.7, ge=MIN_TEMPERATURE, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens with this "
                                                       "much probability.")
    top_k: int | None = Field(None, ge=1, description="Keep only the k most likely tokens (default: all).")
    min_pass_rate: float = Field(0.75, gt=0, le=1, description="Fraction of the samples that must pass every "
                                                                "assertion.")
    # reference mode: NEW's pass rate is worse than OLD's when the paired test's p-value is below this
    alpha: float = Field(0.05, gt=0, lt=1, description=(
        "With `--reference OLD`: NEW's pass rate fails as worse than OLD's when a paired test's p-value is below "
        "this."))


@dataclass(frozen=True)
class PairedTest:
    """Per-sample outcomes of OLD and NEW on the same seeds, and the exact McNemar test of a drop."""

    n: int
    old_rate: float
    new_rate: float
    old_only: int  # pairs that pass on OLD and fail on NEW
    new_only: int
    p_value: float  # one-sided: the chance of at least ``old_only`` of the discordant pairs if neither is worse


def paired_drop(old: list[bool], new: list[bool]) -> PairedTest:
    """Exact one-sided McNemar test on paired outcomes (True = the sample passes)."""
    from math import comb

    assert len(old) == len(new) and old, "paired outcomes of the same samples"
    old_only = sum(1 for o, n in zip(old, new) if o and not n)
    new_only = sum(1 for o, n in zip(old, new) if n and not o)
    discordant = old_only + new_only
    p = sum(comb(discordant, k) for k in range(old_only, discordant + 1)) / 2 ** discordant
    return PairedTest(n=len(old), old_rate=sum(old) / len(old), new_rate=sum(new) / len(new),
                      old_only=old_only, new_only=new_only, p_value=min(1.0, p))


def sample_rows(model: Any, tokenizer: Any, input_ids: Any, s: Sampling, max_new_tokens: int) -> Any:
    """``s.n`` seeded samples of one prompt, as ``generate(num_return_sequences=n)`` draws them.

    The prompt is the same in every sample, so its prefill runs once and its KV cache is
    repeated ``n`` times (``generate`` would run the prompt ``n`` times over: 8 samples of a
    36-token chat prompt cost 4.5 s instead of 1.6 s on a 2-core CPU in fp16, 6.1 s instead of
    2.8 s in NF4). The random stream is the one ``generate`` draws from after the seed, so the
    samples are the same ones; only the batch shape of the prompt's matmuls differs, which
    rounds a few far-tail logits differently (measured: the same 8 samples, in both adapter
    variants of the embedded model). A cache that cannot be repeated (no
    ``batch_repeat_interleave``) or a one-token prompt takes ``generate``'s own path.
    """
    import torch

    settings = dict(max_new_tokens=max_new_tokens, do_sample=True, temperature=s.temperature, top_p=s.top_p,
                    top_k=s.top_k or 0, num_beams=1, pad_token_id=tokenizer.pad_token_id)
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        cache = _prompt_cache(model, input_ids) if input_ids.shape[1] > 1 else {}
        torch.manual_seed(s.seed)
        if not cache:
            return model.generate(input_ids=input_ids, attention_mask=mask, num_return_sequences=s.n, **settings)
        next(iter(cache.values())).batch_repeat_interleave(s.n)
        return model.generate(input_ids=input_ids.repeat(s.n, 1), attention_mask=mask.repeat(s.n, 1),
                              **cache, **settings)


def _prompt_cache(model: Any, input_ids: Any) -> dict[str, Any]:
    """The KV cache of every prompt token but the last (``generate`` runs the last one itself), as
    the keyword ``generate`` takes it; empty where it cannot be repeated per sample."""
    from harness.observe.observation import cache_kwargs

    cache = cache_kwargs(model(input_ids=input_ids[:, :-1], use_cache=True))
    return cache if all(hasattr(c, "batch_repeat_interleave") for c in cache.values()) else {}
