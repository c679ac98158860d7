"""The bounds a tolerance must respect wherever it comes from: a suite, or ``harness-calibrate``'s advice.

Suites validate ``tolerance:`` with ``harness.judge.tolerance.ToleranceValues``; a recommendation
is validated through the same model, so the calibrator never prints a value a suite
would refuse (``tie_gap: 1600`` from a huge ``--safety``). A log-probability that
moves by more than ``MAX_TOLERANCE_NATS`` is a different answer, not noise.
"""

from __future__ import annotations

from collections.abc import Mapping

from harness.judge.tolerance import MAX_NATS as MAX_TOLERANCE_NATS


def tolerance_problem(values: Mapping[str, float]) -> str | None:
    """Why ``values`` (mean_abs_dlogp, max_abs_dlogp, tie_gap, max_margin_shift) cannot be a suite's tolerance."""
    from pydantic import ValidationError

    from harness.judge.tolerance import ToleranceValues

    over = {key: value for key, value in values.items() if value > MAX_TOLERANCE_NATS}
    if over:
        key, value = next(iter(over.items()))
        return (f"{key} = {value:g} is above {MAX_TOLERANCE_NATS:g} nats, the largest tolerance a suite accepts "
                "(a log-probability that moves that far is another answer, not noise)")
    try:
        ToleranceValues.model_validate(dict(values), strict=True)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where} = {err.get('input')!r}: {err['msg']}"
    return None
