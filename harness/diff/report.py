"""A model diff as Markdown (for a pull request), JSON (for tools) and a PNG chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.observe.activations import layer_index
from harness.judge.localize import DTYPE_FLOOR, FACTOR
from harness.diff.run import ModelDiff
from harness.report.outputs import strict_json

TOP_TENSORS = 15


def summary_lines(diff: ModelDiff) -> list[str]:
    """The verdict, one line per part, most upstream first."""
    if diff.unchanged:
        return ["no change: files, weights and activations on the suites' prompts are the same"]
    lines: list[str] = []
    if diff.files:
        lines.append("files: " + ", ".join(f"{c.file} ({c.role}, {c.status})" for c in diff.files))
    else:
        lines.append("files: no difference")
    w = diff.weights
    if w.identical:
        lines.append("weights: identical")
    else:
        parts = [f"{len(w.changed)} tensor{'s' if len(w.changed) != 1 else ''} changed"]
        parts += [f"{len(w.added)} added"] if w.added else []
        parts += [f"{len(w.removed)} removed"] if w.removed else []
        parts += [f"{len(w.reshaped)} reshaped"] if w.reshaped else []
        top = f"; most changed: {w.changed[0].name} ({_fmt(w.changed[0].relative)})" if w.changed else ""
        lines.append("weights: " + ", ".join(parts) + top)
    if diff.prompts:
        t = diff.behaviour_totals()
        if t["measured_prompts"]:
            unmeasured = t["prompts"] - t["measured_prompts"]
            lines.append(f"behaviour: mean KL {t['mean_kl']:.4g}, top-1 agreement {t['top1_agreement']:.3f}, "
                         f"greedy output diverges on {t['greedy_diverged']} of {t['measured_prompts']} prompts"
                         + (f" ({unmeasured} not measured, see the notes)" if unmeasured else ""))
        else:
            lines.append(f"behaviour: not measured on any of {t['prompts']} prompts (next-token KL, top-1 agreement "
                         "and greedy divergence need the same vocabulary; see the notes); activations are compared")
        if diff.tokenizer_changed_prompts:
            lines.append(f"tokenization: {len(diff.tokenizer_changed_prompts)} of {len(diff.prompts)} prompts "
                         "encode to different token ids")
    lines.append("localization: " + diff.localization)
    return lines + [f"note: {note}" for note in diff.notes]


def to_json(diff: ModelDiff) -> dict[str, Any]:
    first = diff.first_change
    return {
        "old": _side(diff.old), "new": _side(diff.new),
        "unchanged": diff.unchanged,
        "summary": summary_lines(diff),
        "notes": diff.notes,
        "files": [c.as_dict() for c in diff.files],
        "weights": diff.weights.as_dict(),
        "behaviour": {**(diff.behaviour_totals() if diff.prompts else {}),
                      "per_prompt": [p.as_dict() for p in diff.prompts]},
        "localization": {
            "verdict": diff.localization,
            "first_change": first.as_dict() if first else None,
            "first_difference": diff.first_difference.as_dict() if diff.first_difference else None,
            "tokenizer_changed_prompts": diff.tokenizer_changed_prompts,
            "noise": {"method": diff.noise_method, "factor": FACTOR,
                      "dtype_floor": DTYPE_FLOOR.get(diff.dtype), "dtype": diff.dtype, "device": diff.device},
            "modules": [m.as_dict() for m in diff.modules],
        },
    }


def _side(side: Any) -> dict[str, Any]:
    return {"label": side.label, "path": str(side.resolved.path),
            "adapter": str(side.adapter) if side.adapter else None}


def to_markdown(diff: ModelDiff, *, chart: str | None = None) -> str:
    out: list[str] = [f"# Model diff: {diff.old.label} → {diff.new.label}", ""]
    out += [f"- OLD: `{diff.old.resolved.path}`" + (f" + adapter `{diff.old.adapter}`" if diff.old.adapter else ""),
            f"- NEW: `{diff.new.resolved.path}`" + (f" + adapter `{diff.new.adapter}`" if diff.new.adapter else ""),
            "", "## Verdict", ""]
    out += [f"- {line}" for line in summary_lines(diff)]
    out += ["", "## Files", ""]
    if not diff.files:
        out.append("No file differs (weights aside).")
    for change in diff.files:
        out += [f"### `{change.file}` ({change.role}, {change.status})", ""]
        out += [f"- {line}" for line in change.summary]
        if change.diff:
            out += ["", "```diff", *change.diff, "```"]
        out.append("")
    out += ["", "## Weights", ""]
    out += _weights_md(diff)
    if diff.prompts:
        out += ["", "## Behaviour on the suites' prompts", ""]
        out += _behaviour_md(diff)
        out += ["", "## Localization", ""]
        out += _localization_md(diff, chart)
    return "\n".join(out).rstrip() + "\n"


def _weights_md(diff: ModelDiff) -> list[str]:
    w = diff.weights
    if w.identical:
        return [f"All {w.unchanged} tensors are identical."]
    out = [f"{len(w.changed)} changed, {w.unchanged} identical, {len(w.added)} added, {len(w.removed)} removed, "
           f"{len(w.reshaped)} reshaped."]
    out += [f"- added: `{n}`" for n in w.added[:20]]
    out += [f"- removed: `{n}`" for n in w.removed[:20]]
    out += [f"- reshaped: `{n}` {o} → {v}" for n, o, v in w.reshaped[:20]]
    out += [f"- dtype: `{n}` {o} → {v}" for n, o, v in w.dtype_changed[:20]]
    if w.changed:
        out += ["", "Most changed tensors (relative norm of the difference, ‖new − old‖ / ‖old‖):", "",
                "| tensor | layer | relative diff | max abs diff |", "|---|---|---|---|"]
        for change in w.changed[:TOP_TENSORS]:
            row = change.as_dict()
            layer = "" if row["layer"] is None else str(row["layer"])
            out.append(f"| `{change.name}` | {layer} | {_fmt(change.relative)} | {_fmt(change.max_abs)} |")
        if len(w.changed) > TOP_TENSORS:
            out.append(f"| … {len(w.changed) - TOP_TENSORS} more | | | |")
    return out


def _behaviour_md(diff: ModelDiff) -> list[str]:
    t = diff.behaviour_totals()
    head = (f"Over {t['measured_prompts']} prompts: mean KL {t['mean_kl']:.4g}, top-1 agreement "
            f"{t['top1_agreement']:.3f}." if t["measured_prompts"] else
            "Not measured: the vocabularies differ, so next-token distributions cannot be compared.")
    out = [f"Teacher-forced on OLD's greedy continuation; KL(OLD ‖ NEW) per position. {head}", "",
           "| prompt | same token ids | mean KL | max KL | top-1 | first greedy divergence | first changed module |",
           "|---|---|---|---|---|---|---|"]
    for p in diff.prompts:
        div = p.first_divergence
        where = "not measured" if not p.measured else "none" if div is None else \
            f"new token {div['new_token']}: {div['expected_text']!r} → {div['got_text']!r}"
        out.append(f"| `{p.id}` | {'yes' if p.tokens_same else '**no**'} | {_measure(p.mean_kl, '.4g')} | "
                   f"{_measure(p.max_kl, '.4g')} | {_measure(p.top1_agreement, '.3f')} | {where} | "
                   f"{p.first_changed_module or '—'} |")
    return out


def _measure(value: float | None, spec: str) -> str:
    return "not measured" if value is None else format(value, spec)


def _localization_md(diff: ModelDiff, chart: str | None) -> list[str]:
    first = diff.first_change
    out = [f"**{diff.localization}**", ""]
    if first is not None:
        out += [f"First module beyond noise: `{first.name}`, relative difference {_fmt(first.relative)} "
                f"(threshold {_fmt(first.threshold)}).", ""]
    floor = DTYPE_FLOOR.get(diff.dtype)
    out += [f"How the noise floor is derived: {diff.noise_method}; a module counts as changed when "
            f"‖NEW − OLD‖ / ‖OLD‖ of its output exceeds max({FACTOR:g} × that kernel-swap difference, "
            f"{floor} for {diff.dtype}), worst prompt taken. Device: {diff.device}.", ""]
    if chart:
        out += [f"![relative difference per module]({chart})", ""]
    out += ["| layer | worst module | relative diff | threshold | beyond noise |", "|---|---|---|---|---|"]
    for label, row in _per_layer(diff):
        out.append(f"| {label} | {row.name} | {_fmt(row.relative)} | {_fmt(row.threshold)} | "
                   f"{'**yes**' if row.changed else 'no'} |")
    return out


def _per_layer(diff: ModelDiff) -> list[tuple[str, Any]]:
    """Per layer (and before/after the layers) the module furthest beyond its threshold."""
    groups: dict[str, list[Any]] = {}
    for row in diff.modules:
        index = layer_index(row.name)
        label = str(index) if index is not None else ("embedding" if row.name == "embedding" else "final")
        groups.setdefault(label, []).append(row)
    return [(label, max(rows, key=lambda r: _ratio(r))) for label, rows in groups.items()]


def _ratio(row: Any) -> float:
    return row.relative / row.threshold if row.threshold > 0 and not math.isnan(row.relative) else math.inf


def write_chart(diff: ModelDiff, path: Path) -> bool:
    """Relative difference per module against its noise threshold (log scale); False without matplotlib."""
    if not diff.modules:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = list(range(len(diff.modules)))
    finite = [r.relative for r in diff.modules if math.isfinite(r.relative) and r.relative > 0]
    tiny = min([r.threshold for r in diff.modules] + finite) / 30
    rel = [max(r.relative, tiny) if math.isfinite(r.relative) else 1e3 for r in diff.modules]
    thr = [max(r.threshold, tiny) for r in diff.modules]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.semilogy(xs, rel, label="‖NEW − OLD‖ / ‖OLD‖", color="tab:red", linewidth=1.2)
    ax.semilogy(xs, thr, label="noise threshold", color="tab:gray", linestyle="--", linewidth=1)
    ticks = [i for i, r in enumerate(diff.modules) if r.name.endswith(".output") and (layer_index(r.name) or 0) % 5 == 0]
    ax.set_xticks(ticks, [f"L{layer_index(diff.modules[i].name)}" for i in ticks])
    first = diff.first_change
    if first is not None:
        at = next(i for i, r in enumerate(diff.modules) if r.name == first.name)
        ax.axvline(at, color="tab:red", alpha=0.3)
        ax.annotate(first.name, (at, rel[at]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_ylim(bottom=tiny * 0.8)
    ax.set_xlabel("module, in execution order (values at the bottom edge: identical)")
    ax.set_ylabel("relative difference")
    ax.set_title(f"{diff.old.label} → {diff.new.label}: activations on the suites' prompts")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(diff: ModelDiff, out: Path) -> list[Path]:
    """``diff.md``, ``diff.json`` and (with matplotlib) ``diff.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    chart = out / "diff.png"
    if write_chart(diff, chart):
        written.append(chart)
    md = out / "diff.md"
    md.write_text(to_markdown(diff, chart=chart.name if written else None), encoding="utf-8")
    js = out / "diff.json"
    js.write_text(strict_json(to_json(diff), indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return [md, js, *written]


def _fmt(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)
