"""What a comparison forgives, step by step: the allowance.

Every bound the engine (``harness.judge.compare``) judges a path with comes from here, in one of
two forms:

- **recorded**: a golden that carries its own noise (``PathNoise``, measured when it was
  recorded: how far its own path moved under benign changes on the recording machine) is
  judged at each step against ``FACTOR`` x that step's noise, never below what the logits'
  dtype can round at that step (one unit in the last place of the golden token's score). The
  allowance follows the model, the dtype and the step instead of one model's numbers.
- **flat**: the same bound at every step, from a ``Tolerance`` (the built-in defaults for a
  golden without a record and for the consistency kinds; a suite's or check's ``tolerance:``,
  which replaces the recorded bound for the fields it names and is listed where it widens it).

Near-ties have a budget. A flip (this run prefers another token) is accepted only where the
golden's own margin was within its noise and the margin moved by no more than the step's
margin allowance; and the number of accepted flips is bounded by what the recorded noise
explains: each step flips under benign noise with probability ``Q(margin / sigma)``, and more
flips than the 1-in-``1/FLIP_ALPHA`` tail of that count are not noise.

Constants, calibrated on SmolLM2-135M (7 goldens x 4 variants, CPU; docs/calibration.md has the
tables). The held-out benign change was the real one this harness meets: goldens recorded on an
AVX-512 CPU judged on an AVX2 CPU, against noise recorded on the AVX2 CPU with the other
attention kernel, no KV cache, a left-padded batch and a rounding dither.
- ``POOL``: a step's noise estimate is a max over four samples, itself noisy; pooling it with
  1.5 x the path's mean noise keeps the worst cross-CPU step at 3.4 x its unit (4.2 x at 1.0,
  6.7 x unpooled).
- ``FACTOR`` 4: above that worst 3.4 (the flip side: a real change smaller than 4 x a step's
  noise passes at that step; the mean bound, over the whole path, catches what is consistent).
- ``MEAN_FACTOR``: see ``mean_bound``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.judge.tolerance import CROSS_DEVICE_FACTOR, CROSS_DEVICE_LABEL, MAX_NATS, ROUNDING, Tolerance

FACTOR = 4.0
POOL = 1.5
MEAN_FACTOR = 1.0
MARGIN_MEAN_FACTOR = 1.5
FLIP_ALPHA = 0.01
NOISE_VERSION = 1
# Mean bounds were calibrated as the worst per-prompt mean over paths of about
# this many steps; a mean over fewer steps varies more (its spread grows as 1/sqrt(steps)).
MEAN_CALIBRATED_STEPS = 16
# bits of mantissa: one unit in the last place of x is 2 ** (floor(log2 |x|) - bits)
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23, "float64": 52}


class NoiseRecordError(ValueError):
    """A recorded noise block this version cannot read (edited by hand, or another format)."""


def ulp(value: float, dtype: str) -> float:
    """One unit in the last place of ``value`` in ``dtype``: what rounding to it can move."""
    bits = MANTISSA_BITS.get(dtype, MANTISSA_BITS["bfloat16"])
    magnitude = max(abs(value), 2.0 ** -14)
    return 2.0 ** (math.floor(math.log2(magnitude)) - bits)


@dataclass(frozen=True)
class PathNoise:
    """A golden path's own noise, measured when it was recorded (a sidecar's ``path_noise``).

    Per step: the largest |Δ log p| of the golden token and the largest change of its top-2
    margin under the benign conditions, and the golden token's score (the floor's magnitude).
    """

    dlogp: tuple[float, ...]
    margin: tuple[float, ...]
    score: tuple[float, ...]
    logits_dtype: str
    conditions: tuple[str, ...]
    flips: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # condition -> steps it flipped
    environment: Mapping[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.dlogp)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": NOISE_VERSION,
            "conditions": list(self.conditions),
            "columns": "per step: largest |Δ log p| of the golden token, largest change of its top-2 margin "
                       "(both over the conditions), |score| of the golden token",
            "steps": [f"{d:.3g} {m:.3g} {s:.4g}" for d, m, s in zip(self.dlogp, self.margin, self.score)],
            "flips": {name: list(steps) for name, steps in self.flips.items() if steps},
            "logits_dtype": self.logits_dtype,
            "environment": dict(self.environment),
        }

    @classmethod
    def from_json(cls, data: Any) -> PathNoise:
        if not isinstance(data, dict):
            raise NoiseRecordError(f"it is a JSON {type(data).__name__}, not an object")
        if data.get("version") != NOISE_VERSION:
            raise NoiseRecordError(f"it has format {data.get('version')!r}, this harness reads {NOISE_VERSION}")
        steps, conditions = data.get("steps"), data.get("conditions")
        if not isinstance(steps, list) or not isinstance(conditions, list) or not conditions:
            raise NoiseRecordError("its steps or conditions are missing or of the wrong type")
        rows: list[tuple[float, float, float]] = []
        for index, line in enumerate(steps):
            try:
                d, m, s = (float(v) for v in str(line).split())
            except ValueError:
                raise NoiseRecordError(f"step {index} is not three numbers: {str(line)[:40]!r}") from None
            if not all(math.isfinite(v) and v >= 0 for v in (d, m)) or not math.isfinite(s):
                raise NoiseRecordError(f"step {index} holds a negative or non-finite noise: {line!r}")
            rows.append((d, m, abs(s)))
        flips = data.get("flips", {})
        dtype = data.get("logits_dtype")
        if not isinstance(flips, dict) or not isinstance(dtype, str):
            raise NoiseRecordError("its flips or logits_dtype have the wrong type")
        if dtype not in MANTISSA_BITS:
            raise NoiseRecordError(f"its logits_dtype {dtype!r} is not one of {', '.join(MANTISSA_BITS)}")
        for name, at in flips.items():
            if not isinstance(at, list) or not all(type(i) is int and 0 <= i < len(rows) for i in at):
                raise NoiseRecordError(f"its flips under {str(name)[:40]!r} are {str(at)[:40]}, not a list of step "
                                       f"numbers 0..{len(rows) - 1}")
        noise = cls(dlogp=tuple(r[0] for r in rows), margin=tuple(r[1] for r in rows),
                    score=tuple(r[2] for r in rows), logits_dtype=dtype, conditions=tuple(map(str, conditions)),
                    flips={str(k): tuple(v) for k, v in flips.items()},
                    environment=data.get("environment", {}) if isinstance(data.get("environment"), dict) else {})
        capped = noise.cap_problem()
        if capped:
            raise NoiseRecordError(capped)
        return noise

    def cap_problem(self) -> str | None:
        """Why this record allows more than a suite tolerance may (``MAX_NATS``), or None.

        A recorded allowance is a tolerance too: a record that forgives 1000 nats at a step
        would switch the check off, which a suite's ``tolerance:`` is refused for.
        """
        if not self.dlogp:
            return "it has no steps"
        bounds = recorded_allowance(self)
        for what, values in (("|Δ log p|", bounds.step), ("margin shift", bounds.margin)):
            worst = max(range(len(values)), key=values.__getitem__)
            if values[worst] > MAX_NATS:
                return (f"it allows a {what} of {values[worst]:.3g} nats at step {worst}, above the {MAX_NATS:g}-nat "
                        "cap a suite tolerance has: no numerical noise moves a log-probability that far")
        return None


@dataclass(frozen=True)
class Allowance:
    """Per-step bounds for one comparison; built by ``flat_allowance`` or ``recorded_allowance``."""

    step: tuple[float, ...]      # bound on |Δ log p| of the golden token, per step
    margin: tuple[float, ...]    # bound on the change of the golden token's top-2 margin (flips included)
    unit: tuple[float, ...]      # the noise a mean is measured in, per step
    sigma: tuple[float, ...]     # the spread of a benign margin change, per step (flip probabilities)
    mean_factor: float           # mean |Δ log p| <= mean_factor x mean unit (widened for short paths)
    source: str                  # how messages name it
    tie_gap: float | None = None  # a flat cap on each run's gap at a flip (Tolerance.tie_gap), if any
    exact: bool = False          # match: exact: no flip is accepted
    widened: tuple[str, ...] = ()  # overrides that forgive more than what they replace, and where they were set
    recorded: bool = False       # from the golden's own noise record
    margin_unit: tuple[float, ...] = ()  # the recorded margin noise (with its floor), per step: the margins' mean

    def _at(self, values: tuple[float, ...], index: int) -> float:
        return values[min(max(index, 0), len(values) - 1)]

    def step_bound(self, index: int) -> float:
        return self._at(self.step, index)

    def margin_bound(self, index: int) -> float:
        return self._at(self.margin, index)

    def step_exceeded(self, index: int, delta: float) -> bool:
        """``delta`` (|Δ log p|) beyond the step's bound, with the golden's printed precision allowed."""
        return not delta <= self.step_bound(index) + ROUNDING

    def margin_exceeded(self, index: int, shift: float) -> bool:
        return not shift <= self.margin_bound(index) + ROUNDING

    def mean_bound(self, indices: Sequence[int]) -> float:
        """The bound on mean |Δ log p| over the steps ``indices``.

        ``mean_factor`` x the mean noise unit, for a path as long as the calibration's; a mean
        over fewer steps varies more (as 1/sqrt(n)), so its bound grows towards the mean of the
        per-step bounds, which a mean over one step is.
        """
        if not indices:
            return 0.0
        return _mean_bound(self.mean_factor, [self._at(self.unit, i) for i in indices],
                           [self.step_bound(i) for i in indices])

    def margin_mean_bound(self, indices: Sequence[int]) -> float | None:
        """The bound on the mean margin shift over ``indices`` (recorded allowances only, else None).

        Per step a margin may move ``FACTOR`` x its pooled noise; over a path, moves that are each
        within that but together above ``MARGIN_MEAN_FACTOR`` x the recorded (unpooled) noise are
        a consistent change, not noise.
        """
        if not self.margin_unit or not indices:
            return None
        return _mean_bound(MARGIN_MEAN_FACTOR, [self._at(self.margin_unit, i) for i in indices],
                           [self.margin_bound(i) for i in indices])

    def flip_refusal(self, index: int, gap_expected: float, gap_actual: float) -> str | None:
        """Why a flip at ``index`` is not noise, or None. Gaps: each run's preference for its own token."""
        if self.exact:
            return "match: exact accepts no flip"
        if self.tie_gap is not None and not max(gap_expected, gap_actual) < self.tie_gap + ROUNDING:
            return f"a gap of {max(gap_expected, gap_actual):.3g} is not below the tie tolerance {self.tie_gap:g}"
        shift, bound = gap_expected + gap_actual, self.margin_bound(index)
        if shift > bound + ROUNDING:
            return (f"the margin between the two tokens moved by {shift:.3g} through the flip, more than the "
                    f"step's allowance {bound:.3g}")
        return None

    def flip_probabilities(self, margins: Sequence[float]) -> list[float]:
        """Per step, how likely benign noise flips it: the golden's top-2 margin against the margin's spread."""
        out = []
        for index, margin in enumerate(margins):
            sigma = self._at(self.sigma, index)
            out.append(0.5 * math.erfc(margin / (sigma * math.sqrt(2))) if sigma > 0 else float(margin <= 0))
        return out

    def describe(self) -> str:
        return f" for {self.source}" if self.source else ""


def _mean_bound(factor: float, units: Sequence[float], ceilings: Sequence[float]) -> float:
    """``factor`` x the mean unit for a path as long as the calibration's; a mean over fewer steps
    varies more (as 1/sqrt(n)), so its bound grows towards the mean per-step bound, which a mean
    over one step is."""
    n = len(units)
    base = factor * sum(units) / n
    widened = base * max(1.0, math.sqrt(MEAN_CALIBRATED_STEPS / n))
    return max(base, min(widened, sum(ceilings) / n))


def flat_allowance(tol: Tolerance, steps: int, *, exact: bool = False) -> Allowance:
    """The same bounds at every step: a golden without a noise record, or two live runs."""
    n = max(steps, 1)
    return Allowance(step=(tol.max_abs_dlogp,) * n, margin=(tol.margin_shift,) * n,
                     unit=(tol.mean_abs_dlogp,) * n, sigma=(tol.margin_shift / FACTOR,) * n, mean_factor=1.0,
                     source=tol.source or "the default tolerance", tie_gap=tol.tie_gap, exact=exact,
                     widened=widened_defaults(tol))


def as_allowance(tol: Tolerance | Allowance, steps: int) -> Allowance:
    return tol if isinstance(tol, Allowance) else flat_allowance(tol, steps)


def widened_defaults(tol: Tolerance) -> tuple[str, ...]:
    """The fields a suite or check set above the built-in default of their quantization."""
    from harness.judge.tolerance import builtin_of

    quant, default = builtin_of(tol)
    lines = []
    for name, where in sorted(tol.where.items()):
        value, built_in = _field(tol, name), _field(default, name)
        if value > built_in:
            lines.append(f"{name} {value:g} (set in {where}) is wider than the {quant} default {built_in:g}")
    return tuple(lines)


def _field(tol: Tolerance, name: str) -> float:
    return tol.margin_shift if name == "max_margin_shift" else float(getattr(tol, name))


def widened_by_record(noise: PathNoise, built_in: Tolerance) -> tuple[str, ...]:
    """Where a golden's recorded noise allows more than the widest built-in rule (``built_in`` x the
    cross-device factor): listed like a suite's widened tolerance, since a record can be edited too."""
    bounds, n = recorded_allowance(noise), len(noise)
    lines = []
    for name, values, default in (("max_abs_dlogp", bounds.step, built_in.max_abs_dlogp),
                                  ("max_margin_shift", bounds.margin, built_in.margin_shift)):
        ceiling = default * CROSS_DEVICE_FACTOR
        wider = [v for v in values if v > ceiling + ROUNDING]
        if wider:
            lines.append(f"{name} up to {max(wider):.3g} from the golden's recorded noise (its sidecar) at {len(wider)} "
                         f"of {n} steps is wider than the {built_in.source or 'built-in defaults'} "
                         f"x{CROSS_DEVICE_FACTOR:g} ({ceiling:.3g})")
    return tuple(lines)


def recorded_allowance(noise: PathNoise, *, chosen_logprobs: Sequence[float] | None = None,
                       overrides: Tolerance | None = None, exact: bool = False, cross_device: bool = False,
                       built_in: Tolerance | None = None) -> Allowance:
    """Per-step bounds from a golden's own noise; fields a suite or check set replace theirs (and are listed if wider).

    A step's unit is the largest of: its recorded noise, one unit in the last place of its score
    (the dtype floor), ``POOL`` x the path's mean noise, and, where the golden token was not
    certain, the share of the margin's noise that reaches its log-prob: d log p / d margin is
    1 - p, so a near-tie's chosen log-prob moves with its margin (``chosen_logprobs``, the
    golden's own, give p). ``built_in``: the flat default of the variant's quantization, against
    which the record itself is listed where it is wider (``widened_by_record``). ``cross_device``
    scales every bound by ``CROSS_DEVICE_FACTOR``, as ``NoiseModel.tolerance`` does the flat ones.
    """
    scale, scale_label = (CROSS_DEVICE_FACTOR, CROSS_DEVICE_LABEL) if cross_device else (1.0, "")
    n = len(noise)
    floors = [ulp(score, noise.logits_dtype) for score in noise.score]
    pooled = POOL * (sum(noise.dlogp) / n if n else 0.0)
    pooled_margin = POOL * (sum(noise.margin) / n if n else 0.0)
    recorded_margin = [max(m, 2 * f) * scale for m, f in zip(noise.margin, floors)]
    margin_unit = [max(m, 2 * f, pooled_margin) for m, f in zip(noise.margin, floors)]
    uncertain = [1.0 - math.exp(min(lp, 0.0)) for lp in chosen_logprobs] if chosen_logprobs is not None \
        else [0.0] * n
    unit = [max(d, f, pooled, share * m) for d, f, share, m in zip(noise.dlogp, floors, uncertain, margin_unit)]
    step = [FACTOR * u * scale for u in unit]
    margin = [FACTOR * u * scale for u in margin_unit]
    sigma = list(recorded_margin)  # the margin's own recorded spread: flip probabilities (not pooled)
    unit = [u * scale for u in unit]
    mean_factor, tie_gap = MEAN_FACTOR, None
    widened = list(widened_by_record(noise, built_in)) if built_in is not None else []
    where = dict(overrides.where) if overrides is not None else {}
    for name, place in sorted(where.items()):
        value = _field(overrides, name)  # type: ignore[arg-type]
        replaced = {"max_abs_dlogp": step, "max_margin_shift": margin, "mean_abs_dlogp": None,
                    "tie_gap": None}[name]
        if replaced is not None:
            wider = sum(1 for bound in replaced if value > bound)
            replaced[:] = [value] * n
        elif name == "mean_abs_dlogp":
            wider = int(value > mean_factor * sum(unit) / max(n, 1))
            unit, mean_factor = [value] * n, 1.0
        else:
            tie_gap, wider = value, 0
        if wider:
            at = f" at {wider} of {n} steps" if name != "mean_abs_dlogp" else ""
            widened.append(f"{name} {value:g} (set in {place}) is wider than the golden's recorded allowance{at}")
    label = f"recorded noise x{FACTOR:g}" + (f", {scale_label}" if scale_label else "")
    if where:
        label += f"; {', '.join(sorted(where))} set in the suite"
    return Allowance(step=tuple(step), margin=tuple(margin), unit=tuple(unit), sigma=tuple(sigma),
                     mean_factor=mean_factor, source=label, tie_gap=tie_gap, exact=exact, widened=tuple(widened),
                     recorded=True, margin_unit=tuple(recorded_margin) if "max_margin_shift" not in where else ())


def flip_budget(probabilities: Sequence[float], *, alpha: float = FLIP_ALPHA) -> int:
    """The smallest b with P(more than b flips) <= alpha, for independent steps; at least 1.

    The count of flips is a sum of independent Bernoulli steps (Poisson-binomial), computed
    exactly; one flip is always allowed, since a single flip within its step's allowance is
    what benign noise does.
    """
    dist = [1.0]
    for p in probabilities:
        p = min(max(p, 0.0), 1.0)
        new = [0.0] * (len(dist) + 1)
        for k, q in enumerate(dist):
            new[k] += q * (1 - p)
            new[k + 1] += q * p
        dist = new
    tail = 1.0
    for b, q in enumerate(dist):
        tail -= q
        if tail <= alpha:
            return max(1, b)
    return max(1, len(dist) - 1)
