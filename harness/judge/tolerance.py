"""Flat tolerances: the built-in defaults per quantization, and what a suite or check sets.

A ``Tolerance`` bounds how far two runs of the same model may differ, in log-probability
(nats), with one number per field for every step. It judges what has no recorded noise of its
own: a golden recorded before goldens carried their noise, and the consistency kinds, which
compare two live runs. A golden that carries its noise is judged per step against that record
(``harness.judge.allowance``); a suite's or check's ``tolerance:`` then overrides the fields it names.

Overrides layer field by field: the built-in default, then the suite's ``defaults:``, then the
check, each at flat, quantization (``nf4``) and variant (``nf4-lora``) level, the more specific
winning. Every field remembers where it was set, so a widened tolerance can be listed with its
place. Values are bounded: no noise moves a log-probability by more than ``MAX_NATS``, so a
larger value is a typo or a wish to turn the check off, and a suite error either way. The same
bound holds wherever a tolerance comes from: ``tolerance_problem`` checks ``harness-calibrate``'s
advice against it, so the calibrator never prints a value a suite would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

TOLERANCE_FIELDS = ("mean_abs_dlogp", "max_abs_dlogp", "tie_gap", "max_margin_shift")
# More than any numerical noise could move a log-probability: a bound above this judges nothing.
MAX_NATS = 5.0
# The golden's trace prints log-probabilities with 4 decimals: two printed values of the same
# number differ by up to this much, so every bound allows it (``match: exact`` included).
ROUNDING = 1e-4


@dataclass(frozen=True)
class Tolerance:
    """How far two runs of the same model may differ, in log-probability (nats), at every step."""

    mean_abs_dlogp: float
    max_abs_dlogp: float
    tie_gap: float
    source: str = ""
    max_margin_shift: float | None = None  # None: tie_gap (noise that moves a margin by x flips ties of gap x)
    where: Mapping[str, str] = field(default_factory=dict)  # field -> where a suite or check set it

    def describe(self) -> str:
        return f" for {self.source}" if self.source else ""

    @property
    def margin_shift(self) -> float:
        return self.tie_gap if self.max_margin_shift is None else self.max_margin_shift


# Defaults, for goldens without a noise record and the consistency kinds; measured on
# SmolLM2-135M on CPU with harness-calibrate (docs/calibration.md has the table).
# fp16: 7 prompts, 104 steps, teacher-forced on the reference path under a padded batch, no KV
# cache, 1 thread, eager attention and the AVX2 / no-SIMD kernels: worst per-prompt mean
# |dlogp| 0.0055, per step 0.0234, top-2 margin shift 0.070, flips only at gaps <= 0.016; x3.
# nf4 (bfloat16 compute): the calibration's recommendation (x3 over eager, padded batch, no KV
# cache and AVX2: 0.037 / 0.115 / 0.25): 0.12 / 0.35 / 0.75, margin shift 0.75. Runs on another
# CPU (AVX-512 goldens judged on an AVX2 machine) moved nf4 margins by up to 0.71 and a
# chosen log-prob by up to 0.31: such runs are what per-golden noise records are for.
DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp16": Tolerance(mean_abs_dlogp=0.017, max_abs_dlogp=0.071, tie_gap=0.22, source="fp16 defaults"),
    "nf4": Tolerance(mean_abs_dlogp=0.12, max_abs_dlogp=0.35, tie_gap=0.75, max_margin_shift=0.75,
                     source="nf4 defaults"),
}
# An fp16 variant of a model that runs in bfloat16 rounds every Linear output and its residual stream to
# bfloat16: 8 bits of mantissa, as NF4's bfloat16 compute, against float16's 11. Its defaults are NF4's,
# whose consistency noise is that rounding (NF4 with float32 compute is as quiet as fp16,
# docs/calibration.md). ASSUMED from NF4's calibration, not measured on a trained bfloat16 model yet.
BFLOAT16_TOLERANCE = Tolerance(mean_abs_dlogp=0.12, max_abs_dlogp=0.35, tie_gap=0.75, max_margin_shift=0.75,
                               source="fp16 in bfloat16 defaults")
IN_BFLOAT16 = " in bfloat16"


def builtin_tolerances(half: str = "float16") -> dict[str, Tolerance]:
    """The built-in defaults for a model whose fp16 variants run in ``half`` (``HalfPrecision.dtype``)."""
    return {**DEFAULT_TOLERANCES, "fp16": BFLOAT16_TOLERANCE} if half == "bfloat16" else dict(DEFAULT_TOLERANCES)


def builtin_of(tol: Tolerance) -> tuple[str, Tolerance]:
    """The built-in default a tolerance was layered on, with its name (``fp16``, ``fp16 in bfloat16``, ``nf4``)."""
    head = tol.source.split(" (")[0]
    if head.startswith("nf4"):
        return "nf4", DEFAULT_TOLERANCES["nf4"]
    if IN_BFLOAT16 in head:
        return "fp16" + IN_BFLOAT16, BFLOAT16_TOLERANCE
    return "fp16", DEFAULT_TOLERANCES["fp16"]


# Goldens of another device class (GPU vs CPU kernels, other accumulation orders) are judged
# with every bound scaled by this. ASSUMED, not measured: no GPU run has measured it yet, and
# every message that uses it says so. The one definition: flat tolerances (``NoiseModel.tolerance``),
# recorded allowances (``recorded_allowance(cross_device=True)``) and fingerprint thresholds use it.
CROSS_DEVICE_FACTOR = 3.0
CROSS_DEVICE_LABEL = f"cross-device x{CROSS_DEVICE_FACTOR:g} (assumed, not measured)"


@dataclass(frozen=True)
class NoiseModel:
    """Tolerances per variant: its own entry, else its quantization's (LoRA uses its base's)."""

    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: dict(DEFAULT_TOLERANCES))
    cross_device_factor: float = CROSS_DEVICE_FACTOR

    def tolerance(self, variant_key: str | None, *, cross_device: bool = False) -> Tolerance:
        key = variant_key or "fp16"
        quant = key.split("-")[0]
        tol = self.tolerances.get(key) or self.tolerances.get(quant) or DEFAULT_TOLERANCES.get(quant) \
            or DEFAULT_TOLERANCES["nf4"]
        if not tol.source:
            tol = replace(tol, source=key)
        if cross_device:
            f = self.cross_device_factor
            tol = replace(tol, mean_abs_dlogp=tol.mean_abs_dlogp * f, max_abs_dlogp=tol.max_abs_dlogp * f,
                          tie_gap=tol.tie_gap * f, source=f"{tol.source}, {CROSS_DEVICE_LABEL}",
                          max_margin_shift=None if tol.max_margin_shift is None else tol.max_margin_shift * f)
        return tol

    def overridden(self, override: Mapping[str, Any] | None, *, where: str = "suite") -> NoiseModel:
        """A copy with a suite's or check's ``tolerance:`` applied, field by field.

        ``override`` is flat (``{mean_abs_dlogp: .., tie_gap: ..}``, any subset, for every
        variant), keyed by quantization or variant (``{nf4: {...}, fp16-lora: {...}}``), or
        both; per field the most specific wins (variant over quantization over flat) and fields
        not given keep what the layer below had. ``where`` names the layer in reports.
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
            if not values:
                table[key] = base
                continue
            named = sorted(set(base.where) | set(values))
            label = key + (IN_BFLOAT16 if IN_BFLOAT16 in base.source.split(" (")[0] else "")
            table[key] = replace(base, **values, where={**base.where, **{k: where for k in values}},
                                 source=f"{label} ({', '.join(named)} set in {_places(base.where, values, where)})")
        return NoiseModel(tolerances=table, cross_device_factor=self.cross_device_factor)


def _places(before: Mapping[str, str], values: Mapping[str, Any], where: str) -> str:
    places = {v for k, v in before.items() if k not in values} | {where}
    return " and ".join(sorted(places))


def _at_most_max_nats(value: float | None) -> float | None:
    if value is not None and value > MAX_NATS:
        raise ValueError(f"at most {MAX_NATS:g} nats: no numerical noise moves a log-probability that far, so a "
                         "larger tolerance would turn the check off; measure this model's noise with "
                         "harness-calibrate, or remove the check on purpose")
    return value


Nats = Annotated[float | None, AfterValidator(_at_most_max_nats)]


def tolerance_problem(values: Mapping[str, float]) -> str | None:
    """Why ``values`` (mean_abs_dlogp, max_abs_dlogp, tie_gap, max_margin_shift) cannot be a suite's tolerance.

    A recommendation is validated through the suite's own model, so the calibrator never prints a
    value a suite would refuse (``tie_gap: 1600`` from a huge ``--safety``).
    """
    over = {key: value for key, value in values.items() if value > MAX_NATS}
    if over:
        key, value = next(iter(over.items()))
        return (f"{key} = {value:g} is above {MAX_NATS:g} nats, the largest tolerance a suite accepts "
                "(a log-probability that moves that far is another answer, not noise)")
    try:
        ToleranceValues.model_validate(dict(values), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where} = {err.get('input')!r}: {err['msg']}"
    return None


def _defaults(name: str) -> str:
    """A field's built-in defaults, for the suite reference: ``fp16 default 0.017, nf4 0.12``."""
    return ", ".join(f"{key} default {getattr(tol, name):g}" for key, tol in DEFAULT_TOLERANCES.items())


# The suite reference's words for ``tolerance:``, the same on every kind that takes one.
TOLERANCE_HELP = (f"How far a run may differ from what it is judged against, in nats of log-probability (at most "
                  f"{MAX_NATS:g}): any subset of the fields, flat or per variant; unset fields keep the suite's "
                  "`defaults: tolerance:`, then the built-in defaults. A golden that records its own noise is "
                  "judged against that record; fields set here override it.")


class ToleranceValues(BaseModel):
    """Bounds a suite may set, in nats (any subset); those not set keep the layer below: the suite's defaults,
    then the built-in ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mean_abs_dlogp: Nats = Field(None, gt=0, allow_inf_nan=False, description=(
        f"Mean |Δ log p| of the chosen tokens over a run, in nats ({_defaults('mean_abs_dlogp')})."))
    max_abs_dlogp: Nats = Field(None, gt=0, allow_inf_nan=False, description=(
        f"|Δ log p| of a chosen token at any one step, in nats ({_defaults('max_abs_dlogp')})."))
    tie_gap: Nats = Field(None, ge=0, allow_inf_nan=False, description=(
        "A different token is accepted as a near-tie where the recorded top-2 gap was at most this "
        f"({_defaults('tie_gap')}); 0 accepts no flip."))
    max_margin_shift: Nats = Field(None, gt=0, allow_inf_nan=False, description=(
        "How far the gap between the chosen token and its runner-up may move at a step (default: tie_gap)."))


class ToleranceSpec(ToleranceValues):
    """``tolerance:`` in a suite's ``defaults:`` or on a check: flat (every variant) or per variant.

    A variant's own entry wins over its quantization's (``nf4-lora`` over ``nf4``),
    which wins over the flat values.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    fp16: ToleranceValues | None = Field(None, description="Values for the fp16 and fp16-lora variants.")
    nf4: ToleranceValues | None = Field(None, description="Values for the nf4 and nf4-lora variants.")
    fp16_lora: ToleranceValues | None = Field(None, alias="fp16-lora", description="Values for fp16-lora only.")
    nf4_lora: ToleranceValues | None = Field(None, alias="nf4-lora", description="Values for nf4-lora only.")

    def as_override(self) -> dict[str, Any]:
        override: dict[str, Any] = {k: getattr(self, k) for k in TOLERANCE_FIELDS if getattr(self, k) is not None}
        for key in ("fp16", "nf4", "fp16-lora", "nf4-lora"):
            values = getattr(self, key.replace("-", "_"))
            if values is not None:
                override[key] = values.model_dump(exclude_none=True)
        return override


def layered(suite: ToleranceSpec | None, check: ToleranceSpec | None, *, suite_where: str = "the suite's defaults",
            check_where: str = "the check", half: str = "float16") -> NoiseModel:
    """The defaults for a model running in ``half``, then a suite's ``defaults: tolerance:``, then a check's
    ``tolerance:``, field by field."""
    model = NoiseModel(tolerances=builtin_tolerances(half))
    if suite is not None:
        model = model.overridden(suite.as_override(), where=suite_where)
    if check is not None:
        model = model.overridden(check.as_override(), where=check_where)
    return model
