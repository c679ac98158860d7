"""Per-golden allowances: recorded noise, dtype floors, the near-tie budget, honest overrides. No model."""

from __future__ import annotations

import json
import math

import pytest

from harness.judge.allowance import (
    FACTOR, NoiseRecordError, PathNoise, flat_allowance, flip_budget, recorded_allowance, ulp,
)
from harness.judge.compare import compare, top2_margin
from harness.observe.observation import Observation, Step
from harness.judge.flips import FlipLedger, flips_property
from harness.judge.tolerance import MAX_NATS, NoiseModel, Tolerance, ToleranceSpec, layered


def step(token: int, lp: float, *alts: tuple[int, float]) -> Step:
    top = tuple(sorted([(token, lp), *alts], key=lambda e: -e[1]))
    return Step(token_id=token, logprob=lp, top=top)


def obs(*steps: Step) -> Observation:
    return Observation(prompt_ids=(1,), steps=tuple(steps), stop="length")


def noise(n: int, *, dlogp: float = 0.01, margin: float = 0.03, score: float = 20.0,
          dtype: str = "float16") -> PathNoise:
    return PathNoise(dlogp=(dlogp,) * n, margin=(margin,) * n, score=(score,) * n, logits_dtype=dtype,
                     conditions=("test",))


def tied_path(n: int, gap: float) -> tuple[Step, ...]:
    """n steps, each a near-tie: token t leads token t+1000 by ``gap``."""
    return tuple(step(t, -0.69, (t + 1000, -0.69 - gap)) for t in range(10, 10 + n))


def flipped(steps: tuple[Step, ...], at: set[int], gap: float) -> tuple[Step, ...]:
    """The same path scored by a model that prefers the runner-up at ``at`` by ``gap``."""
    out = []
    for i, s in enumerate(steps):
        runner = s.top[1][0]
        out.append(step(s.token_id, -0.69 - gap, (runner, -0.69)) if i in at else s)
    return tuple(out)


def as_free_run(forced: tuple[Step, ...], golden: tuple[Step, ...]) -> Observation:
    """What free decoding gives: the forced steps until the first preference for another token."""
    out = []
    for f, g in zip(forced, golden):
        if f.best[0] != g.token_id:
            out.append(Step(f.best[0], f.best[1], f.top))
            break
        out.append(f)
    return obs(*out)


def judge(golden: tuple[Step, ...], forced: tuple[Step, ...], allowance) -> object:
    return compare(obs(*golden), as_free_run(forced, golden), allowance, rescore=lambda _ids: forced)


# -- the allowance itself --------------------------------------------------------------------
def test_ulp_is_the_dtype_rounding_at_the_scores_magnitude():
    assert ulp(20.0, "float16") == 2 ** -6 and ulp(20.0, "bfloat16") == 2 ** -3
    assert ulp(-3.0, "float16") == 2 ** -9


def test_recorded_bounds_follow_each_step_with_the_dtype_floor_and_pooling():
    record = PathNoise(dlogp=(0.001, 0.05, 0.001, 0.001), margin=(0.01, 0.2, 0.01, 0.01),
                       score=(20.0, 20.0, 20.0, 20.0), logits_dtype="float16", conditions=("test",))
    allowance = recorded_allowance(record)
    assert allowance.step_bound(1) == pytest.approx(FACTOR * 0.05)
    quiet = FACTOR * max(2 ** -6, 1.5 * (0.053 / 4))  # the fp16 floor at |score| 20, or the pooled mean
    assert allowance.step_bound(0) == pytest.approx(quiet)
    bf16 = recorded_allowance(PathNoise(**{**record.__dict__, "logits_dtype": "bfloat16"}))
    assert bf16.step_bound(0) == pytest.approx(FACTOR * 2 ** -3)  # a bfloat16 head rounds 8x coarser


def test_a_near_tie_couples_the_chosen_log_prob_to_its_margin_noise():
    record = noise(2, dlogp=0.001, margin=0.1)
    confident = recorded_allowance(record, chosen_logprobs=[-0.001, -0.001])
    tied = recorded_allowance(record, chosen_logprobs=[-0.69, -0.69])  # p = 0.5: d log p / d margin = 0.5
    assert tied.step_bound(0) == pytest.approx(FACTOR * 0.5 * 1.5 * 0.1, rel=0.01)  # half the pooled margin unit
    assert confident.step_bound(0) < tied.step_bound(0) / 2


def test_path_noise_round_trips_and_a_damaged_record_is_named():
    record = noise(3)
    assert PathNoise.from_json(json.loads(json.dumps(record.to_json()))).dlogp == pytest.approx(record.dlogp)
    for bad, words in [({"version": 9}, "format 9"), ({**record.to_json(), "steps": ["1 x 2"]}, "step 0"),
                       ({**record.to_json(), "steps": ["-1 0 2"]}, "negative"), ([], "not an object")]:
        with pytest.raises(NoiseRecordError, match=words):
            PathNoise.from_json(bad)


# -- the near-tie budget -----------------------------------------------------------------------
def test_flip_budget_is_the_tail_of_the_poisson_binomial_count():
    assert flip_budget([]) == 1  # one flip within its step's allowance is always noise's to make
    assert flip_budget([0.5] * 2) == 2
    assert flip_budget([0.5] * 13) in (10, 11)
    assert flip_budget([0.001] * 30) == 1


def test_flipping_every_fragile_step_of_a_golden_fails_and_one_benign_flip_passes():
    golden = tied_path(20, gap=0.02)  # 20 fragile steps: margins of 0.02 against recorded margin noise 0.03
    allowance = recorded_allowance(noise(20), chosen_logprobs=[s.logprob for s in golden])
    one = judge(golden, flipped(golden, {7}, gap=0.02), allowance)
    assert one.ok, one.reasons
    assert [t.step for t in one.accepted_ties] == [7]
    every = judge(golden, flipped(golden, set(range(20)), gap=0.02), allowance)
    assert not every.ok
    assert any("near-ties accepted in one golden" in r and "more than its noise explains" in r
               for r in every.reasons)
    assert every.stats["flip_budget"] < 20


def test_a_flip_at_a_step_the_golden_recorded_as_confident_is_not_noise():
    golden = tied_path(5, gap=0.02)[:2] + (step(50, -0.01, (51, -3.0)),) + tied_path(5, gap=0.02)[3:]
    allowance = recorded_allowance(noise(5), chosen_logprobs=[s.logprob for s in golden])
    forced = list(golden)
    forced[2] = step(50, -3.0, (51, -0.01))
    verdict = judge(golden, tuple(forced), allowance)
    assert not verdict.ok and "diverges at new token 2" in verdict.reasons[0]
    assert "more than the step's allowance" in verdict.reasons[0]


def test_the_margin_rule_applies_through_a_flip_too():
    """A margin that moves 0.4 fails without a flip; the same move through a flip fails as well."""
    tol = Tolerance(mean_abs_dlogp=0.5, max_abs_dlogp=0.5, tie_gap=0.5, max_margin_shift=0.22)
    golden = (step(5, -0.5, (6, -0.7)),)
    no_flip = compare(obs(*golden), obs(step(5, -0.5, (6, -1.1))), tol)
    assert not no_flip.ok and "margin between the chosen token and its runner-up moved by 0.4" in no_flip.reasons[0]
    through = compare(obs(*golden), obs(step(6, -0.5, (5, -0.7))), tol, rescore=lambda _ids: ())
    assert not through.ok and "moved by 0.4 through the flip" in through.reasons[0]


def test_the_flip_ledger_fails_a_group_whose_flips_together_exceed_its_noise():
    ledger = FlipLedger()
    for item in range(7):
        ledger.add(f"suites/g.yaml::p{item}[nf4]", flips_property("g[nf4]", 2, [0.2] * 5)[1])
    assert ledger.exceeded() and "14 near-ties accepted over 7 goldens" in ledger.exceeded()[0]
    calm = FlipLedger()
    calm.add("suites/g.yaml::p[nf4]", flips_property("g[nf4]", 1, [0.2] * 5)[1])
    assert calm.exceeded() == []
    assert calm.standing() == ["g[nf4]: 1 near-ties accepted over 1 passing goldens, budget 3 (the 1-in-100 tail of the "
                               "1 their recorded noise explains on average)"]


# -- exact and overrides ------------------------------------------------------------------------
def test_match_exact_passes_a_bit_identical_rerun_and_fails_any_flip():
    golden = (step(5, -0.25, (9, -0.2700)), step(7, -0.1, (2, -3.0)))
    rerun = (step(5, -0.25004, (9, -0.27004)), step(7, -0.10004, (2, -3.00004)))  # 4-decimal rounding
    exact = flat_allowance(Tolerance(0.017, 0.071, 0.0), 2, exact=True)
    assert compare(obs(*golden), obs(*rerun), exact).ok
    swapped = compare(obs(*golden), obs(step(9, -0.25, (5, -0.26))), exact, rescore=lambda _ids: golden)
    assert not swapped.ok and "match: exact accepts no flip" in swapped.reasons[0]


def test_check_tolerance_layers_over_the_suite_field_by_field_and_names_where():
    suite = ToleranceSpec.model_validate({"nf4": {"mean_abs_dlogp": 0.05, "max_abs_dlogp": 0.4, "tie_gap": 0.4}})
    check = ToleranceSpec.model_validate({"tie_gap": 0.2})
    nf4 = layered(suite, check, suite_where="suite defaults (g.yaml:3)", check_where="the check (g.yaml:9)") \
        .tolerance("nf4")
    assert (nf4.mean_abs_dlogp, nf4.max_abs_dlogp, nf4.tie_gap) == (0.05, 0.4, 0.2)
    assert nf4.where == {"mean_abs_dlogp": "suite defaults (g.yaml:3)", "max_abs_dlogp": "suite defaults (g.yaml:3)",
                         "tie_gap": "the check (g.yaml:9)"}
    assert layered(None, check).tolerance("fp16").mean_abs_dlogp == NoiseModel().tolerance("fp16").mean_abs_dlogp


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf, MAX_NATS + 0.01, 1000])
def test_absurd_tolerances_are_refused(value):
    with pytest.raises(ValueError):
        ToleranceSpec.model_validate({"tie_gap": value})


def test_a_widened_tolerance_is_listed_with_where_it_was_set():
    wide = layered(None, ToleranceSpec.model_validate({"max_abs_dlogp": 1.0}), check_where="the check (g.yaml:9)")
    flat = flat_allowance(wide.tolerance("fp16"), 5)
    assert flat.widened == ("max_abs_dlogp 1 (set in the check (g.yaml:9)) is wider than the fp16 default 0.071",)
    recorded = recorded_allowance(noise(5), overrides=wide.tolerance("fp16"))
    assert recorded.widened and "wider than the golden's recorded allowance at 5 of 5 steps" in recorded.widened[0]
    tight = layered(None, ToleranceSpec.model_validate({"max_abs_dlogp": 0.01})).tolerance("fp16")
    assert flat_allowance(tight, 5).widened == ()


def test_top2_margin_is_the_lead_over_the_best_other_token():
    assert top2_margin(step(5, -0.2, (6, -0.5))) == pytest.approx(0.3)
    assert top2_margin(Step(5, -0.2, ())) == math.inf
