"""The one comparison engine: are two observations the same behaviour, up to numerical noise?

Kernels, thread counts, SIMD levels and library versions move log-probabilities by a small,
measurable amount. What a comparison forgives comes from ``harness.judge.allowance``: per step from a
golden's own recorded noise, or flat from a ``Tolerance`` (defaults, a suite's override, two
live runs). ``compare`` judges two greedy generations and ``compare_distributions`` judges full
next-token rows (padding, batch). Both return a ``Verdict`` that says why it failed with
log-prob evidence, reports every near-tie it accepted (never silent), and never lets NaN or inf
pass.

Rules of ``compare``:
- every step is judged on the golden's token: its log-prob within the step's allowance, the
  mean over the path within the mean bound, and the margin between the golden token and its
  runner-up moved by no more than the step's margin allowance (confident tokens hide drift in
  their own log-prob);
- a flip (this run prefers another token) passes only as a near-tie: both tokens in each
  other's top-k, the margin between them moved within the step's margin allowance (which only
  a step the golden recorded as fragile can satisfy), and no more flips in one golden than its
  recorded noise explains (``Allowance.flip_probabilities``); after the first, the golden's
  remaining tokens are scored with the model under test (``rescore``, teacher forcing) and
  judged the same way;
- a sequence that stops earlier or later than the golden diverges at that step.

It is over 400 lines because ``compare`` and ``compare_distributions`` share one ``_Judged``
accumulator and the same reason writers (tolerance, margin shift, flip budget), so splitting
them would export those private helpers across modules; the verdict and message types
(``Verdict``, ``AcceptedTie``, ``Sides``) are small and used with the engine. What did separate,
the tolerance model and the allowance, already lives in ``tolerance.py`` and ``allowance.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.judge.allowance import FLIP_ALPHA, Allowance, as_allowance, flat_allowance, flip_budget
from harness.judge.tolerance import ROUNDING, Tolerance
from harness.observe.observation import DEFAULT_TOP_K, Observation, Step
from harness.observe.scores import top2_margin

Rescore = Callable[[list[int]], tuple[Step, ...]]


@dataclass(frozen=True)
class Sides:
    """How messages name the two observations: a golden and this run, or OLD and NEW in reference mode."""

    expected: str = "the golden"
    actual: str = "this run"
    expected_short: str = "golden"
    actual_short: str = "this run"

    @property
    def expected_of(self) -> str:
        return f"{self.expected}'s"

    @property
    def actual_of(self) -> str:
        return f"{self.actual}'s"


GOLDEN_SIDES = Sides()


def sides(expected: str, actual: str) -> Sides:
    """Two runs of the same model compared by a consistency check, each named by how it ran
    ("no-cache" -> "the no-cache run"): neither is a golden."""
    return Sides(expected=f"the {expected} run", actual=f"the {actual} run", expected_short=expected,
                 actual_short=actual)


@dataclass(frozen=True)
class AcceptedTie:
    """A flip accepted as numerical noise: reported, never silent."""

    step: int
    expected_id: int
    got_id: int
    gap_expected: float
    gap_actual: float
    where: str = ""  # "" (free run), "teacher-forced", or a row label
    bound: float | None = None  # the step's margin allowance the flip was judged against

    @property
    def gap(self) -> float:
        return max(self.gap_expected, self.gap_actual)

    def describe(self, subject: str = "", sides: Sides = GOLDEN_SIDES) -> str:
        at = f"step {self.step}" if not self.where or self.where == "teacher-forced" else self.where
        of = f" of {subject}" if subject else ""
        forced = " (teacher-forced)" if self.where == "teacher-forced" else ""
        within = (f"; margin moved {self.gap_expected + self.gap_actual:.3g}, within the step's allowance "
                  f"{self.bound:.3g}") if self.bound is not None else ""
        return (f"accepted near-tie at {at}{of}{forced}, gap {self.gap:.3g} ({sides.expected_short} "
                f"{self.gap_expected:.3g}, {sides.actual_short} {self.gap_actual:.3g}){within}: "
                f"token#{self.expected_id} vs token#{self.got_id}")


_TOKEN = re.compile(r"token#(-?\d+)")


@dataclass(frozen=True)
class Verdict:
    ok: bool
    accepted_ties: tuple[AcceptedTie, ...] = ()
    reasons: tuple[str, ...] = ()
    stats: dict[str, float] = field(default_factory=dict)

    def explain(self, tokenizer: Any = None, sides: Sides = GOLDEN_SIDES) -> str:
        """The reasons (and accepted ties), with token ids rendered as text where a tokenizer is given."""
        lines = list(self.reasons) + [t.describe(sides=sides) for t in self.accepted_ties] + [self.summary()]
        return render_tokens("\n".join(line for line in lines if line), tokenizer)

    def summary(self) -> str:
        if not self.stats.get("steps_compared"):
            return ""
        return (f"mean |Δ log p| {self.stats['mean_abs_dlogp']:.3g}, max {self.stats['max_abs_dlogp']:.3g} "
                f"over {int(self.stats['steps_compared'])} steps")


def render_tokens(text: str, tokenizer: Any = None) -> str:
    """``token#ID`` markers as a reviewer reads them: ``' Paris' (id 7042)``."""
    def one(match: re.Match[str]) -> str:
        token = int(match.group(1))
        if tokenizer is None:
            return f"id {token}"
        try:
            return f"{tokenizer.decode([token])!r} (id {token})"
        except Exception:  # noqa: BLE001 - an id the tokenizer does not know still gets shown
            return f"id {token}"

    return _TOKEN.sub(one, text)


def _nonfinite_steps(steps: Sequence[Step], who: str, offset: int = 0) -> list[str]:
    found: list[str] = []
    for index, step in enumerate(steps):
        if math.isnan(step.logprob) or any(math.isnan(lp) for _, lp in step.top):
            found.append(f"{who} has NaN log-probabilities at step {index + offset}: the model produced NaN "
                         "scores (overflow in fp16, a broken kernel or mask); NaN never passes")
        elif math.isinf(step.logprob):
            found.append(f"{who} has an infinite log-probability ({step.logprob}) for its token at step "
                         f"{index + offset}: the scores that decoding used are not finite; inf never passes")
    return found


def tie_gaps(expected: Step, actual: Step) -> tuple[float, float] | None:
    """Each run's preference for its own token over the other's, or None where either is outside the other's top-k."""
    exp_of_act = expected.logprob_of(actual.token_id)
    act_of_exp = actual.logprob_of(expected.token_id)
    if exp_of_act is None or act_of_exp is None:
        return None
    return expected.logprob - exp_of_act, actual.logprob - act_of_exp


def _divergence(step: int, expected: Step, actual: Step, gaps: tuple[float, float] | None, why: str,
                allowance: Allowance, *, forced: bool = False, sides: Sides = GOLDEN_SIDES) -> str:
    if forced:
        head = (f"teacher-forcing {sides.expected_of} tokens after an accepted near-tie, at new token {step} this "
                f"model prefers token#{actual.token_id} (log p {actual.logprob:.3f}) to {sides.expected_of} "
                f"token#{expected.token_id} ({sides.expected_short} log p {expected.logprob:.3f})")
    else:
        head = (f"greedy output diverges at new token {step}: expected token#{expected.token_id} (log p "
                f"{expected.logprob:.3f} in {sides.expected}), got token#{actual.token_id} (log p "
                f"{actual.logprob:.3f})")
    if gaps is None:
        missing = sides.actual_of if actual.logprob_of(expected.token_id) is None else sides.expected_of
        k = max(len(expected.top), len(actual.top))
        return head + f"; the other token is not in {missing} top-{k}: not a near-tie, a real change"
    return (head + f"; log-prob gap {gaps[0]:.3f} in {sides.expected} and {gaps[1]:.3f} in {sides.actual}: "
            f"{why}{allowance.describe()}: not a near-tie, a real change")


def compare(expected: Observation, actual: Observation, tol: Tolerance | Allowance, *,
            rescore: Rescore | None = None, sides: Sides = GOLDEN_SIDES) -> Verdict:
    """Judge ``actual`` against ``expected`` (the golden) under ``tol``; see the module docstring.

    ``tol`` is a golden's per-step ``Allowance``, or a flat ``Tolerance`` (the same bound at every
    step). ``sides`` names the two observations in the reasons (a golden file, or a live reference run).
    """
    allowance = as_allowance(tol, len(expected.steps))
    reasons = _nonfinite_steps(expected.steps, sides.expected) + _nonfinite_steps(actual.steps, sides.actual)
    if reasons:
        return Verdict(ok=False, reasons=tuple(reasons), stats={"steps_compared": 0})
    judged = _Judged()
    exp_ids, act_ids = expected.token_ids, actual.token_ids
    shared = min(len(exp_ids), len(act_ids))
    first = next((i for i in range(shared) if exp_ids[i] != act_ids[i]), None)
    for i in range(shared if first is None else first):
        judged.step(i, expected.steps[i], actual.steps[i])
    unjudged = 0
    if first is not None:
        e, a = expected.steps[first], actual.steps[first]
        refusal = judged.flip(first, e, a, allowance)
        if refusal is not None:
            reasons.append(_divergence(first, e, a, tie_gaps(e, a), refusal, allowance, sides=sides))
        elif rescore is None:
            unjudged = len(exp_ids) - first - 1
        else:
            reasons += _judge_forced(expected, rescore(list(exp_ids)), first, allowance, judged, sides)
    elif len(exp_ids) != len(act_ids):
        reasons.append(_stop_divergence(expected, actual, shared, sides))
    elif expected.stop != actual.stop:
        reasons.append(f"the same {shared} tokens, but {sides.expected} ended by {expected.stop!r} and "
                       f"{sides.actual} by {actual.stop!r}: the stopping rule (eos_token_id or max_new_tokens) "
                       "changed")
    stats = judged.stats()
    stats.update(first_divergence=float(-1 if first is None else first), steps_unjudged=float(unjudged))
    reasons += _budget_reasons(expected, judged.ties, allowance, stats)
    reasons += judged.reasons(allowance, stats)
    return Verdict(ok=not reasons, accepted_ties=tuple(judged.ties), reasons=tuple(reasons), stats=stats)


@dataclass
class _Judged:
    """What one comparison measured, step by step: |Δ log p|, margin shifts, accepted flips."""

    deltas: list[tuple[int, float]] = field(default_factory=list)
    shifts: list[tuple[int, float]] = field(default_factory=list)
    ties: list[AcceptedTie] = field(default_factory=list)

    def step(self, index: int, expected: Step, actual: Step) -> None:
        """A step where both runs chose the golden's token."""
        self.deltas.append((index, abs(expected.logprob - actual.logprob)))
        shift = margin_shift(expected, actual)
        if shift is not None:
            self.shifts.append((index, shift))

    def flip(self, index: int, expected: Step, actual: Step, allowance: Allowance, where: str = "") -> str | None:
        """A step where ``actual`` prefers another token: accepted as a near-tie (None), or why not."""
        gaps = tie_gaps(expected, actual)
        if gaps is None:
            return "outside top-k"
        refusal = allowance.flip_refusal(index, *gaps)
        if refusal is None:
            self.ties.append(AcceptedTie(index, expected.token_id, actual.token_id, gaps[0], gaps[1], where=where,
                                         bound=allowance.margin_bound(index)))
            mine = actual.logprob_of(expected.token_id)
            if mine is not None:
                self.deltas.append((index, abs(expected.logprob - mine)))
        return refusal

    def stats(self) -> dict[str, float]:
        stats = _stats(self.deltas)
        stats["accepted_ties"] = float(len(self.ties))
        stats["max_margin_shift"] = max((s for _, s in self.shifts), default=0.0)
        return stats

    def reasons(self, allowance: Allowance, stats: dict[str, float]) -> list[str]:
        return _tolerance_reasons(stats, self.deltas, allowance) + _shift_reasons(self.shifts, allowance, "step")


def margin_shift(expected: Step, actual: Step) -> float | None:
    """How much the margin between the expected token and the expected runner-up moved.

    The chosen token's log-prob barely moves where the model is confident, even
    when its logits move a lot; the margin to the runner-up does not hide that.
    Where the runner-up fell out of this run's top-k, the shift is at least the
    distance to the last top-k entry (a lower bound, never an overstatement).
    """
    runner = next(((t, lp) for t, lp in expected.top if t != expected.token_id), None)
    mine = actual.logprob_of(expected.token_id)
    if runner is None or not actual.top or mine is None:
        return None
    margin = expected.logprob - runner[1]
    got = actual.logprob_of(runner[0])
    now = mine - (got if got is not None else actual.top[-1][1])
    return abs(now - margin) if got is not None else max(0.0, now - margin)


def _shift_reasons(shifts: list[tuple[int, float]], allowance: Allowance, unit: str,
                   names: Sequence[str] | None = None) -> list[str]:
    reasons = _margin_mean_reasons(shifts, allowance)
    over = [(s / max(allowance.margin_bound(i), 1e-12), i, s) for i, s in shifts if allowance.margin_exceeded(i, s)]
    if not over:
        return reasons
    _, at, worst = max(over)
    where = names[at] if names is not None else f"{unit} {at}"
    more = f" (and {len(over) - 1} more {unit}s)" if len(over) > 1 else ""
    return reasons + [f"the margin between the chosen token and its runner-up moved by {worst:.3g} at {where} > "
            f"allowance {allowance.margin_bound(at):.3g}{allowance.describe()}{more}: a confident token's "
            "log-prob hides it, the distribution under it moved beyond noise"]


def _margin_mean_reasons(shifts: list[tuple[int, float]], allowance: Allowance) -> list[str]:
    bound = allowance.margin_mean_bound([i for i, _ in shifts])
    if bound is None:
        return []
    mean = sum(s for _, s in shifts) / len(shifts)
    if mean <= bound + ROUNDING:
        return []
    return [f"the margins between the chosen tokens and their runners-up moved by {mean:.3g} on average over "
            f"{len(shifts)} steps > {bound:.3g}{allowance.describe()}: each step within its allowance, together a "
            "consistent change of the distributions, not noise"]


def _budget_reasons(expected: Observation, ties: Sequence[AcceptedTie], allowance: Allowance,
                    stats: dict[str, float]) -> list[str]:
    """More accepted flips than the golden's noise explains: each may look like noise, together they are not."""
    probabilities = allowance.flip_probabilities([top2_margin(s) for s in expected.steps])
    budget = flip_budget(probabilities)
    stats.update(flip_budget=float(budget), expected_flips=sum(probabilities))
    if len(ties) <= budget:
        return []
    return [f"{len(ties)} near-ties accepted in one golden (steps {', '.join(str(t.step) for t in ties)}), more "
            f"than its noise explains: {sum(probabilities):.2g} flips expected, at most {budget} at 1 in "
            f"{round(1 / FLIP_ALPHA)}{allowance.describe()}; each flip alone is within noise, together they are a "
            "changed decision rule"]


def _stop_divergence(expected: Observation, actual: Observation, at: int, sides: Sides = GOLDEN_SIDES) -> str:
    def ended(obs: Observation) -> str:
        return f"ended by {obs.stop!r} after {len(obs.steps)} tokens"

    side = "earlier" if len(actual.steps) < len(expected.steps) else "later"
    return (f"{sides.actual} stops {side} than {sides.expected}: the first {at} tokens are identical, then "
            f"{sides.expected} {ended(expected)} and {sides.actual} {ended(actual)}; a divergence at step {at} "
            "(the stopping rule, eos_token_id or max_new_tokens changed), never a pass by truncation")


def _judge_forced(expected: Observation, forced: tuple[Step, ...], first: int, allowance: Allowance,
                  judged: _Judged, sides: Sides = GOLDEN_SIDES) -> list[str]:
    """The golden's tokens after an accepted flip, scored by the model under test."""
    reasons = _nonfinite_steps(forced[first + 1:], f"{sides.actual} (teacher-forced on {sides.expected_of} path)",
                               first + 1)
    if reasons:
        return reasons
    if len(forced) < len(expected.steps):
        return [f"teacher-forcing {sides.expected_of} tokens after the near-tie at step {first}: this model stops "
                f"after {len(forced)} of {sides.expected_of} {len(expected.steps)} tokens (its stopping rule "
                "changed)"]
    for i in range(first + 1, len(expected.steps)):
        e, f = expected.steps[i], forced[i]
        best_id, best_lp = f.best
        if best_id == e.token_id:
            judged.step(i, e, f)
            continue
        preferred = Step(token_id=best_id, logprob=best_lp, top=f.top)
        refusal = judged.flip(i, e, preferred, allowance, where="teacher-forced")
        if refusal is not None:
            reasons.append(_divergence(i, e, preferred, tie_gaps(e, preferred), refusal, allowance, forced=True,
                                       sides=sides))
            break
    return reasons


def _stats(deltas: list[tuple[int, float]]) -> dict[str, float]:
    if not deltas:
        return {"steps_compared": 0.0, "mean_abs_dlogp": 0.0, "max_abs_dlogp": 0.0, "max_at_step": -1.0}
    at, worst = max(deltas, key=lambda d: d[1])
    return {"steps_compared": float(len(deltas)), "mean_abs_dlogp": sum(d for _, d in deltas) / len(deltas),
            "max_abs_dlogp": worst, "max_at_step": float(at)}


def _tolerance_reasons(stats: dict[str, float], deltas: list[tuple[int, float]], allowance: Allowance) -> list[str]:
    reasons: list[str] = []
    n = int(stats["steps_compared"])
    if not n:
        return reasons
    mean_bound = allowance.mean_bound([i for i, _ in deltas])
    stats["mean_bound"] = mean_bound
    if not stats["mean_abs_dlogp"] <= mean_bound + ROUNDING:
        reasons.append(
            f"mean |Δ log p| {stats['mean_abs_dlogp']:.3g} over {n} steps > tolerance {mean_bound:.3g}"
            f"{allowance.describe()}: the chosen tokens' probabilities moved beyond numerical noise"
        )
    over = [(d / max(allowance.step_bound(i), 1e-12), i, d) for i, d in deltas if allowance.step_exceeded(i, d)]
    if over:
        _, at, worst = max(over)
        more = f" (and {len(over) - 1} more steps)" if len(over) > 1 else ""
        reasons.append(f"|Δ log p| {worst:.3g} at step {at} > per-step tolerance {allowance.step_bound(at):.3g}"
                       f"{allowance.describe()}{more}")
    return reasons


def compare_distributions(ref_logprobs: Any, got_logprobs: Any, tol: Tolerance, *,
                          labels: Sequence[str] | None = None, top_k: int = DEFAULT_TOP_K) -> Verdict:
    """Judge full next-token log-prob rows (``[rows, vocab]``) of two runs that should agree.

    Each row is compared on the reference's top-k tokens: its |Δ log p| is the
    mean over those tokens weighted by the reference's probability (the chosen
    token's analog, comparable with ``compare``'s tolerances), held to
    ``max_abs_dlogp`` per row and ``mean_abs_dlogp`` over rows. A row whose best
    token changes passes only as a near-tie (reported). NaN and inf are named
    per row, never absorbed by a tolerance.
    """
    import torch

    ref = torch.as_tensor(ref_logprobs).detach().float().cpu()
    got = torch.as_tensor(got_logprobs).detach().float().cpu()
    if ref.ndim == 1:
        ref, got = ref.unsqueeze(0), got.unsqueeze(0)
    if ref.shape != got.shape:
        return Verdict(ok=False, reasons=(f"shapes differ: reference {tuple(ref.shape)}, got {tuple(got.shape)}",))
    names = list(labels) if labels is not None else [f"row {i}" for i in range(ref.shape[0])]
    allowance = flat_allowance(tol, ref.shape[0])
    reasons: list[str] = []
    judged = _Judged()
    for r in range(ref.shape[0]):
        bad = _nonfinite_row(ref[r], "the reference") or _nonfinite_row(got[r], "this run")
        if bad:
            reasons.append(f"{names[r]}: {bad}")
            continue
        k = min(top_k, ref.shape[1])
        values, index = torch.topk(ref[r], k)
        weights = values.exp() / values.exp().sum()
        d = (got[r, index] - values).abs()
        if not torch.isfinite(d).all():
            reasons.append(f"{names[r]}: this run gives -inf log-probability to the reference's top tokens")
            continue
        judged.deltas.append((r, float((weights * d).sum())))
        if k >= 2:
            margin_ref = float(values[0] - values[1])
            judged.shifts.append((r, abs(float(got[r, index[0]] - got[r, index[1]]) - margin_ref)))
        ref_best, got_best = int(index[0]), int(got[r].argmax())
        if ref_best != got_best:
            gap_ref = float(ref[r, ref_best] - ref[r, got_best])
            gap_got = float(got[r, got_best] - got[r, ref_best])
            in_top = got_best in index.tolist() and ref_best in torch.topk(got[r], k).indices.tolist()
            refusal = "outside top-k" if not in_top else allowance.flip_refusal(r, gap_ref, gap_got)
            if refusal is None:
                judged.ties.append(AcceptedTie(r, ref_best, got_best, gap_ref, gap_got, where=names[r],
                                               bound=allowance.margin_bound(r)))
            else:
                reasons.append(
                    f"{names[r]}: the best token changes from token#{ref_best} to token#{got_best} (log-prob gap "
                    f"{gap_ref:.3f} in the reference, {gap_got:.3f} here; {refusal}{allowance.describe()}): not a "
                    "near-tie"
                )
    stats = judged.stats()
    for r, value in judged.deltas:
        if allowance.step_exceeded(r, value):
            reasons.append(f"{names[r]}: |Δ log p| {value:.3g} on the reference's top-{min(top_k, ref.shape[1])} "
                           f"> per-row tolerance {tol.max_abs_dlogp:g}{tol.describe()}")
    n = int(stats["steps_compared"])
    mean_bound = allowance.mean_bound([r for r, _ in judged.deltas])
    if n and not stats["mean_abs_dlogp"] <= mean_bound + ROUNDING:
        reasons.append(f"mean |Δ log p| {stats['mean_abs_dlogp']:.3g} over {n} rows > tolerance "
                       f"{mean_bound:.3g}{tol.describe()}")
    reasons += _shift_reasons(judged.shifts, allowance, "row", names)
    return Verdict(ok=not reasons, accepted_ties=tuple(judged.ties), reasons=tuple(reasons), stats=stats)


def _nonfinite_row(row: Any, who: str) -> str | None:
    import torch

    nan = int(torch.isnan(row).sum())
    if nan:
        return (f"{who} has NaN log-probabilities ({nan} of {row.numel()} entries): the model produced NaN "
                "scores; NaN never passes")
    posinf = int(torch.isposinf(row).sum())
    if posinf or bool(torch.isneginf(row).all()):
        return f"{who} has infinite log-probabilities: the scores are not finite; inf never passes"
    return None
