"""Cross-device noise as a measured factor: another class's goldens scored here, over same-device noise."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from harness.judge.noise import ItemNoise, Noise
from harness.observe.observation import Step


def _noise(condition: str, mean: float, high: float, shift: float, per_item: dict[str, float] | None = None) -> Noise:
    items = {name: ItemNoise(10, value, high, 0) for name, value in (per_item or {"a": mean}).items()}
    return Noise(condition, items=items, max_gap_shift=shift)


def test_factors_are_ratios_to_the_worst_same_device_condition() -> None:
    from harness.judge.tolerance import Tolerance
    from harness.calibrate.crossdevice import factors

    same = [_noise("repeat", 0.0, 0.0, 0.0), _noise("attn=eager", 0.004, 0.02, 0.05, {"a": 0.004, "b": 0.002})]
    cross = _noise("cross", 0.012, 0.05, 0.1, {"a": 0.012, "b": 0.006})
    builtin = Tolerance(mean_abs_dlogp=0.017, max_abs_dlogp=0.071, tie_gap=0.22)
    f = factors(cross, same, builtin=builtin, safety=3.0)
    assert f["ratio_to_same_device"] == {"mean_abs_dlogp": 3.0, "max_abs_dlogp": 2.5, "max_gap_shift": 2.0}
    assert f["ratio_to_same_device_max"] == 3.0
    assert f["per_prompt_mean_ratio"] == {"a": 3.0, "b": 3.0}
    # 3 x 0.012 / 0.017, 3 x 0.05 / 0.071, 3 x 0.1 / 0.22 (the margin bound is tie_gap when unset)
    assert f["needed_vs_builtin"]["mean_abs_dlogp"] == pytest.approx(2.118, abs=1e-3)
    assert f["needed_vs_builtin_max"] == f["needed_vs_builtin"]["mean_abs_dlogp"]
    assert f["same_device_conditions"] == ["repeat", "attn=eager"]


def test_no_same_device_noise_gives_no_ratio_rather_than_infinity() -> None:
    from harness.judge.tolerance import Tolerance
    from harness.calibrate.crossdevice import factors, summary_lines

    f = factors(_noise("cross", 0.01, 0.02, 0.03), [_noise("repeat", 0.0, 0.0, 0.0)],
                builtin=Tolerance(0.017, 0.071, 0.22), safety=3.0)
    assert f["ratio_to_same_device"]["mean_abs_dlogp"] is None and f["ratio_to_same_device_max"] is None
    cross = {"factors": f, "steps": 10, "prompts": 1, "builtin_factor": 3.0, "failed_at_builtin": {}}
    line = summary_lines("m", "cuda", "cpu", {"fp16": {"cross_device": cross}, "nf4": {"skipped": "no NF4"}})
    assert line[0] == "MEASURED CROSS-DEVICE FACTOR: cpu goldens of m judged on cuda"
    assert "mean |Δ log p| xn/a" in line[1] and line[2] == "  nf4: not measured (no NF4)"


def _golden(path: Path, ids: list[int], prompt_tokens: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    trace = [f"{t} -0.5000 | {t + 1} -1.5000 # 'x' 'y'" for t in ids]
    path.write_text(json.dumps({"format": 2, "text": "", "new_token_ids": ids, "prompt_tokens": prompt_tokens,
                                "max_new_tokens": len(ids), "stop": "length", "generation": {"eos_token_id": [0]},
                                "top_k": 2, "trace": trace}))


def test_golden_paths_compare_only_what_can_be_compared(tmp_path: Path) -> None:
    from harness.calibrate.crossdevice import golden_paths
    from harness.judge.noise import Item

    root = tmp_path / "golden"
    _golden(root / "m" / "cpu" / "fp16" / "gen" / "ok.json", [5, 6, 7], prompt_tokens=2)
    _golden(root / "m" / "cpu" / "fp16" / "gen" / "other-prompt.json", [5], prompt_tokens=9)
    items = [Item("gen::ok", (1, 2), 2), Item("gen::other-prompt", (1, 2), 1), Item("gen::missing", (1,), 1)]
    found, skipped = golden_paths(items, root=root, model="m", device_class="cpu", variant="fp16")
    assert [p.item for p in found] == [Item("gen::ok", (1, 2), 3)]  # the golden's whole path, not the cap
    assert found[0].reference.steps[0] == Step(5, -0.5, ((5, -0.5), (6, -1.5)))
    assert "encodes to 2 tokens here and to 9" in skipped["gen::other-prompt"]
    assert skipped["gen::missing"].startswith("no golden at")


def test_calibrate_refuses_its_own_class_and_a_missing_one(tmp_path: Path) -> None:
    from harness.calibrate.calibration import _cross_device
    from harness.models.devices import Device

    class Resolved:
        name = "m"

    cpu = Device("cpu", "cpu", "CPU")
    args = argparse.Namespace(golden_device="cpu", golden_dir=str(tmp_path), registry="models.yaml")
    with pytest.raises(ValueError, match="this device's own class"):
        _cross_device(args, Resolved(), cpu)
    args.golden_device = "cuda-sm90"
    with pytest.raises(ValueError, match="no goldens of 'm' for that class"):
        _cross_device(args, Resolved(), cpu)
    (tmp_path / "m" / "cuda-sm90").mkdir(parents=True)
    assert _cross_device(args, Resolved(), cpu).golden_class == "cuda-sm90"
    args.golden_device = None
    assert _cross_device(args, Resolved(), cpu) is None
