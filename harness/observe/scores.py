"""The model's scores of a given greedy path: the one scorer every judge and noise measure uses.

Judging a golden needs the model's scores of the golden's own tokens, every step. Two ways to get
them, one home for each:

- forced through ``generate`` itself (``teacher_force``): every logits processor the model's
  generation settings turn on acts, with the same incremental KV cache as free decoding;
- one forward pass over prompt + path (``forward_scores``): the scores decoding would see where
  no processor acts, up to the KV cache's own rounding.

``path_scores`` picks between them; ``free_run_of`` rebuilds what free greedy decoding does with
such scores, so a path that scores as the golden need not be decoded again. ``top2_margin`` is a
step's lead over its runner-up: how far noise must move it before decoding flips.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.observe.observation import DEFAULT_TOP_K, Observation, Step, generation_settings, step_from_scores


@dataclass(frozen=True)
class ScoredPath:
    """A path scored by one model: per step the processed distribution's top-k and the golden token's score."""

    steps: tuple[Step, ...]
    scores: tuple[float, ...]  # the golden token's score (logit) per step: the dtype floor's magnitude


# -- forced through generate ----------------------------------------------------------------------
def teacher_force(model: Any, prompt_ids: Sequence[int], token_ids: Sequence[int], *,
                  top_k: int = DEFAULT_TOP_K, tokenizer: Any = None) -> tuple[Step, ...]:
    """Score a given token path with the model under test, through ``generate`` itself.

    Each step's distribution is taken after every logits processor ``generate``
    applies (a processor appended last records the processed scores, then
    forces the given token), so the forced path is scored exactly as free
    greedy decoding would have scored it, with the same incremental cache. A
    path that this model's stopping rule ends early gives fewer steps.
    """
    import torch

    if not token_ids:
        return ()
    device = next(model.parameters()).device
    input_ids = torch.tensor([list(prompt_ids)], device=device)
    pad = getattr(tokenizer, "pad_token_id", None)
    return teacher_force_batch(model, input_ids, torch.ones_like(input_ids), [token_ids], top_k=top_k,
                               pad_token_id=pad)[0]


def teacher_force_batch(model: Any, input_ids: Any, attention_mask: Any, paths: Sequence[Sequence[int]], *,
                        top_k: int = DEFAULT_TOP_K, pad_token_id: int | None = None) -> list[tuple[Step, ...]]:
    """``teacher_force`` for a (padded) batch: row ``r`` is forced along ``paths[r]``.

    A row whose path is shorter is forced to its pad token afterwards; its extra
    steps are not returned. Used to score a golden's path inside a padded batch.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    longest = max((len(p) for p in paths), default=0)
    if longest == 0:
        return [() for _ in paths]
    start = input_ids.shape[1]
    recorded: list[Any] = []
    filler = pad_token_id if pad_token_id is not None else 0

    class _Force(LogitsProcessor):
        def __call__(self, ids: Any, scores: Any) -> Any:
            step = ids.shape[1] - start
            recorded.append(scores.detach().float().cpu().clone())
            forced = torch.full_like(scores, float("-inf"))
            for row, path in enumerate(paths):
                forced[row, path[step] if step < len(path) else filler] = 0.0
            return forced

    with torch.inference_mode():
        model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=longest,
                       do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                       pad_token_id=pad_token_id, logits_processor=LogitsProcessorList([_Force()]))
    return [tuple(step_from_scores(recorded[i][row], t, top_k=top_k) for i, t in enumerate(path[: len(recorded)]))
            for row, path in enumerate(paths)]


# -- one forward pass ----------------------------------------------------------------------------
def forward_scores(model: Any, prompt_ids: Sequence[int], path: Sequence[int], *, top_k: int = DEFAULT_TOP_K,
                   pad: int | None = None, pad_token_id: int = 0) -> ScoredPath:
    """``path`` scored in one forward pass over prompt + path (no cache), optionally after ``pad`` left pads.

    Raw scores: no logits processor acts. With ``pad``, the row sits in a batch of two next to a
    row ``pad`` tokens longer (the prompt's first ``pad`` tokens repeated before it): a left-padded
    batch, positions taken from the mask.
    """
    import torch

    device = next(model.parameters()).device
    row = list(prompt_ids) + list(path)
    if pad:
        longer = list(prompt_ids[:pad]) + row
        ids = torch.tensor([[pad_token_id] * pad + row, longer], device=device)
        mask = torch.tensor([[0] * pad + [1] * len(row), [1] * len(longer)], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits[0]
        logits = logits[pad:]
    else:
        ids = torch.tensor([row], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    start = len(prompt_ids) - 1
    rows = [logits[start + i] for i in range(len(path))]
    return ScoredPath(steps=tuple(step_from_scores(r, t, top_k=top_k) for r, t in zip(rows, path)),
                  scores=tuple(float(r[t]) for r, t in zip(rows, path)))


# -- which view, and what decoding makes of it ---------------------------------------------------
def path_scores(model: Any, tokenizer: Any, prompt_ids: Sequence[int], path: Sequence[int], *,
                processors_act: bool | None = None) -> tuple[Step, ...]:
    """The model's scores of ``path`` as greedy decoding would see them (see the module docstring).

    ``processors_act``: whether a logits processor shapes them; None reads the model's own settings.
    """
    if not path:
        return ()
    if processors_act is None:
        processors_act = processors_act_in(model)
    if processors_act:
        return teacher_force(model, prompt_ids, path, tokenizer=tokenizer)
    return forward_scores(model, prompt_ids, path).steps


def processors_act(settings: dict[str, Any]) -> bool:
    """Whether a logits processor shapes greedy decoding's scores (anything besides the eos id is set)."""
    return any(name != "eos_token_id" for name in settings)


def processors_act_in(model: Any) -> bool:
    """``processors_act`` for ``model``'s own generation settings."""
    return processors_act(generation_settings(model))


def standing_for(scored: Sequence[Step], steps: int) -> tuple[Step, ...] | None:
    """Scores that can stand for a path of ``steps`` steps (one per step, all finite); None: decode instead."""
    scored = tuple(scored)
    return scored if len(scored) == steps and all(s.finite for s in scored) else None


def free_run_of(scored: Sequence[Step], golden: Observation, prompt_ids: Sequence[int]) -> Observation:
    """What free greedy decoding does with these scores: the golden's path until it prefers another token.

    Free decoding is forced decoding until its first flip, so where the scores of the golden's
    path are known, the free run up to and including its first divergence is too; after it, the
    engine judges the golden's remaining tokens with the same scores (teacher forcing). Scores
    that end before the golden's path (the model's stopping rule cut the forcing short) do not
    claim the golden's way of stopping.
    """
    steps: list[Step] = []
    for got, want in zip(scored, golden.steps):
        if got.best[0] != want.token_id:
            steps.append(Step(got.best[0], got.best[1], got.top))
            return Observation(prompt_ids=tuple(prompt_ids), steps=tuple(steps), stop="length")
        steps.append(got)
    stop = golden.stop if len(steps) == len(golden.steps) else "length"
    return Observation(prompt_ids=tuple(prompt_ids), steps=tuple(steps), stop=stop)


def top2_margin(step: Step) -> float:
    """The chosen token's lead over the best other token of its step (inf without a second token)."""
    other = next((lp for t, lp in step.top if t != step.token_id), None)
    return step.logprob - other if other is not None else math.inf
