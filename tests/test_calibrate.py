"""harness-calibrate and the attn_implementation key: noise statistics, recommendations, round trip."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from harness.judge.tolerance import Tolerance
from harness.errors import SuiteError
from harness.judge.noise import Noise, judge, measure, recommend
from harness.observe.observation import Observation, Step
from harness.models.registry import load_registry

REPO = Path(__file__).resolve().parents[1]

CAPITAL_SUITE = """\
suite: cal
checks:
  - id: capital
    kind: greedy
    prompt: "The capital of France is"
    max_new_tokens: 4
"""


def _step(token: int, *top: tuple[int, float]) -> Step:
    lp = dict(top)[token]
    return Step(token, lp, tuple(sorted(top, key=lambda t: -t[1])))


# -- pure logic -------------------------------------------------------------------------------
def test_measure_reports_delta_per_item_and_flips_with_both_gaps():
    ref = [(_step(5, (5, -0.10), (7, -0.30)), _step(8, (8, -0.05), (9, -3.0)))]
    got = [(_step(5, (5, -0.20), (7, -0.15)), _step(8, (8, -0.07), (9, -2.9)))]
    noise = measure("eager", ["a"], ref, got)
    assert noise.items["a"].max_abs_dlogp == pytest.approx(0.10)
    assert noise.items["a"].mean_abs_dlogp == pytest.approx((0.10 + 0.02) / 2)
    (flip,) = noise.flips
    assert (flip.step, flip.expected, flip.got) == (0, 5, 7)
    assert flip.gap_reference == pytest.approx(0.20) and flip.gap_condition == pytest.approx(0.05)
    # margin 0.2 in the reference became -0.05: a shift of 0.25
    assert noise.max_gap_shift == pytest.approx(0.25)


def test_measure_counts_nan_steps_instead_of_averaging_them():
    ref = [(_step(5, (5, -0.1), (7, -0.3)),)]
    got = [(Step(5, math.nan, ()),)]
    noise = measure("fp16 overflow", ["a"], ref, got)
    assert noise.nonfinite == 1 and noise.flips == []


def test_recommendation_is_observed_times_safety_with_floors_and_covers_margin_shifts():
    quiet = Noise("threads")
    loud = measure("eager", ["a", "b"],
                   [(_step(5, (5, -0.1), (7, -0.5)),), (_step(5, (5, -0.1), (7, -0.5)),)],
                   [(_step(5, (5, -0.13), (7, -0.4)),), (_step(5, (5, -0.1), (7, -0.5)),)])
    rec = recommend([quiet, loud], safety=3.0, floors={"mean_abs_dlogp": 0.001, "max_abs_dlogp": 0.001,
                                                        "tie_gap": 0.001})
    assert rec.max_abs_dlogp == pytest.approx(0.09)       # 0.03 x 3
    assert rec.mean_abs_dlogp == pytest.approx(0.09)      # worst item's mean (item a), not the mean over items
    assert rec.tie_gap == pytest.approx(0.39)             # margin 0.4 -> 0.27: shift 0.13 x 3
    floored = recommend([quiet], safety=3.0)
    assert floored.as_tolerance() == {"mean_abs_dlogp": 0.01, "max_abs_dlogp": 0.05, "tie_gap": 0.05,
                                      "max_margin_shift": 0.05}
    assert rec.max_margin_shift == pytest.approx(0.39)


def test_judge_accepts_a_near_tie_but_not_a_real_change():
    ref = Observation((1, 2), (_step(5, (5, -0.60), (7, -0.80)), _step(8, (8, -0.1), (9, -3.0))), "length")
    tie = (_step(5, (5, -0.70), (7, -0.65)), _step(8, (8, -0.1), (9, -3.0)))
    real = (_step(5, (5, -2.0), (7, -0.2)), _step(8, (8, -0.1), (9, -3.0)))
    tol = Tolerance(mean_abs_dlogp=0.5, max_abs_dlogp=0.5, tie_gap=0.3)
    assert judge(ref, tie, tol).ok and len(judge(ref, tie, tol).accepted_ties) == 1
    verdict = judge(ref, real, tol)
    assert not verdict.ok and "not a near-tie" in verdict.reasons[0]


def test_registry_attn_implementation_is_validated_with_a_suggestion(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("default: m\nmodels:\n  m:\n    hub: org/m\n    attn_implementation: eagre\n")
    with pytest.raises(SuiteError) as info:
        load_registry(path)
    message = str(info.value)
    assert ":5: models.m.attn_implementation:" in message and "did you mean 'eager'?" in message
    path.write_text("default: m\nmodels:\n  m:\n    hub: org/m\n    attn_implementation: kernels-community/flash-attn\n")
    assert load_registry(path).models["m"].attn_implementation == "kernels-community/flash-attn"


# -- on the real embedded model -------------------------------------------------------------------
def test_pool_loads_the_requested_kernel_and_the_option_overrides_the_registry(embedded_model_dir):
    from harness.models.devices import pick_device
    from harness.models.pool import ModelPool
    from harness.models.registry import ModelEntry
    from harness.models.sources import ResolvedModel
    from harness.models.variants import VariantSpec

    entry = ModelEntry(path=str(embedded_model_dir), attn_implementation="eager")
    resolved = ResolvedModel("m", embedded_model_dir, entry, "test", None)
    fp16 = VariantSpec("fp16", False)
    assert ModelPool(resolved, pick_device("cpu")).get(fp16).model.config._attn_implementation == "eager"
    override = ModelPool(resolved, pick_device("cpu"), attn_implementation="sdpa")
    assert override.get(fp16).model.config._attn_implementation == "sdpa"


def test_goldens_record_the_kernel_and_a_bad_option_is_a_usage_error(project):
    project.suite("cal", CAPITAL_SUITE.replace("max_new_tokens: 4", "max_new_tokens: 2"))
    registry = project.path / "models.yaml"
    registry.write_text(registry.read_text().replace("    chat: true\n    adapter:", "    chat: true\n"
                                                     "    attn_implementation: eager\n    adapter:", 1))
    result = project.run("--variants", "fp16", "--snapshot-update")
    assert result.ret == 0, result.stdout.str()[-2000:]
    meta = project.golden / "smollm2-135m/cpu/fp16/cal/capital.meta.json"
    assert json.loads(meta.read_text())["attn_implementation"] == "eager"
    result = project.run("--variants", "fp16", "--snapshot-update", "--attn-implementation", "sdpa")
    assert result.ret == 0 and json.loads(meta.read_text())["attn_implementation"] == "sdpa"
    bad = project.run("--variants", "fp16", "--attn-implementation", "flash")
    assert bad.ret == 4
    bad.stderr.fnmatch_lines(["*--attn-implementation: unknown attention implementation 'flash'*"])


def test_calibration_recommends_a_tolerance_the_suite_takes_and_passes_under_eager(project):
    from harness.calibrate.run import main

    suite = project.suite("cal", CAPITAL_SUITE)
    out = project.path / "calib"
    code = main([str(project.path / "suites"), "--registry", str(project.path / "models.yaml"),
                 "--variants", "fp16", "--device", "cpu", "--conditions", "kernels,cache", "--out", str(out)])
    assert code == 0
    result = json.loads((out / "calibration.json").read_text())
    fp16 = result["variants"]["fp16"]
    assert [c["condition"] for c in fp16["conditions"]] == ["no KV cache (one forward pass)", "attn=eager"]
    assert all(c["steps"] == 4 for c in fp16["conditions"])
    rec = fp16["recommendation"]
    assert rec["mean_abs_dlogp"] >= 0.01 and rec["max_abs_dlogp"] >= 0.05  # floors
    assert not fp16["conditions"][1]["failed"]["recommended"], "eager fails its own calibration"
    snippet = (out / "tolerance.yaml").read_text()
    assert "defaults:\n  tolerance:\n    fp16: {mean_abs_dlogp: " in snippet
    suite.write_text(CAPITAL_SUITE + snippet)
    recorded = project.run("--variants", "fp16", "--snapshot-update")
    assert recorded.ret == 0, recorded.stdout.str()[-2000:]
    judged = project.run("--variants", "fp16", "--attn-implementation", "eager")
    assert judged.ret == 0, judged.stdout.str()[-3000:]
    assert judged.parseoutcomes()["passed"] == 1


def test_calibration_runs_on_another_architecture(embedded_model_dir, tmp_path, capsys):
    from harness.calibrate.run import main

    spec = importlib.util.spec_from_file_location("other_model", REPO / "tests" / "test_other_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module._tiny_qwen2(tmp_path / "tiny-qwen2", embedded_model_dir)
    code = main([str(REPO / "suites" / "generation.yaml"), "--registry", str(REPO / "models.yaml"),
                 "--model", str(model), "--variants", "fp16", "--device", "cpu", "--max-prompts", "2",
                 "--max-new-tokens", "3", "--conditions", "batch,cache,threads"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "# Calibration: tiny-qwen2 on CPU" in printed and "| padded batch | 6 |" in printed
    assert "    fp16: {mean_abs_dlogp: " in printed
