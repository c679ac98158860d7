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

from harness.judge.compare import Verdict, compare
from harness.judge.path_noise import Move, moves
from harness.judge.tolerance import Tolerance
from harness.observe.observation import DEFAULT_TOP_K, Observation, Step, observe_greedy
from harness.observe.scores import forward_scores, free_run_of, teacher_force, teacher_force_batch, top2_margin

Scored = tuple[Step, ...]


@dataclass(frozen=True)
class Item:
    """One prompt to calibrate on: a greedy check of a suite."""

    name: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int


# -- observing ------------------------------------------------------------------------------
def reference_paths(model: Any, tokenizer: Any, items: Sequence[Item], *,
                    top_k: int = DEFAULT_TOP_K) -> list[Observation]:
    """Free greedy decoding of each item, as a golden records it."""
    return [observe_greedy(model, tokenizer, item.prompt_ids, item.max_new_tokens, top_k=top_k) for item in items]


def forced(model: Any, tokenizer: Any, items: Sequence[Item], paths: Sequence[Sequence[int]], *,
           top_k: int = DEFAULT_TOP_K) -> list[Scored]:
    """Each item's decoding forced along its reference path, one at a time (as rescoring does)."""
    return [teacher_force(model, item.prompt_ids, path, top_k=top_k, tokenizer=tokenizer)
            for item, path in zip(items, paths)]


def forced_batch(model: Any, tokenizer: Any, items: Sequence[Item], paths: Sequence[Sequence[int]], *,
                 top_k: int = DEFAULT_TOP_K) -> list[Scored]:
    """All items in one left-padded batch, each row forced along its own path (the padding check's setting)."""
    import torch

    device = next(model.parameters()).device
    width = max(len(item.prompt_ids) for item in items)
    finish = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else finish
    ids = torch.tensor([[pad] * (width - len(it.prompt_ids)) + list(it.prompt_ids) for it in items], device=device)
    mask = torch.tensor([[0] * (width - len(it.prompt_ids)) + [1] * len(it.prompt_ids) for it in items],
                        device=device)
    return teacher_force_batch(model, ids, mask, paths, top_k=top_k, pad_token_id=tokenizer.pad_token_id)


def score_single_pass(model: Any, items: Sequence[Item], paths: Sequence[Sequence[int]], *,
                      top_k: int = DEFAULT_TOP_K) -> list[Scored]:
    """Each path scored in one forward pass without a KV cache (raw scores: no logits processors)."""
    return [forward_scores(model, item.prompt_ids, path, top_k=top_k).steps for item, path in zip(items, paths)]


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
        for move in moves(ref, got):
            if not move.counted:
                noise.nonfinite += 1
                deltas.append(math.inf)
                continue
            deltas.append(move.dlogp)
            noise.max_gap_shift = max(noise.max_gap_shift, move.shift or 0.0)
            if move.flipped:
                flips += 1
                noise.flips.append(_flip(name, move))
        noise.items[name] = ItemNoise(len(deltas), sum(deltas) / len(deltas) if deltas else 0.0,
                                      max(deltas, default=0.0), flips)
    return noise


def _flip(item: str, move: Move) -> Flip:
    """A flipped step, with each run's preference for its own token."""
    ref, got = move.reference, move.got
    best = got.best[0]
    in_ref = ref.logprob_of(best)
    return Flip(item, move.index, ref.token_id, best,
                gap_reference=ref.logprob - in_ref if in_ref is not None else math.inf,
                gap_condition=got.best[1] - got.logprob)


def smallest_margins(names: Sequence[str], reference: Sequence[Scored]) -> dict[str, tuple[int, float]]:
    """Per item, the step whose top-2 margin is smallest: where any numeric change flips first."""
    out: dict[str, tuple[int, float]] = {}
    for name, ref in zip(names, reference):
        margins = [(i, top2_margin(s)) for i, s in enumerate(ref)]
        if margins:
            out[name] = min(margins, key=lambda m: m[1])
    return out


def judge(reference: Observation, observed: Scored, tol: Tolerance) -> Verdict:
    """The golden comparison's verdict on a model whose forced scores of the reference path are ``observed``.

    The free run is rebuilt from the forced scores (``free_run_of``); they are also what rescoring gives.
    """
    actual = free_run_of(observed, reference, reference.prompt_ids)
    return compare(reference, actual, tol, rescore=lambda _ids: tuple(observed))


# -- recommendation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Recommendation:
    """Tolerances for one variant: the observed noise times a safety factor, never below a floor."""

    mean_abs_dlogp: float
    max_abs_dlogp: float
    tie_gap: float
    observed: dict[str, float]

    max_margin_shift: float = 0.0

    def as_tolerance(self) -> dict[str, float]:
        return {"mean_abs_dlogp": self.mean_abs_dlogp, "max_abs_dlogp": self.max_abs_dlogp, "tie_gap": self.tie_gap,
                "max_margin_shift": self.max_margin_shift}


FLOORS = {"mean_abs_dlogp": 0.01, "max_abs_dlogp": 0.05, "tie_gap": 0.05, "max_margin_shift": 0.05}


def recommend(noises: Sequence[Noise], *, safety: float = 3.0, floors: dict[str, float] | None = None) -> Recommendation:
    """Tolerances that pass every benign condition measured, with room for the ones not measured.

    ``max_margin_shift`` bounds how far the margin between a golden token and its runner-up may move.
    The tie tolerance covers both the widest flip seen and the largest change of a top-2 margin:
    a flip happens where a margin is smaller than that change, so flips not seen in these few
    prompts are still covered.
    """
    floors = {**FLOORS, **(floors or {})}
    finite = [n for n in noises if not n.nonfinite]
    observed = {
        "mean_abs_dlogp": max((n.mean_abs_dlogp for n in finite), default=0.0),
        "max_abs_dlogp": max((n.max_abs_dlogp for n in finite), default=0.0),
        "tie_gap": max((max(n.max_gap_shift, finite_or_zero(n.max_flip_gap)) for n in finite), default=0.0),
        "max_margin_shift": max((n.max_gap_shift for n in finite), default=0.0),
    }
    values = {k: _round_up(max(floors[k], safety * v)) for k, v in observed.items()}
    return Recommendation(observed=observed, **values)


def finite_or_zero(value: float) -> float:
    """A measured spread where it is finite; 0 where a NaN or inf run made it meaningless (named elsewhere)."""
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
