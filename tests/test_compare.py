"""The comparison engine on hand-built observations: pure logic, no model."""

from __future__ import annotations

import math

import pytest

from harness.judge.compare import compare, compare_distributions
from harness.judge.tolerance import NoiseModel, Tolerance, ToleranceSpec
from harness.observe.observation import Observation, Step, from_trace, to_trace

TOL = Tolerance(mean_abs_dlogp=0.01, max_abs_dlogp=0.05, tie_gap=0.1, source="test")


def step(token: int, lp: float, *alts: tuple[int, float]) -> Step:
    top = tuple(sorted([(token, lp), *alts], key=lambda e: -e[1]))
    return Step(token_id=token, logprob=lp, top=top)


def obs(*steps: Step, stop: str = "length") -> Observation:
    return Observation(prompt_ids=(1, 2), steps=tuple(steps), stop=stop)  # type: ignore[arg-type]


def path(*ids: int, lp: float = -0.5, shift: float = 0.0) -> tuple[Step, ...]:
    return tuple(step(t, lp + shift, (t + 1000, lp - 2.0)) for t in ids)


def test_identical_paths_within_noise_pass_with_stats():
    golden = obs(*path(5, 6, 7))
    verdict = compare(golden, obs(*path(5, 6, 7, shift=0.004)), TOL)
    assert verdict.ok and not verdict.accepted_ties
    assert verdict.stats["steps_compared"] == 3
    assert verdict.stats["mean_abs_dlogp"] == pytest.approx(0.004)


def test_sub_token_drift_fails_with_the_mean_and_tolerance_named():
    golden = obs(*path(*range(5, 21)))  # 16 steps: the length the mean bound was calibrated at
    verdict = compare(golden, obs(*path(*range(5, 21), shift=0.03)), TOL)
    assert not verdict.ok
    assert verdict.reasons == (
        "mean |Δ log p| 0.03 over 16 steps > tolerance 0.01 for test: the chosen tokens' probabilities moved "
        "beyond numerical noise",
    )


def test_a_mean_over_few_steps_is_bounded_by_its_spread_not_the_long_path_bound():
    """A mean over one step is a per-step bound: it may not be 4x tighter than the per-step bound."""
    one = compare(obs(*path(5)), obs(*path(5, shift=0.03)), TOL)
    assert one.ok, one.reasons  # 0.03: above the 16-step mean bound 0.01, within the per-step 0.05
    four = compare(obs(*path(5, 6, 7, 8)), obs(*path(5, 6, 7, 8, shift=0.03)), TOL)
    assert not four.ok and "tolerance 0.02 for test" in four.reasons[0]  # 0.01 x sqrt(16 / 4)


def test_one_step_beyond_the_per_step_bound_fails_even_when_the_mean_is_small():
    steps = list(path(*range(10, 30)))
    moved = list(steps)
    moved[7] = step(17, -0.5 - 0.08, (1017, -2.5))
    verdict = compare(obs(*steps), obs(*moved), TOL)
    assert not verdict.ok
    assert verdict.stats["mean_abs_dlogp"] < TOL.mean_abs_dlogp
    assert verdict.reasons == ("|Δ log p| 0.08 at step 7 > per-step tolerance 0.05 for test",)


def test_near_tie_is_accepted_reported_and_the_remainder_teacher_forced():
    golden = obs(step(5, -0.50), step(6, -0.70, (9, -0.73)), step(7, -0.2), step(8, -0.3))
    actual = obs(step(5, -0.50), step(9, -0.69, (6, -0.72)), step(4, -0.1))
    calls: list[list[int]] = []

    def rescore(ids: list[int]) -> tuple[Step, ...]:
        calls.append(ids)
        return (step(5, -0.50), step(6, -0.72, (9, -0.69)), step(7, -0.205), step(8, -0.302))

    verdict = compare(golden, actual, TOL, rescore=rescore)
    assert verdict.ok, verdict.reasons
    assert calls == [[5, 6, 7, 8]]
    (tie,) = verdict.accepted_ties
    assert (tie.step, tie.expected_id, tie.got_id) == (1, 6, 9)
    assert tie.gap_expected == pytest.approx(0.03) and tie.gap_actual == pytest.approx(0.03)
    assert tie.describe("capital-raw[nf4-lora]").startswith("accepted near-tie at step 1 of capital-raw[nf4-lora], gap 0.03")
    # every step judged on the golden's token, the tie's included
    assert verdict.stats["steps_compared"] == 4


def test_teacher_forced_remainder_that_drifted_fails_after_an_accepted_tie():
    golden = obs(step(5, -0.50), step(6, -0.70, (9, -0.73)), step(7, -0.2), step(8, -0.3))
    actual = obs(step(5, -0.50), step(9, -0.69, (6, -0.72)), step(4, -0.1))

    def rescore(ids: list[int]) -> tuple[Step, ...]:
        return (step(5, -0.50), step(6, -0.72, (9, -0.69)), step(7, -0.9, (3, -0.95)), step(8, -0.3))

    verdict = compare(golden, actual, TOL, rescore=rescore)
    assert not verdict.ok and len(verdict.accepted_ties) == 1
    assert any("|Δ log p| 0.7 at step 2 > per-step tolerance" in r for r in verdict.reasons)


def test_teacher_forced_remainder_where_the_model_prefers_another_token_by_far_fails():
    golden = obs(step(5, -0.50, (9, -0.52)), step(7, -0.2, (3, -3.0)))
    actual = obs(step(9, -0.49, (5, -0.51)))

    def rescore(ids: list[int]) -> tuple[Step, ...]:
        return (step(5, -0.51, (9, -0.49)), Step(7, -0.2, ((3, 0.0), (7, -0.2))))

    verdict = compare(golden, actual, TOL, rescore=rescore)
    assert not verdict.ok
    assert "at new token 1 this model prefers token#3" in verdict.reasons[0]
    assert "not a near-tie, a real change" in verdict.reasons[0]


def test_non_tie_divergence_fails_with_both_gaps():
    golden = obs(step(5, -0.1, (9, -2.4)))
    actual = obs(step(9, -0.3, (5, -1.6)))
    verdict = compare(golden, actual, TOL)
    assert not verdict.ok and not verdict.accepted_ties
    (reason,) = verdict.reasons
    assert reason.startswith("greedy output diverges at new token 0: expected token#5")
    assert "log-prob gap 2.300 in the golden and 1.300 in this run: a gap of 2.3 is not below the tie tolerance 0.1" in reason


def test_a_tie_in_one_run_only_is_not_a_tie():
    golden = obs(step(5, -0.60, (9, -0.62)))  # a tie in the golden
    actual = obs(step(9, -0.1, (5, -2.5)))  # but not in this run
    assert not compare(golden, actual, TOL, rescore=lambda ids: ()).ok


def test_a_token_outside_the_other_top_k_is_never_a_tie():
    golden = obs(step(5, -0.60, (8, -0.62)))
    actual = obs(step(9, -0.6, (5, -0.61)))
    verdict = compare(golden, actual, TOL)
    assert not verdict.ok and "is not in the golden's top-2" in verdict.reasons[0]


def test_exact_match_accepts_no_tie():
    golden = obs(step(5, -0.60, (9, -0.61)))
    actual = obs(step(9, -0.60, (5, -0.61)))
    assert compare(golden, actual, TOL, rescore=lambda ids: (step(5, -0.61, (9, -0.60)),)).ok
    assert not compare(golden, actual, Tolerance(0.01, 0.05, 0.0), rescore=lambda ids: ()).ok


@pytest.mark.parametrize("golden_len, actual_len, word", [(4, 2, "earlier"), (2, 4, "later")])
def test_stopping_earlier_or_later_is_a_divergence_not_a_truncation(golden_len, actual_len, word):
    golden = obs(*path(*range(golden_len)), stop="eos" if golden_len < actual_len else "length")
    actual = obs(*path(*range(actual_len)), stop="eos" if actual_len < golden_len else "length")
    verdict = compare(golden, actual, TOL)
    assert not verdict.ok
    assert f"this run stops {word} than the golden" in verdict.reasons[0]
    assert f"divergence at step {min(golden_len, actual_len)}" in verdict.reasons[0]


def test_same_tokens_with_another_stop_reason_fail():
    verdict = compare(obs(*path(1, 2), stop="eos"), obs(*path(1, 2), stop="length"), TOL)
    assert not verdict.ok and "the stopping rule" in verdict.reasons[0]


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_nan_and_inf_are_named_never_passed(bad):
    golden = obs(*path(1, 2, 3))
    steps = list(path(1, 2, 3))
    steps[1] = Step(2, bad, ())
    verdict = compare(golden, obs(*steps), Tolerance(1e9, 1e9, 1e9))
    assert not verdict.ok
    word = "NaN" if math.isnan(bad) else "infinite"
    assert word in verdict.reasons[0] and "step 1" in verdict.reasons[0]


def test_distributions_pass_within_noise_and_name_nan_rows():
    import torch

    ref = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.0]]), dim=-1)
    assert compare_distributions(ref, ref + 0.001, TOL, top_k=3).ok
    got = ref.clone()
    got[1] = float("nan")
    verdict = compare_distributions(ref, got, Tolerance(1e9, 1e9, 1e9), labels=["a", "b"], top_k=3)
    assert not verdict.ok
    assert verdict.reasons[0].startswith("b: this run has NaN log-probabilities (4 of 4 entries)")


def test_distributions_reject_a_moved_row_and_accept_a_reported_tie():
    import torch

    ref = torch.log_softmax(torch.tensor([[2.0, 1.99, 0.0, -1.0], [3.0, 0.0, 0.0, 0.0]]), dim=-1)
    got = torch.log_softmax(torch.tensor([[1.99, 2.0, 0.0, -1.0], [3.0, 0.0, 0.0, 0.0]]), dim=-1)
    verdict = compare_distributions(ref, got, TOL, top_k=3)
    assert verdict.ok and [t.step for t in verdict.accepted_ties] == [0]
    moved = torch.log_softmax(torch.tensor([[2.0, 1.99, 0.0, -1.0], [1.0, 2.5, 0.0, 0.0]]), dim=-1)
    verdict = compare_distributions(ref, moved, TOL, labels=["x", "y"], top_k=3)
    assert not verdict.ok
    assert any(r.startswith("y: the best token changes from token#0 to token#1") for r in verdict.reasons)


def test_noise_model_per_quantization_lora_uses_its_base_and_cross_device_scales():
    noise = NoiseModel(tolerances={"fp16": Tolerance(0.01, 0.05, 0.1), "nf4": Tolerance(0.1, 0.5, 0.4)},
                       cross_device_factor=2.0)
    assert noise.tolerance("nf4-lora").max_abs_dlogp == 0.5
    assert noise.tolerance("fp16-lora").tie_gap == 0.1
    cross = noise.tolerance("fp16", cross_device=True)
    assert (cross.mean_abs_dlogp, cross.max_abs_dlogp, cross.tie_gap) == (0.02, 0.1, 0.2)
    assert "cross-device" in cross.source


def test_tolerance_overrides_flat_then_quantization_then_variant():
    spec = ToleranceSpec.model_validate({"tie_gap": 0.2, "nf4": {"max_abs_dlogp": 0.9},
                                         "nf4-lora": {"mean_abs_dlogp": 0.3}})
    noise = NoiseModel(tolerances={"fp16": Tolerance(0.01, 0.05, 0.1), "nf4": Tolerance(0.1, 0.5, 0.4)})
    noise = noise.overridden(spec.as_override())
    assert noise.tolerance("fp16").tie_gap == 0.2
    lora = noise.tolerance("nf4-lora")
    assert (lora.mean_abs_dlogp, lora.max_abs_dlogp, lora.tie_gap) == (0.3, 0.9, 0.2)
    assert noise.tolerance("nf4").mean_abs_dlogp == 0.1
    with pytest.raises(ValueError):
        ToleranceSpec.model_validate({"max_abs_dlogp": -1})
    with pytest.raises(ValueError):
        ToleranceSpec.model_validate({"int8": {"tie_gap": 1}})


def test_trace_round_trip():
    original = obs(step(5, -0.25, (9, -0.27), (3, -4.0)), step(7, -0.1, (2, -3.0)))
    lines = to_trace(original)
    assert lines[0] == "5 -0.2500 | 9 -0.2700 | 3 -4.0000"
    back = from_trace(lines, top_k=3)
    assert back == original.steps


def test_generation_setting_changes_are_named_and_eos_int_equals_list():
    from harness.judge.greedy import setting_changes

    assert setting_changes({"eos_token_id": 2}, {"eos_token_id": [2]}) == []
    (line,) = setting_changes({"eos_token_id": [2]}, {"eos_token_id": [2], "no_repeat_ngram_size": 3})
    assert line.startswith("generation setting no_repeat_ngram_size changed: golden None, this run 3")
