"""What a greedy generation looked like, step by step, from the scores decoding actually used.

An ``Observation`` is the unit the comparison engine (``harness.judge.compare``)
judges: the chosen token of every step with its log-probability and the top-k
alternatives with theirs. Log-probabilities are the float32 log-softmax of the
*processed* scores (after ``repetition_penalty``, ``no_repeat_ngram_size`` and
the other logits processors the model's generation_config turns on), because
those are what picked the token: a margin taken from raw logits would describe
a decision decoding never made.

Goldens store an observation as one line per step (``to_trace``/``from_trace``):
``"<id> <logp> | <id> <logp> | ... # '<text>' '<text>' ..."``, the chosen token
first, then the other top-k tokens best first; the text after ``#`` is for the
reviewer and is never read back.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


Stop = Literal["eos", "length"]
DEFAULT_TOP_K = 5
LOGPROB_DECIMALS = 4

@dataclass(frozen=True)
class Step:
    """One generated step: the chosen token and the top-k of the processed distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]

    def logprob_of(self, token_id: int) -> float | None:
        """The log-probability of ``token_id`` at this step, where it is known (chosen or top-k)."""
        if token_id == self.token_id:
            return self.logprob
        return next((lp for tid, lp in self.top if tid == token_id), None)

    @property
    def best(self) -> tuple[int, float]:
        """The top token (the greedy choice of this distribution) and its log-probability."""
        return self.top[0] if self.top else (self.token_id, self.logprob)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.logprob) and not any(math.isnan(lp) for _, lp in self.top)


@dataclass(frozen=True)
class Observation:
    """A greedy generation, as recorded in a golden or observed live."""

    prompt_ids: tuple[int, ...]
    steps: tuple[Step, ...]
    stop: Stop

    @property
    def token_ids(self) -> tuple[int, ...]:
        return tuple(step.token_id for step in self.steps)


def step_from_scores(scores: Any, token_id: int, *, top_k: int = DEFAULT_TOP_K) -> Step:
    """A ``Step`` from one row of processed scores (any dtype; judged in float32)."""
    import torch

    logprobs = torch.log_softmax(scores.detach().float().cpu(), dim=-1)
    chosen = float(logprobs[token_id])
    if torch.isnan(logprobs).any():
        return Step(token_id=int(token_id), logprob=float("nan"), top=())
    values, indices = torch.topk(logprobs, k=min(top_k, logprobs.shape[-1]))
    top = tuple((int(i), float(v)) for i, v in zip(indices.tolist(), values.tolist()) if math.isfinite(v))
    return Step(token_id=int(token_id), logprob=chosen, top=top)


def eos_ids(model: Any) -> frozenset[int]:
    config = getattr(model, "generation_config", None)
    value = getattr(config, "eos_token_id", None)
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else [int(v) for v in value])


def cache_kwargs(out: Any) -> dict[str, Any]:
    """A forward pass's KV cache as the keyword to pass it back to ``forward`` or ``generate``:
    ``cache`` from transformers 5 on (``past_key_values`` is deprecated there), else
    ``past_key_values``; empty when the output holds none."""
    for name in ("cache", "past_key_values"):
        if name in out and out[name] is not None:
            return {name: out[name]}
    return {}


def generation_settings(model: Any) -> dict[str, Any]:
    """The model's generation settings that act under forced greedy decoding (``greedy_settings``)."""
    from transformers import GenerationConfig

    from harness.models.generation_settings import greedy_settings

    return greedy_settings(getattr(model, "generation_config", None) or GenerationConfig())


def observe_greedy(model: Any, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int, *,
                   top_k: int = DEFAULT_TOP_K, **generate_kwargs: Any) -> Observation:
    """Greedy decoding until eos or ``max_new_tokens``, with each step's processed distribution."""
    import torch

    input_ids = torch.tensor([list(prompt_ids)])
    return observe_greedy_batch(model, tokenizer, input_ids, torch.ones_like(input_ids), max_new_tokens,
                                top_k=top_k, **generate_kwargs)[0]


def observe_greedy_batch(model: Any, tokenizer: Any, input_ids: Any, attention_mask: Any, max_new_tokens: int,
                         *, top_k: int = DEFAULT_TOP_K, **generate_kwargs: Any) -> list[Observation]:
    """``observe_greedy`` for a (padded) batch: one observation per row, ended at its own eos."""
    from harness.observe.prompts import greedy_generate

    device = next(model.parameters()).device
    out = greedy_generate(model, tokenizer, input_ids.to(device), attention_mask.to(device), max_new_tokens,
                          return_dict_in_generate=True, output_scores=True, **generate_kwargs)
    stops = eos_ids(model)
    observations: list[Observation] = []
    for row in range(input_ids.shape[0]):
        new_ids = out.sequences[row, input_ids.shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(new_ids) if t in stops), len(new_ids))
        steps = tuple(step_from_scores(out.scores[i][row], new_ids[i], top_k=top_k) for i in range(end))
        prompt = tuple(int(t) for t, m in zip(input_ids[row].tolist(), attention_mask[row].tolist()) if m)
        stop: Stop = "eos" if end < len(new_ids) or (new_ids[:end] and new_ids[end - 1] in stops) else "length"
        observations.append(Observation(prompt_ids=prompt, steps=steps, stop=stop))
    return observations


def to_trace(observation: Observation, tokenizer: Any = None) -> list[str]:
    """One line per step: chosen token first, then the rest of the top-k; texts after ``#``."""
    lines: list[str] = []
    for step in observation.steps:
        entries = [(step.token_id, step.logprob)] + [(t, lp) for t, lp in step.top if t != step.token_id]
        numbers = " | ".join(f"{tid} {_fmt(lp)}" for tid, lp in entries)
        if tokenizer is not None:
            texts = " ".join(repr(tokenizer.decode([tid])) for tid, _ in entries)
            numbers += f" # {texts}"
        lines.append(numbers)
    return lines


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{LOGPROB_DECIMALS}f}"


class TraceError(ValueError):
    """A trace line that does not parse (hand-edited or truncated golden)."""


def from_trace(lines: Sequence[str], *, top_k: int) -> tuple[Step, ...]:
    """Steps back from ``to_trace`` lines; ``top_k`` tells whether the chosen token was in the top-k."""
    steps: list[Step] = []
    for index, line in enumerate(lines):
        if not isinstance(line, str):
            raise TraceError(f"step {index} is a {type(line).__name__}, not a trace line")
        numbers = line.split("#", 1)[0]
        entries: list[tuple[int, float]] = []
        for part in numbers.split("|"):
            fields = part.split()
            if len(fields) != 2:
                raise TraceError(f"step {index}: {part.strip()!r} is not '<token id> <log-prob>'")
            try:
                entries.append((int(fields[0]), float(fields[1])))
            except ValueError:
                raise TraceError(f"step {index}: {part.strip()!r} is not '<token id> <log-prob>'") from None
        chosen, rest = entries[0], entries[1:]
        if len(entries) > top_k:  # the chosen token was outside the top-k
            top = tuple(rest)
        else:
            top = tuple(sorted(entries, key=lambda e: -e[1] if not math.isnan(e[1]) else math.inf))
        steps.append(Step(token_id=chosen[0], logprob=chosen[1], top=top))
    return tuple(steps)

