"""A calibration result, rendered: the Markdown tables for people and the ``defaults:`` block for a suite.

Only reads the result dictionary ``calibration.py`` builds (or ``calibration.json`` holds).
"""

from __future__ import annotations

from typing import Any

from harness.judge.noise import Recommendation


def _fmt(value: float | None) -> str:
    return "-" if value is None else "inf" if value == float("inf") else f"{value:.4f}"


def render_markdown(result: dict[str, Any]) -> str:
    ref = result["reference"]
    lines = [
        f"# Calibration: {result['model']} on {result['device']}",
        "",
        f"Reference: attn_implementation={ref['attn_implementation']}, threads={ref['threads']}, "
        f"CPU capability {ref['cpu_capability']}; {len(result['items'])} prompts, "
        f"up to {max(i['max_new_tokens'] for i in result['items'].values())} new tokens each. "
        "Each condition scores the reference's own greedy path (teacher forcing); |Δ log p| is the "
        "change of the chosen token's log-probability; a flip is a step where the condition preferred "
        "another token (gap: the wider of the two runs' margins between the two tokens).",
        "",
    ]
    for key, data in result["variants"].items():
        lines.append(f"## {key}")
        if "skipped" in data and isinstance(data["skipped"], str):
            lines += ["", f"skipped: {data['skipped']}", ""]
            continue
        n = len(result["items"])
        lines += ["", *_table("condition (benign)", data["conditions"], n)]
        for name, reason in data["skipped"].items():
            lines.append(f"| {name} | skipped: {reason} | | | | | |")
        if data.get("regressions"):
            lines += ["", *_table("constructed regression", data["regressions"], n)]
        rec = data["recommendation"]
        observed = ", ".join(f"{k} {rec[k]} (observed {_fmt(rec['observed'][k])})" for k in rec["observed"])
        if data.get("refused"):
            lines += ["", f"**No tolerance recommended**: observed × {result['safety']} gives {observed}, and "
                      f"{data['refused']}. Noise this large is not numerical noise: check the conditions above "
                      "(a kernel or setting that changes the answers), or lower --safety."]
        else:
            lines += ["", f"Recommended (observed × {result['safety']}, floors {result['floors']}): {observed}."]
        if data["fragile"]:
            lines.append("Fragile prompts (a top-2 margin below tie_gap on the reference path): " + ", ".join(
                f"{k} (step {data['smallest_margins'][k]['step']}, margin {_fmt(data['smallest_margins'][k]['margin'])})"
                for k in data["fragile"]))
        if "cross_device" in data:
            lines += ["", *_cross_lines(data["cross_device"], n)]
        lines.append("")
    return "\n".join(lines)


def _cross_lines(cross: dict[str, Any], n_items: int) -> list[str]:
    """The cross-device row and its factors, under the variant's same-device table."""
    if "factors" not in cross:
        return [f"Cross-device: not measured ({cross.get('skipped')})."]
    f = cross["factors"]
    noise = {**cross["noise"], "failed": {"default": cross["failed_at_builtin"]}}  # default: with today's factor
    lines = _table(f"{cross['golden_class']} goldens scored here", [noise], cross["prompts"])
    ratio, needed = f["ratio_to_same_device"], f["needed_vs_builtin"]
    lines += [
        "",
        f"Cross-device factor ({cross['golden_class']} goldens on this device, {cross['prompts']} of {n_items} "
        f"prompts, their whole recorded paths): cross-device / worst same-device condition "
        f"({', '.join(f['same_device_conditions']) or 'none measured'}): mean |Δ log p| x{_fmt_x(ratio['mean_abs_dlogp'])}, "
        f"max |Δ log p| x{_fmt_x(ratio['max_abs_dlogp'])}, margin shift x{_fmt_x(ratio['max_gap_shift'])}. "
        f"The built-in tolerance would need x{_fmt_x(f['needed_vs_builtin_max'])} (mean x{_fmt_x(needed['mean_abs_dlogp'])}, "
        f"max x{_fmt_x(needed['max_abs_dlogp'])}, margin x{_fmt_x(needed['max_gap_shift'])}) to cover it with the same "
        f"safety; today's cross-device factor is x{cross['builtin_factor']:g}, at which "
        f"{len(cross['failed_at_builtin'])} of {cross['prompts']} goldens fail.",
    ]
    if cross["skipped"]:
        lines.append("Not compared: " + "; ".join(f"{k} ({v})" for k, v in cross["skipped"].items()) + ".")
    return lines


def _fmt_x(value: float | None) -> str:
    return "n/a (no same-device noise)" if value is None else f"{value:.2f}"


def _table(title: str, rows: list[dict[str, Any]], n_items: int) -> list[str]:
    lines = [f"| {title} | steps | mean \\|Δ log p\\| (worst prompt) | max \\|Δ log p\\| | max margin shift "
             f"| flips (widest gap) | prompts failed: recommended / default tolerance |",
             "|---|---:|---:|---:|---:|---|---|"]
    for c in rows:
        flips = (f"{len(c['flips'])} ({_fmt(max(max(f['gap_reference'], f['gap_condition']) for f in c['flips']))})"
                 if c["flips"] else "0")
        bad = f", {c['nonfinite']} NaN/inf" if c["nonfinite"] else ""
        failed = " / ".join(f"{len(c['failed'][k])}/{n_items}" if k in c["failed"] else "–"
                            for k in ("recommended", "default"))
        lines.append(f"| {c['condition']} | {c['steps']} | {_fmt(c['mean_abs_dlogp'])} | {_fmt(c['max_abs_dlogp'])} "
                     f"| {_fmt(c['max_gap_shift'])} | {flips}{bad} | {failed} |")
    return lines


def render_yaml(result: dict[str, Any]) -> str:
    """The ``defaults:`` block a suite takes: one tolerance per measured variant."""
    lines = [f"# harness-calibrate: {result['model']} on {result['device']} "
             f"(reference attn_implementation={result['reference']['attn_implementation']}, safety x{result['safety']})",
             "defaults:", "  tolerance:"]
    for key, data in result["variants"].items():
        if isinstance(data.get("skipped"), str):
            continue
        if data.get("refused"):
            lines.append(f"    # {key}: no tolerance recommended: {data['refused']}")
            continue
        rec = Recommendation(**data["recommendation"]).as_tolerance()
        lines.append(f"    {key}: {{" + ", ".join(f"{k}: {v}" for k, v in rec.items()) + "}")
    return "\n".join(lines) + "\n"

