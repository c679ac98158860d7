"""How far a model's greedy log-probabilities move when only the numerics change.

Every condition (another attention kernel, thread count or SIMD level, a padded batch, no KV
cache) scores the *reference's own token path*: decoding is forced along it, so a flip does not
end the comparison and every step of every prompt is one sample of the noise. The statistics
are the ones the golden comparison judges: |Δ log p| of the chosen tokens (per step and the
mean per prompt) and, where the best token changed, how close the two candidates were.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

TOP_K = 5


@dataclass(frozen=True)
class Item:
    """One prompt to calibrate on: a greedy check of a suite."""

    name: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


@dataclass(frozen=True)
class Step:
    """One decoding step: the chosen (or forced) token's log-prob and the top-k, float32."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]

    def logprob_of(self, token_id: int) -> float | None:
        return next((lp for tid, lp in self.top if tid == token_id), None)

    def runner_up(self, token_id: int) -> float:
        """The best log-prob among tokens other than ``token_id`` (its margin's other side)."""
        return next((lp for tid, lp in self.top if tid != token_id), -math.inf)


Scored = tuple[Step, ...]


# -- observing ------------------------------------------------------------------------------
def _step(logprobs: Any, token_id: int, top_k: int) -> Step:
    values, ids = logprobs.topk(top_k)
    return Step(int(token_id), float(logprobs[token_id]),
                tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())))


def _recorder(paths: Sequence[Sequence[int]] | None, rows: int, top_k: int, eos: int | None) -> Any:
    """A logits processor placed last: it records the scores decoding uses, then forces the path."""
    import torch
    from transformers import LogitsProcessor

    class Recorder(LogitsProcessor):
        def __init__(self) -> None:
            self.steps: list[list[Step]] = [[] for _ in range(rows)]
            self.index = 0

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            logprobs = torch.log_softmax(scores.float(), dim=-1).cpu()
            forced = torch.full_like(scores, -math.inf) if paths is not None else scores
            for row in range(rows):
                if paths is None:
                    self.steps[row].append(_step(logprobs[row], int(logprobs[row].argmax()), top_k))
                elif self.index < len(paths[row]):
                    token = paths[row][self.index]
                    self.steps[row].append(_step(logprobs[row], token, top_k))
                    forced[row, token] = 0.0
                else:  # this row's path ended: finish it
                    forced[row, eos if eos is not None else 0] = 0.0
            self.index += 1
            return forced

    return Recorder()


def observe(model: Any, tokenizer: Any, items: Sequence[Item], paths: Sequence[Sequence[int]] | None = None,
            *, batch: bool = False, top_k: int = TOP_K) -> list[Scored]:
    """Greedy decoding of each item (``paths`` None: the reference), or forced along ``paths``.

    ``batch`` runs all items as one left-padded batch, as the padding check does.
    """
    groups = [list(range(len(items)))] if batch else [[i] for i in range(len(items))]
    out: list[Scored] = [()] * len(items)
    for group in groups:
        for index, steps in zip(group, _observe_rows(model, tokenizer, [items[i] for i in group],
                                                     None if paths is None else [paths[i] for i in group], top_k)):
            out[index] = steps
    return out


def _observe_rows(model: Any, tokenizer: Any, items: list[Item], paths: list[Sequence[int]] | None,
                  top_k: int) -> list[Scored]:
    import torch
    from transformers import LogitsProcessorList

    from harness.checks.prompts import greedy_generate

    device = next(model.parameters()).device
    width = max(len(item.prompt_ids) for item in items)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(it.prompt_ids)) + list(it.prompt_ids) for it in items], device=device)
    mask = torch.tensor([[0] * (width - len(it.prompt_ids)) + [1] * len(it.prompt_ids) for it in items], device=device)
    new_tokens = max(len(p) for p in paths) if paths is not None else max(it.max_new_tokens for it in items)
    recorder = _recorder(paths, len(items), top_k, tokenizer.eos_token_id)
    greedy_generate(model, tokenizer, ids, mask, new_tokens, logits_processor=LogitsProcessorList([recorder]))
    steps = [tuple(row) for row in recorder.steps]
    if paths is None:  # a row stops at its first eos: later steps are padding
        eos = _eos_ids(model, tokenizer)
        steps = [_until_eos(row, eos) for row in steps]
    return steps


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(value if isinstance(value, list) else [value] if value is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _until_eos(steps: Scored, eos: set[int]) -> Scored:
    end = next((i + 1 for i, s in enumerate(steps) if s.token_id in eos), len(steps))
    return steps[:end]


def score_single_pass(model: Any, items: Sequence[Item], paths: Sequence[Sequence[int]], *,
                      top_k: int = TOP_K) -> list[Scored]:
    """Each path scored in one forward pass without a KV cache: how rescoring after a near-tie works."""
    import torch

    device = next(model.parameters()).device
    out: list[Scored] = []
    for item, path in zip(items, paths):
        ids = torch.tensor([list(item.prompt_ids) + list(path)], device=device)
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
        start = len(item.prompt_ids) - 1
        logprobs = torch.log_softmax(logits[start:start + len(path)], dim=-1).cpu()
        out.append(tuple(_step(logprobs[i], token, top_k) for i, token in enumerate(path)))
    return out


# -- statistics -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flip:
    """A step where the condition preferred another token than the reference."""

    item: str
    step: int
    expected: int
    got: int
    gap_reference: float   # reference: log p(expected) - log p(got); inf when got was not in its top-k
    gap_condition: float   # condition: log p(got) - log p(expected)

    @property
    def gap(self) -> float:
        return max(self.gap_reference, self.gap_condition)


@dataclass
class ItemNoise:
    steps: int
    mean_abs_dlogp: float
    max_abs_dlogp: float
    flips: int


@dataclass
class Noise:
    """One condition against the reference, over all items of one variant."""

    condition: str
    items: dict[str, ItemNoise] = field(default_factory=dict)
    flips: list[Flip] = field(default_factory=list)
    max_gap_shift: float = 0.0     # largest change of a step's top-2 margin
    nonfinite: int = 0             # steps whose log-prob was NaN or inf

    @property
    def steps(self) -> int:
        return sum(i.steps for i in self.items.values())

    @property
    def mean_abs_dlogp(self) -> float:
        """The largest per-item mean: what a per-item mean tolerance must cover."""
        return max((i.mean_abs_dlogp for i in self.items.values()), default=0.0)

    @property
    def max_abs_dlogp(self) -> float:
        return max((i.max_abs_dlogp for i in self.items.values()), default=0.0)

    @property
    def max_flip_gap(self) -> float:
        """The widest margin (in both runs) at which a flip happened; 0 without flips."""
        return max((f.gap for f in self.flips), default=0.0)

    @property
    def min_flip_gap(self) -> float | None:
        return min((f.gap for f in self.flips), default=None)


def measure(condition: str, names: Sequence[str], reference: Sequence[Scored], observed: Sequence[Scored]) -> Noise:
    """Compare a condition's scores of the reference paths with the reference's own."""
    noise = Noise(condition)
    for name, ref, got in zip(names, reference, observed):
        deltas: list[float] = []
        flips = 0
        for index, (r, g) in enumerate(zip(ref, got)):
            if not math.isfinite(g.logprob):
                noise.nonfinite += 1
                deltas.append(math.inf)
                continue
            deltas.append(abs(g.logprob - r.logprob))
            noise.max_gap_shift = max(noise.max_gap_shift,
                                      abs((r.logprob - r.runner_up(r.token_id)) - (g.logprob - g.runner_up(r.token_id))))
            best = g.top[0][0]
            if best != r.token_id:
                flips += 1
                in_ref = r.logprob_of(best)
                noise.flips.append(Flip(name, index, r.token_id, best,
                                        gap_reference=r.logprob - in_ref if in_ref is not None else math.inf,
                                        gap_condition=g.top[0][1] - g.logprob))
        noise.items[name] = ItemNoise(len(deltas), sum(deltas) / len(deltas) if deltas else 0.0,
                                      max(deltas, default=0.0), flips)
    return noise


def smallest_margins(names: Sequence[str], reference: Sequence[Scored]) -> dict[str, tuple[int, float]]:
    """Per item, the step whose top-2 margin is smallest: where any numeric change flips first."""
    out: dict[str, tuple[int, float]] = {}
    for name, ref in zip(names, reference):
        margins = [(i, s.logprob - s.runner_up(s.token_id)) for i, s in enumerate(ref)]
        if margins:
            out[name] = min(margins, key=lambda m: m[1])
    return out


# -- recommendation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    """Tolerances for one variant: the observed noise times a safety factor, never below a floor."""

    mean_abs_dlogp: float
    max_abs_dlogp: float
    tie_gap: float
    observed: dict[str, float]

    def as_tolerance(self) -> dict[str, float]:
        return {"mean_abs_dlogp": self.mean_abs_dlogp, "max_abs_dlogp": self.max_abs_dlogp, "tie_gap": self.tie_gap}


FLOORS = {"mean_abs_dlogp": 0.01, "max_abs_dlogp": 0.05, "tie_gap": 0.05}


def recommend(noises: Sequence[Noise], *, safety: float = 3.0, floors: dict[str, float] | None = None) -> Recommendation:
    """Tolerances that pass every benign condition measured, with room for the ones not measured.

    The tie tolerance covers both the widest flip seen and the largest change of a top-2 margin:
    a flip happens where a margin is smaller than that change, so flips not seen in these few
    prompts are still covered.
    """
    floors = {**FLOORS, **(floors or {})}
    finite = [n for n in noises if not n.nonfinite]
    observed = {
        "mean_abs_dlogp": max((n.mean_abs_dlogp for n in finite), default=0.0),
        "max_abs_dlogp": max((n.max_abs_dlogp for n in finite), default=0.0),
        "tie_gap": max((max(n.max_gap_shift, _finite_or_zero(n.max_flip_gap)) for n in finite), default=0.0),
    }
    values = {k: _round_up(max(floors[k], safety * v)) for k, v in observed.items()}
    return Recommendation(observed=observed, **values)


def _finite_or_zero(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _round_up(value: float) -> float:
    """Two significant digits, rounded up: tolerances a reviewer can read."""
    if value <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(value)) - 1)
    return round(math.ceil(value / scale - 1e-9) * scale, 10)


# -- serialization (subprocess workers) -------------------------------------------------------
def paths_to_json(paths: Sequence[Scored]) -> list[list[list[Any]]]:
    return [[[s.token_id, s.logprob, [list(t) for t in s.top]] for s in path] for path in paths]


def paths_from_json(data: list[list[list[Any]]]) -> list[Scored]:
    return [tuple(Step(int(t), float(lp), tuple((int(i), float(v)) for i, v in top)) for t, lp, top in path)
            for path in data]
