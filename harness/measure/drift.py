"""Drift, measured: how far one variant's next-token distributions sit from a reference's.

The ``drift`` check judges these figures against budgets; ``harness-bench`` tabulates them
and ``harness-diff`` reports them for OLD against NEW. All three measure the same way, here:
the reference's greedy continuation of each prompt, then KL(reference || variant), top-1
agreement and the first greedy divergence over prompt + continuation, teacher-forced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.models.variants import VariantSpec
from harness.observe.prompts import greedy_generate


def default_reference(variant: VariantSpec) -> VariantSpec:
    """The variant's base: what an adapter or a quantization is measured against."""
    if variant.lora:
        return variant.base
    return VariantSpec("fp16", False)


@dataclass(frozen=True)
class DriftReference:
    """The reference's token paths and log-probabilities (float32, CPU)."""

    variant: str
    sequences: tuple[tuple[int, ...], ...]
    prompt_lengths: tuple[int, ...]
    logprobs: tuple[Any, ...]


@dataclass(frozen=True)
class Divergence:
    prompt: int
    new_token: int
    expected: int
    got: int


@dataclass(frozen=True)
class DriftResult:
    reference: str
    variant: str
    mean_kl: float
    max_kl: float
    top1_agreement: float
    positions: int
    first_divergence: Divergence | None
    diverged_prompts: int
    new_tokens: tuple[int, ...]

    def figures(self) -> dict[str, Any]:
        first = self.first_divergence
        return {
            "drift_reference": self.reference,
            "mean_kl": round(self.mean_kl, 6),
            "max_kl": round(self.max_kl, 6),
            "top1_agreement": round(self.top1_agreement, 4),
            "positions": self.positions,
            "first_divergence": None if first is None else first.new_token,
            "diverged_prompts": self.diverged_prompts,
        }


def token_logprobs(model: Any, sequence: tuple[int, ...]) -> Any:
    """Log-probabilities (float32, CPU) of every next token over ``sequence``, one forward pass."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor([sequence], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _greedy_continuation(model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The new ids of greedy decoding until eos or ``max_new_tokens``: the path both sides are scored on."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([prompt_ids], device=device)
    out = greedy_generate(model, tokenizer, input_ids, torch.ones_like(input_ids), max_new_tokens,
                          return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, len(prompt_ids):].tolist()


def reference_observation(model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int, *,
                          variant: str) -> DriftReference:
    """Greedy continuations of the reference, and its log-probs over prompt + continuation."""
    sequences: list[tuple[int, ...]] = []
    logprobs: list[Any] = []
    for ids in prompts:
        new_ids = _greedy_continuation(model, tokenizer, ids, new_tokens)
        sequence = tuple(ids) + tuple(new_ids)
        sequences.append(sequence)
        logprobs.append(token_logprobs(model, sequence))
    return DriftReference(variant=variant, sequences=tuple(sequences),
                          prompt_lengths=tuple(len(p) for p in prompts), logprobs=tuple(logprobs))


def compare_to_reference(model: Any, reference: DriftReference, *, variant: str) -> DriftResult:
    """KL(reference || variant) at every position, top-1 agreement and the first greedy divergence."""
    import torch

    kls: list[Any] = []
    agree = 0
    first: Divergence | None = None
    diverged = 0
    for index, (sequence, n_prompt, ref_lp) in enumerate(
            zip(reference.sequences, reference.prompt_lengths, reference.logprobs)):
        lp = token_logprobs(model, sequence)
        kl = (ref_lp.exp() * (ref_lp - lp)).sum(dim=-1).clamp_min(0).double()
        kls.append(kl)
        top = lp.argmax(dim=-1)
        agree += int((top == ref_lp.argmax(dim=-1)).sum())
        for j, token in enumerate(sequence[n_prompt:]):
            got = int(top[n_prompt - 1 + j])
            if got != token:
                diverged += 1
                if first is None or j < first.new_token:
                    first = Divergence(prompt=index, new_token=j, expected=token, got=got)
                break
    every = torch.cat(kls)
    return DriftResult(
        reference=reference.variant, variant=variant, mean_kl=float(every.mean()), max_kl=float(every.max()),
        top1_agreement=agree / every.numel(), positions=int(every.numel()), first_divergence=first,
        diverged_prompts=diverged,
        new_tokens=tuple(len(s) - n for s, n in zip(reference.sequences, reference.prompt_lengths)),
    )
