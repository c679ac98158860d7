"""The one comparison engine: are two observations the same behaviour, up to numerical noise?

Kernels, thread counts, SIMD levels and library versions move log-probabilities
by a small, measurable amount; that amount depends on the quantization (NF4
with bf16 compute is an order of magnitude noisier than fp16). A ``NoiseModel``
holds it per variant as a ``Tolerance``; ``compare`` judges two greedy
generations and ``compare_distributions`` judges full next-token rows (padding,
batch, cache consistency). Both return a ``Verdict`` that says why it failed
with log-prob evidence, reports every near-tie it accepted (never silent), and
never lets NaN or inf pass.

Rules of ``compare``:
- on the shared path the token ids are identical and the chosen tokens'
  log-probs agree within the tolerance (mean over the path and per step), so a
  change too small to flip a token but larger than noise still fails;
- at the first differing token, pass only for a near-tie in both runs (each
  token in the other's top-k, the log-prob gap below ``tie_gap`` in the golden
  and in this run); then the golden's remaining tokens are scored with the model
  under test (``rescore``, teacher forcing) and held to the same tolerances;
- a sequence that stops earlier or later than the golden diverges at that step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from harness.observation import (  # noqa: F401  (re-exported: the engine's public names)
    DEFAULT_TOP_K,
    Observation,
    Step,
    near_ties,
    observe_greedy,
    teacher_force,
)

Rescore = Callable[[list[int]], tuple[Step, ...]]
TOLERANCE_FIELDS = ("mean_abs_dlogp", "max_abs_dlogp", "tie_gap", "max_margin_shift")


@dataclass(frozen=True)
class Tolerance:
    """How far two runs of the same model may differ, in log-probability (nats)."""

    mean_abs_dlogp: float
    max_abs_dlogp: float
    tie_gap: float
    source: str = ""
    max_margin_shift: float | None = None  # None: tie_gap (noise that moves a margin by x flips ties of gap x)

    def describe(self) -> str:
        return f" for {self.source}" if self.source else ""

    @property
    def margin_shift(self) -> float:
        return self.tie_gap if self.max_margin_shift is None else self.max_margin_shift


# Defaults, on SmolLM2-135M, CPU. fp16: harness-calibrate (H5, /work/notes/calibration.md;
# the 7 prompts of generation.yaml, 104 steps, teacher-forced on the reference
# path) under a padded batch, no KV cache, 1 thread, eager attention and the
# AVX2 / no-SIMD kernels: worst per-prompt mean |dlogp| 0.0055, per step 0.0234,
# top-2 margin shift 0.070, flips only at gaps <= 0.016; x3 -> 0.017 / 0.071 /
# 0.22. Caught at these bounds: 2% weight noise on one layer (mean 0.025).
# nf4 (bf16 compute), from issue 9 (eager vs sdpa, free-running, 7 prompts):
# per-item mean <= 0.037, a step <= 0.24, teacher-forced max 0.070, a flip at a
# gap of 0.31 (nf4-lora); bounds ~2.5x above, tie gap above the observed flip.
# nf4 margin shift: bfloat16 moves tail tokens far more than fp16 does. The whole default
# suite under ATEN_CPU_CAPABILITY=avx2 moved the margin of chinese-question[nf4] step 21
# (chosen -0.033, runner-up -5.63) by 0.92 while no chosen token moved more than 0.049; nf4
# regressions (5% weight noise, lora_B x1.1: mean 0.24 / 0.23) are caught by the mean bound, so
# the margin bound here only has to stay above noise: 1.5.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp16": Tolerance(mean_abs_dlogp=0.017, max_abs_dlogp=0.071, tie_gap=0.22, source="fp16"),
    "nf4": Tolerance(mean_abs_dlogp=0.09, max_abs_dlogp=0.6, tie_gap=0.5, max_margin_shift=1.5, source="nf4"),
}
# Goldens of another device class (GPU vs CPU kernels, other accumulation
# orders): the same kind of noise, larger; every bound is scaled by this.
CROSS_DEVICE_FACTOR = 3.0


@dataclass(frozen=True)
class NoiseModel:
    """Tolerances per variant: its own entry, else its quantization's (LoRA uses its base's)."""

    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    cross_device_factor: float = CROSS_DEVICE_FACTOR

    def tolerance(self, variant_key: str | None, *, cross_device: bool = False) -> Tolerance:
        key = variant_key or "fp16"
        quant = key.split("-")[0]
        tol = self.tolerances.get(key) or self.tolerances.get(quant) or self.tolerances.get("nf4") \
            or DEFAULT_TOLERANCES["nf4"]
        if not tol.source:
            tol = replace(tol, source=key)
        if cross_device:
            f = self.cross_device_factor
            tol = replace(tol, mean_abs_dlogp=tol.mean_abs_dlogp * f, max_abs_dlogp=tol.max_abs_dlogp * f,
                          tie_gap=tol.tie_gap * f, source=f"{tol.source}, cross-device x{f:g}",
                          max_margin_shift=None if tol.max_margin_shift is None else tol.max_margin_shift * f)
        return tol

    def overridden(self, override: Mapping[str, Any] | None, *, where: str = "suite") -> NoiseModel:
        """A copy with a suite's or check's ``tolerance:`` applied.

        ``override`` is either flat (``{mean_abs_dlogp: .., max_abs_dlogp: .., tie_gap: ..}``,
        any subset, for every variant) or keyed by variant or quantization
        (``{nf4: {...}, fp16-lora: {...}}``). Keys not given keep their defaults.
        """
        if not override:
            return self
        flat = {k: v for k, v in override.items() if k in TOLERANCE_FIELDS and v is not None}
        nested = {k: dict(v) for k, v in override.items() if k not in TOLERANCE_FIELDS and v}
        table: dict[str, Tolerance] = {}
        for key in set(self.tolerances) | set(nested) | {"fp16", "nf4"}:
            base = self.tolerance(key)
            layers = [flat, nested.get(key.split("-")[0], {}), nested.get(key, {}) if "-" in key else {}]
            values = {k: v for layer in layers for k, v in layer.items() if v is not None}
            table[key] = replace(base, **values, source=f"{key} ({where} tolerance)") if values else base
        return NoiseModel(tolerances=table, cross_device_factor=self.cross_device_factor)


class ToleranceValues(BaseModel):
    """Bounds a suite may set (any subset); the rest keep the noise model's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean_abs_dlogp: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_abs_dlogp: float | None = Field(None, gt=0, allow_inf_nan=False)
    tie_gap: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_margin_shift: float | None = Field(None, gt=0, allow_inf_nan=False)


class ToleranceSpec(ToleranceValues):
    """``tolerance:`` in a suite's ``defaults:`` or on a check: flat (every variant) or per variant.

    A variant's own entry wins over its quantization's (``nf4-lora`` over ``nf4``),
    which wins over the flat values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    fp16: ToleranceValues | None = None
    nf4: ToleranceValues | None = None
    fp16_lora: ToleranceValues | None = Field(None, alias="fp16-lora")
    nf4_lora: ToleranceValues | None = Field(None, alias="nf4-lora")

    def as_override(self) -> dict[str, Any]:
        override: dict[str, Any] = {k: getattr(self, k) for k in TOLERANCE_FIELDS if getattr(self, k) is not None}
        for key in ("fp16", "nf4", "fp16-lora", "nf4-lora"):
            values = getattr(self, key.replace("-", "_"))
            if values is not None:
                override[key] = values.model_dump(exclude_none=True)
        return override


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
    """A first differing token accepted as numerical noise: reported, never silent."""

    step: int
    expected_id: int
    got_id: int
    gap_expected: float
    gap_actual: float
    where: str = ""  # "" (free run), "teacher-forced", or a row label

    @property
    def gap(self) -> float:
        return max(self.gap_expected, self.gap_actual)

    def describe(self, subject: str = "", sides: Sides = GOLDEN_SIDES) -> str:
        at = f"step {self.step}" if not self.where or self.where == "teacher-forced" else self.where
        of = f" of {subject}" if subject else ""
        forced = " (teacher-forced)" if self.where == "teacher-forced" else ""
        return (f"accepted near-tie at {at}{of}{forced}, gap {self.gap:.3g} ({sides.expected_short} "
                f"{self.gap_expected:.3g}, {sides.actual_short} {self.gap_actual:.3g}): token#{self.expected_id} vs token#{self.got_id}")


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


def _divergence(step: int, expected: Step, actual: Step, gaps: tuple[float, float] | None, tol: Tolerance,
                *, forced: bool = False, sides: Sides = GOLDEN_SIDES) -> str:
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
    return (head + f"; log-prob gap {gaps[0]:.3f} in {sides.expected} and {gaps[1]:.3f} in {sides.actual}, tie "
            f"tolerance {tol.tie_gap:g}{tol.describe()}: not a near-tie, a real change")


def compare(expected: Observation, actual: Observation, tol: Tolerance, *,
            rescore: Rescore | None = None, sides: Sides = GOLDEN_SIDES) -> Verdict:
    """Judge ``actual`` against ``expected`` (the golden) under ``tol``; see the module docstring.

    ``sides`` names the two observations in the reasons (a golden file, or a live reference run).
    """
    reasons = _nonfinite_steps(expected.steps, sides.expected) + _nonfinite_steps(actual.steps, sides.actual)
    if reasons:
        return Verdict(ok=False, reasons=tuple(reasons), stats={"steps_compared": 0})
    deltas: list[tuple[int, float]] = []
    ties: list[AcceptedTie] = []
    exp_ids, act_ids = expected.token_ids, actual.token_ids
    shared = min(len(exp_ids), len(act_ids))
    first = next((i for i in range(shared) if exp_ids[i] != act_ids[i]), None)
    shifts: list[tuple[int, float]] = []
    for i in range(shared if first is None else first):
        deltas.append((i, abs(expected.steps[i].logprob - actual.steps[i].logprob)))
        _margin_shift(i, expected.steps[i], actual.steps[i], shifts)
    unjudged = 0
    if first is not None:
        e, a = expected.steps[first], actual.steps[first]
        gaps = tie_gaps(e, a)
        if gaps is not None and gaps[0] < tol.tie_gap and gaps[1] < tol.tie_gap:
            ties.append(AcceptedTie(first, e.token_id, a.token_id, gaps[0], gaps[1]))
            if rescore is None:
                unjudged = len(exp_ids) - first - 1
            else:
                reasons += _judge_forced(expected, rescore(list(exp_ids)), first, tol, deltas, ties, shifts, sides)
        else:
            reasons.append(_divergence(first, e, a, gaps, tol, sides=sides))
    elif len(exp_ids) != len(act_ids):
        reasons.append(_stop_divergence(expected, actual, shared, sides))
    elif expected.stop != actual.stop:
        reasons.append(f"the same {shared} tokens, but {sides.expected} ended by {expected.stop!r} and "
                       f"{sides.actual} by {actual.stop!r}: the stopping rule (eos_token_id or max_new_tokens) "
                       "changed")
    stats = _stats(deltas)
    stats.update(first_divergence=float(-1 if first is None else first), steps_unjudged=float(unjudged),
                 accepted_ties=float(len(ties)))
    reasons += _tolerance_reasons(stats, deltas, tol)
    reasons += _shift_reasons(stats, shifts, tol, "step")
    return Verdict(ok=not reasons, accepted_ties=tuple(ties), reasons=tuple(reasons), stats=stats)


def _margin_shift(index: int, expected: Step, actual: Step, shifts: list[tuple[int, float]]) -> None:
    """How much the margin between the expected token and the expected runner-up moved.

    The chosen token's log-prob barely moves where the model is confident, even
    when its logits move a lot; the margin to the runner-up does not hide that.
    Where the runner-up fell out of this run's top-k, the shift is at least the
    distance to the last top-k entry (a lower bound, never an overstatement).
    """
    runner = next(((t, lp) for t, lp in expected.top if t != expected.token_id), None)
    if runner is None or not actual.top:
        return
    margin = expected.logprob - runner[1]
    got = actual.logprob_of(runner[0])
    now = actual.logprob - (got if got is not None else actual.top[-1][1])
    shift = abs(now - margin) if got is not None else max(0.0, now - margin)
    shifts.append((index, shift))


def _shift_reasons(stats: dict[str, float], shifts: list[tuple[int, float]], tol: Tolerance, unit: str) -> list[str]:
    if not shifts:
        stats["max_margin_shift"] = 0.0
        return []
    at, worst = max(shifts, key=lambda d: d[1])
    stats["max_margin_shift"] = worst
    if worst <= tol.margin_shift:
        return []
    return [f"the margin between the chosen token and its runner-up moved by {worst:.3g} at {unit} {at} > "
            f"tolerance {tol.margin_shift:g}{tol.describe()}: a confident token's log-prob hides it, the "
            "distribution under it moved beyond noise"]


def _stop_divergence(expected: Observation, actual: Observation, at: int, sides: Sides = GOLDEN_SIDES) -> str:
    def ended(obs: Observation) -> str:
        return f"ended by {obs.stop!r} after {len(obs.steps)} tokens"

    side = "earlier" if len(actual.steps) < len(expected.steps) else "later"
    return (f"{sides.actual} stops {side} than {sides.expected}: the first {at} tokens are identical, then "
            f"{sides.expected} {ended(expected)} and {sides.actual} {ended(actual)}; a divergence at step {at} "
            "(the stopping rule, eos_token_id or max_new_tokens changed), never a pass by truncation")


def _judge_forced(expected: Observation, forced: tuple[Step, ...], first: int, tol: Tolerance,
                  deltas: list[tuple[int, float]], ties: list[AcceptedTie],
                  shifts: list[tuple[int, float]], sides: Sides = GOLDEN_SIDES) -> list[str]:
    """The golden's tokens after an accepted tie, scored by the model under test."""
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
        deltas.append((i, abs(e.logprob - f.logprob)))
        best_id, best_lp = f.best
        if best_id == e.token_id:
            _margin_shift(i, e, f, shifts)
            continue
        preferred = Step(token_id=best_id, logprob=best_lp, top=f.top)
        gaps = tie_gaps(e, preferred)
        if gaps is not None and gaps[0] < tol.tie_gap and gaps[1] < tol.tie_gap:
            ties.append(AcceptedTie(i, e.token_id, best_id, gaps[0], gaps[1], where="teacher-forced"))
        else:
            reasons.append(_divergence(i, e, preferred, gaps, tol, forced=True, sides=sides))
            break
    return reasons


def _stats(deltas: list[tuple[int, float]]) -> dict[str, float]:
    if not deltas:
        return {"steps_compared": 0.0, "mean_abs_dlogp": 0.0, "max_abs_dlogp": 0.0, "max_at_step": -1.0}
    at, worst = max(deltas, key=lambda d: d[1])
    return {"steps_compared": float(len(deltas)), "mean_abs_dlogp": sum(d for _, d in deltas) / len(deltas),
            "max_abs_dlogp": worst, "max_at_step": float(at)}


def _tolerance_reasons(stats: dict[str, float], deltas: list[tuple[int, float]], tol: Tolerance) -> list[str]:
    reasons: list[str] = []
    n = int(stats["steps_compared"])
    if n and stats["mean_abs_dlogp"] > tol.mean_abs_dlogp:
        reasons.append(
            f"mean |Δ log p| {stats['mean_abs_dlogp']:.3g} over {n} steps > tolerance {tol.mean_abs_dlogp:g}"
            f"{tol.describe()}: the chosen tokens' probabilities moved beyond numerical noise"
        )
    if n and stats["max_abs_dlogp"] > tol.max_abs_dlogp:
        reasons.append(
            f"|Δ log p| {stats['max_abs_dlogp']:.3g} at step {int(stats['max_at_step'])} > per-step tolerance "
            f"{tol.max_abs_dlogp:g}{tol.describe()}"
        )
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
    reasons: list[str] = []
    ties: list[AcceptedTie] = []
    deltas: list[tuple[int, float]] = []
    shifts: list[tuple[int, float]] = []
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
        deltas.append((r, float((weights * d).sum())))
        if k >= 2:
            margin_ref = float(values[0] - values[1])
            shifts.append((r, abs(float(got[r, index[0]] - got[r, index[1]]) - margin_ref)))
        ref_best, got_best = int(index[0]), int(got[r].argmax())
        if ref_best != got_best:
            gap_ref = float(ref[r, ref_best] - ref[r, got_best])
            gap_got = float(got[r, got_best] - got[r, ref_best])
            in_top = got_best in index.tolist() and ref_best in torch.topk(got[r], k).indices.tolist()
            if in_top and gap_ref < tol.tie_gap and gap_got < tol.tie_gap:
                ties.append(AcceptedTie(r, ref_best, got_best, gap_ref, gap_got, where=names[r]))
            else:
                reasons.append(
                    f"{names[r]}: the best token changes from token#{ref_best} to token#{got_best} (log-prob gap "
                    f"{gap_ref:.3f} in the reference, {gap_got:.3f} here, tie tolerance {tol.tie_gap:g}"
                    f"{tol.describe()}): not a near-tie"
                )
    stats = _stats(deltas)
    stats["accepted_ties"] = float(len(ties))
    for r, value in deltas:
        if value > tol.max_abs_dlogp:
            reasons.append(f"{names[r]}: |Δ log p| {value:.3g} on the reference's top-{min(top_k, ref.shape[1])} "
                           f"> per-row tolerance {tol.max_abs_dlogp:g}{tol.describe()}")
    n = int(stats["steps_compared"])
    if n and stats["mean_abs_dlogp"] > tol.mean_abs_dlogp:
        reasons.append(f"mean |Δ log p| {stats['mean_abs_dlogp']:.3g} over {n} rows > tolerance "
                       f"{tol.mean_abs_dlogp:g}{tol.describe()}")
    shift_reasons = _shift_reasons(stats, shifts, tol, "row")
    if shift_reasons:
        at = max(shifts, key=lambda d: d[1])[0]
        reasons += [r.replace(f"at row {at}", f"at {names[at]}") for r in shift_reasons]
    return Verdict(ok=not reasons, accepted_ties=tuple(ties), reasons=tuple(reasons), stats=stats)


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
