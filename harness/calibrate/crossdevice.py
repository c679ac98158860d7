"""Cross-device noise, measured: another device class's goldens scored on this device.

A golden recorded on a CPU holds, per step, the chosen token's log-probability there. Forcing
this device's decoding along the golden's own tokens (teacher forcing, as calibration does)
gives the same statistics for the pair of devices: |Δ log p| per step, its mean per prompt,
how far top-2 margins moved, and the flips. Divided by the same-device noise measured in the
same run (attention kernels, a repeat, ...), it is the factor by which a golden's allowance
must grow when it is judged on another device class: the number that replaces a guessed
constant (``CROSS_DEVICE_FACTOR``) with a measured one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.judge.noise import FLOORS, Item, Noise, Scored, forced, judge, measure

STATISTICS = ("mean_abs_dlogp", "max_abs_dlogp", "max_gap_shift")
# tolerance field that bounds each statistic (the margin shift is bounded by max_margin_shift)
TOLERANCE_OF = {"mean_abs_dlogp": "mean_abs_dlogp", "max_abs_dlogp": "max_abs_dlogp", "max_gap_shift": "max_margin_shift"}


@dataclass(frozen=True)
class GoldenPath:
    """One prompt and the path another device class recorded for it."""

    item: Item
    reference: Any  # harness.observe.observation.Observation
    golden: Path


def golden_file(root: Path, *, model: str, device_class: str, variant: str, item_name: str) -> Path:
    """Where the greedy golden of ``suite::check`` (a calibration item's name) lives."""
    from harness.golden.layout import golden_path

    suite, _, check = item_name.partition("::")
    return golden_path(root, model=model, device_class=device_class, variant=variant, suite=suite, check_id=check)


def golden_paths(items: Sequence[Item], *, root: Path, model: str, device_class: str,
                 variant: str) -> tuple[list[GoldenPath], dict[str, str]]:
    """The recorded paths of ``items``, and why others cannot be compared (missing, other prompt)."""
    from harness.golden.greedy_format import GoldenFormatError, parse_golden

    found: list[GoldenPath] = []
    skipped: dict[str, str] = {}
    from harness.errors import GoldenError

    for item in items:
        try:
            path = golden_file(root, model=model, device_class=device_class, variant=variant, item_name=item.name)
        except GoldenError as exc:
            skipped[item.name] = str(exc)
            continue
        if not path.is_file():
            skipped[item.name] = f"no golden at {path}"
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            reference = parse_golden(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, GoldenFormatError) as exc:
            skipped[item.name] = f"{path}: {exc}"
            continue
        if data.get("prompt_tokens") != len(item.prompt_ids):
            skipped[item.name] = (f"the prompt encodes to {len(item.prompt_ids)} tokens here and to "
                                  f"{data.get('prompt_tokens')} in {path}: another tokenizer or prompt")
            continue
        if not reference.steps:
            skipped[item.name] = f"{path} holds no generated step"
            continue
        full = Item(item.name, item.prompt_ids, len(reference.steps))
        found.append(GoldenPath(full, reference, path))
    return found, skipped


def score_goldens(model: Any, tokenizer: Any, paths: Sequence[GoldenPath], *, label: str) -> tuple[Noise, list[Scored]]:
    """This device's scores of each golden's own tokens, against the golden's recorded ones."""
    items = [p.item for p in paths]
    scores = forced(model, tokenizer, items, [list(p.reference.token_ids) for p in paths])
    noise = measure(label, [p.item.name for p in paths], [p.reference.steps for p in paths], scores)
    return noise, scores


def _stat(noise: Noise, name: str) -> float:
    return float(getattr(noise, name))


def _ratio(numerator: float, denominator: float) -> float | None:
    if not math.isfinite(numerator) or denominator <= 1e-9:
        return None
    return round(numerator / denominator, 3)


def factors(cross: Noise, same: Sequence[Noise], *, builtin: Any, safety: float) -> dict[str, Any]:
    """How much larger the cross-device noise is, per statistic.

    - ``ratio_to_same_device``: cross-device statistic / the worst same-device condition's
      (measured in this run, on this device): the factor a golden's measured noise record
      must be multiplied by when another device class judges it;
    - ``needed_vs_builtin``: the tolerance calibration would recommend for the cross-device
      noise (statistic x safety, at least the floor) / the engine's built-in tolerance for
      the variant: the factor the built-in tolerance needs today;
    - per prompt, the ratio of its cross-device mean |Δ log p| to its own same-device mean.
    """
    finite_same = [n for n in same if not n.nonfinite]
    same_worst = {s: max((_stat(n, s) for n in finite_same), default=0.0) for s in STATISTICS}
    cross_values = {s: _stat(cross, s) for s in STATISTICS}
    ratio = {s: _ratio(cross_values[s], same_worst[s]) for s in STATISTICS}
    floors = {s: FLOORS[TOLERANCE_OF[s]] for s in STATISTICS}
    needed = {}
    for s in STATISTICS:
        bound = getattr(builtin, TOLERANCE_OF[s]) if s != "max_gap_shift" else builtin.margin_shift
        needed[s] = _ratio(max(floors[s], safety * cross_values[s]), bound)
    per_prompt: dict[str, float | None] = {}
    for name, item in cross.items.items():
        own = max((n.items[name].mean_abs_dlogp for n in finite_same if name in n.items), default=0.0)
        per_prompt[name] = _ratio(item.mean_abs_dlogp, own)
    known = [v for v in ratio.values() if v is not None]
    return {
        "cross_device": cross_values,
        "same_device_worst": same_worst,
        "same_device_conditions": [n.condition for n in finite_same],
        "ratio_to_same_device": ratio,
        "ratio_to_same_device_max": max(known) if known else None,
        "needed_vs_builtin": needed,
        "needed_vs_builtin_max": max((v for v in needed.values() if v is not None), default=None),
        "per_prompt_mean_ratio": per_prompt,
        "flips": len(cross.flips),
        "nonfinite": cross.nonfinite,
    }


def verdicts(paths: Sequence[GoldenPath], scores: Sequence[Scored], tolerance: Any) -> dict[str, str]:
    """The prompts the golden comparison would fail at ``tolerance`` (today's cross-device one)."""
    failed: dict[str, str] = {}
    for path, got in zip(paths, scores):
        verdict = judge(path.reference, got, tolerance)
        if not verdict.ok:
            failed[path.item.name] = verdict.reasons[0]
    return failed


def summary_lines(model: str, device: str, golden_class: str, variants: dict[str, Any]) -> list[str]:
    """The block a run prints: one line per variant with the measured factors."""
    lines = [f"MEASURED CROSS-DEVICE FACTOR: {golden_class} goldens of {model} judged on {device}"]
    for key, data in variants.items():
        cross = data.get("cross_device") if isinstance(data, dict) else None
        if not cross or "factors" not in cross:
            reason = (cross or data or {}).get("skipped") if isinstance(data, dict) else None
            lines.append(f"  {key}: not measured" + (f" ({str(reason)[:200]})" if isinstance(reason, str) else ""))
            continue
        f = cross["factors"]
        r = f["ratio_to_same_device"]
        lines.append(
            f"  {key}: cross-device / same-device noise: mean |Δ log p| x{_fmt(r['mean_abs_dlogp'])}, "
            f"max |Δ log p| x{_fmt(r['max_abs_dlogp'])}, margin shift x{_fmt(r['max_gap_shift'])} "
            f"(cross {f['cross_device']['mean_abs_dlogp']:.4f} / same {f['same_device_worst']['mean_abs_dlogp']:.4f} "
            f"mean, over {cross['steps']} steps of {cross['prompts']} prompts); built-in tolerance needs "
            f"x{_fmt(f['needed_vs_builtin_max'])} (today x{cross['builtin_factor']:g}: "
            f"{len(cross['failed_at_builtin'])}/{cross['prompts']} prompts fail)")
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
