"""The benchmark's shape sweep, its flags, and the multi-architecture GPU document.

``harness-bench`` measures one model per process; this module renders the per-shape part
of its report and the flags, and combines several reports (one per architecture) and the
real model's cross-device measurement into one document: ``benchmark-gpu.md``, ``.json``
and ``.png``.

Flags name two known bitsandbytes behaviours a 4-bit user should see before trusting a
saving: a 4-bit peak above the 16-bit one at some shape (bitsandbytes#1141, where
dequantization buffers outweigh the smaller weights) and 4-bit decoding slower than 16-bit
(bitsandbytes#611). They are facts about this card and these versions, reported, never failures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.measure.memory import MIB, mib

PAIRS = (("nf4", "fp16"), ("nf4-lora", "fp16-lora"))


def shape_label(shape: dict[str, Any]) -> str:
    return f"{shape['batch']} x {shape['prompt_tokens']} -> {shape['new_tokens']}"


def _measured(row: dict[str, Any]) -> list[dict[str, Any]]:
    return row.get("sweep") or []


def flags(rows: Sequence[dict[str, Any]], *, peak_label: str) -> list[dict[str, Any]]:
    """Shapes where 4-bit peaks above 16-bit (bitsandbytes#1141) or decodes slower (bitsandbytes#611), per variant pair."""
    by_key = {row["variant"]: row for row in rows}
    out: list[dict[str, Any]] = []
    for quant, base in PAIRS:
        if quant not in by_key or base not in by_key:
            continue
        ours = {shape_label(s["shape"]): s for s in _measured(by_key[quant]) if "error" not in s}
        for theirs in _measured(by_key[base]):
            label = shape_label(theirs["shape"])
            mine = ours.get(label)
            if mine is None or "error" in theirs:
                continue
            if mine["peak"]["peak_bytes"] > theirs["peak"]["peak_bytes"]:
                out.append({
                    "issue": "bitsandbytes#1141", "kind": "peak", "variant": quant, "reference": base, "shape": label,
                    "value": mine["peak"]["peak_bytes"], "reference_value": theirs["peak"]["peak_bytes"],
                    "text": f"{quant} peaks above {base} at {label}: {mib(mine['peak']['peak_bytes']):.1f} MiB vs "
                            f"{mib(theirs['peak']['peak_bytes']):.1f} MiB ({peak_label})",
                })
            if mine["throughput"]["decode_tokens_per_s"] < theirs["throughput"]["decode_tokens_per_s"]:
                out.append({
                    "issue": "bitsandbytes#611", "kind": "decode", "variant": quant, "reference": base, "shape": label,
                    "value": mine["throughput"]["decode_tokens_per_s"],
                    "reference_value": theirs["throughput"]["decode_tokens_per_s"],
                    "text": f"{quant} decodes slower than {base} at {label}: "
                            f"{mine['throughput']['decode_tokens_per_s']:.1f} vs "
                            f"{theirs['throughput']['decode_tokens_per_s']:.1f} tok/s",
                })
    return out


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: '–' for nothing, floats to ``digits`` decimals."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mb(n_bytes: int | None) -> str:
    """MiB with one decimal, three below 1 MiB (a small model's KV cache is not zero)."""
    if n_bytes is None:
        return "–"
    value = n_bytes / MIB
    return f"{value:.3f}" if value < 1 else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def sweep_table(rows: Sequence[dict[str, Any]], *, cuda: bool) -> list[str]:
    """One line per variant and shape: KV cache, peaks, speeds, roofline fraction."""
    peak = "peak allocated MiB" if cuda else "peak MiB (process RSS)"
    header = ["variant", "batch x prompt -> new", "KV cache MiB", peak, "peak reserved MiB", "prefill tok/s",
              "decode tok/s", "decode / roofline"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        for s in _measured(row):
            label = shape_label(s["shape"])
            if "error" in s:
                lines.append(f"| {row['variant']} | {label} | {s['error'][:90]} |" + " |" * (len(header) - 3))
                continue
            thr = s["throughput"]
            lines.append(
                f"| {row['variant']} | {label} | {_mb(s['kv_cache_bytes'])} | {_mb(s['peak']['peak_bytes'])} | "
                f"{_mb(s['peak'].get('reserved_bytes'))} | {fmt(thr['prefill_tokens_per_s'])} | "
                f"{fmt(thr['decode_tokens_per_s'])} | {_pct(s.get('roofline_fraction'))} |")
    return lines


def sweep_section(report: dict[str, Any]) -> list[str]:
    """The sweep and the flags, as ``harness-bench`` appends them to its report."""
    rows = [r for r in report["variants"] if _measured(r)]
    if not rows:
        return []
    cuda = report["device"]["is_cuda"]
    bandwidth = report.get("bandwidth")
    lines = ["", "## Shapes: peaks, KV cache and speed", ""]
    lines += sweep_table(rows, cuda=cuda)
    lines += ["", _sweep_note(report)]
    lines += ["", "## Flags (4-bit against 16-bit at the same shape)", ""]
    found = report.get("flags") or []
    lines += [f"- **{f['issue']}**: {f['text']}" for f in found] or [
        "- none: at every measured shape 4-bit peaked no higher and decoded no slower than 16-bit."]
    if not cuda:
        lines += ["", "On CPU the peaks are process RSS and the speeds CPU speeds: flags here say nothing about a GPU."]
    if bandwidth is None and cuda:
        lines += ["", "No roofline: the card is not in the bandwidth table; pass --bandwidth GB/s."]
    return lines


def _sweep_note(report: dict[str, Any]) -> str:
    s = report["settings"]
    bw = report.get("bandwidth")
    roof = (f"decode / roofline = (weights + quant constants + the KV cache at mid-generation) x decode steps/s "
            f"/ peak bandwidth ({bw['source']})" if bw else "decode / roofline needs a peak bandwidth (--bandwidth)")
    return (f"Each shape: {s['rounds']} timed rounds after {s['warmup_rounds']} warm-up (medians), one generate "
            f"call per round of exactly the new tokens (greedy, eos cannot stop it); the peak spans warm-up and "
            f"rounds after `reset_peak_memory_stats` (CUDA) or is the process RSS sampled every 5 ms (CPU). "
            f"KV cache: the bytes the model's own cache holds after a prefill of prompt + new tokens. {roof}.")


# -- the combined document -------------------------------------------------------------------
def combine(reports: Sequence[dict[str, Any]], *, real: dict[str, Any] | None = None,
            how: str | None = None) -> dict[str, Any]:
    """The JSON behind benchmark-gpu.md: every architecture's report and the real model's figures."""
    return {"synthetic": list(reports), "real": real, "how": how}


def _weights_table(reports: Sequence[dict[str, Any]]) -> list[str]:
    header = ["architecture", "parameters", "fp16 MiB", "nf4 MiB", "expected nf4 MiB", "saving", "fp16-lora MiB",
              "nf4-lora MiB", "load s (fp16 / nf4)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rep in reports:
        rows = {r["variant"]: r for r in rep["variants"]}

        def weights(key: str) -> str:
            row = rows.get(key)
            if row is None:
                return "–"
            if "memory" not in row:
                return f"{row.get('status', 'failed')}"
            return fmt(mib(row["memory"]["weights_bytes"] + (row["memory"].get("quant_state_bytes") or 0)))

        nf4 = rows.get("nf4", {})
        expected = nf4.get("memory", {}).get("expected_nf4_bytes")
        params = (rep.get("synthetic") or {}).get("parameters")
        loads = " / ".join(fmt(rows.get(k, {}).get("load_seconds")) for k in ("fp16", "nf4"))
        saving = f"{nf4['saving_vs_fp16']:.2f}x" if "saving_vs_fp16" in nf4 else "–"
        count = "–" if not params else f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
        lines.append(f"| {_arch(rep)} | {count} | {weights('fp16')} | {weights('nf4')} | {fmt(mib(expected))} | "
                     f"{saving} | {weights('fp16-lora')} | {weights('nf4-lora')} | {loads} |")
    return lines


def _arch(report: dict[str, Any]) -> str:
    synthetic = report.get("synthetic")
    return synthetic["name"] if synthetic else report["model"]


def render(doc: dict[str, Any]) -> str:
    """benchmark-gpu.md: conditions, weights, per-architecture shapes, flags, the real model's noise."""
    reports = doc["synthetic"]
    lines = ["# GPU benchmark: fp16, NF4 and LoRA memory and speed", ""]
    first = reports[0] if reports else None
    if first is not None:
        dev = first["device"]
        bw = first.get("bandwidth")
        lines += [
            f"- Card: {dev.get('gpu') or dev['description']} (class `{dev['class']}`), CUDA {dev.get('cuda') or '–'}; "
            f"peak bandwidth: {bw['source'] if bw else 'unknown (no roofline)'}",
            "- Libraries: " + ", ".join(f"{k} {v}" for k, v in first["versions"].items()),
        ]
    if doc.get("how"):
        lines += [f"- Produced by: {doc['how']}"]
    if reports:
        lines += [
            "",
            "Architectures are **config-only**: each model is built from its published config.json with random "
            "weights (`harness-bench --config NAME`), saved and loaded through the harness's own loader, so the "
            "weights, peaks and speeds are those of the architecture; outputs mean nothing and no drift is measured.",
            "",
            "## Weights (MiB, NF4 with its quantization constants)",
            "",
            *_weights_table(reports),
        ]
        for rep in reports:
            rows = [r for r in rep["variants"] if _measured(r)]
            lines += ["", f"## {_arch(rep)}", ""]
            if not rows:
                lines.append("no variant measured: " + "; ".join(
                    f"{r['variant']}: {r.get('error', '')[:120]}" for r in rep["variants"]))
                continue
            lines += sweep_table(rows, cuda=rep["device"]["is_cuda"])
            found = [f"- **{f['issue']}**: {f['text']}" for f in rep.get("flags") or []]
            lines += [""] + (found or ["- no flag: 4-bit peaked no higher and decoded no slower than 16-bit at "
                                       "every measured shape"])
        lines += ["", _sweep_note(reports[0])]
        if not reports[0]["device"]["is_cuda"]:
            lines += ["", "**Not a GPU: peaks are process RSS and speeds CPU speeds; nothing here describes a GPU.**"]
        skipped = [r for r in reports if r.get("skipped_reason")]
        for rep in skipped:
            lines.append(f"- {_arch(rep)}: {rep['skipped_reason']}")
    if doc.get("skipped"):
        lines += ["", "Not measured: " + "; ".join(f"{k} ({v})" for k, v in doc["skipped"].items()) + "."]
    real = doc.get("real")
    if real:
        lines += ["", *render_real(real)]
    return "\n".join(lines) + "\n"


def render_real(real: dict[str, Any]) -> list[str]:
    """The embedded model on the card: goldens recorded, the judged run, the measured cross-device factor."""
    lines = [f"## {real.get('model', 'the embedded model')} (trained weights): goldens and cross-device noise", ""]
    for step in real.get("steps", []):
        lines.append(f"- {step['name']}: {step['outcome']}" + (f" ({step['detail']})" if step.get("detail") else ""))
    for direction in real.get("cross_device", []):
        lines += ["", f"### {direction['golden_class']} goldens judged on {direction['device']}", "",
                  "| variant | prompts | steps | cross mean \\|Δ log p\\| | same-device mean | ratio mean / max / margin "
                  "| built-in tolerance needs | fail at today's factor |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, data in direction["variants"].items():
            cross = data.get("cross_device") or {}
            if "factors" not in cross:
                lines.append(f"| {key} | not measured: {str(cross.get('skipped', data.get('skipped', '')))[:100]} |"
                             + " |" * 6)
                continue
            f = cross["factors"]
            ratio = f["ratio_to_same_device"]
            lines.append(
                f"| {key} | {cross['prompts']} | {cross['steps']} | {f['cross_device']['mean_abs_dlogp']:.4f} | "
                f"{f['same_device_worst']['mean_abs_dlogp']:.4f} | "
                f"x{fmt(ratio['mean_abs_dlogp'], 2)} / x{fmt(ratio['max_abs_dlogp'], 2)} / x{fmt(ratio['max_gap_shift'], 2)} | "
                f"x{fmt(f['needed_vs_builtin_max'], 2)} | {len(cross['failed_at_builtin'])}/{cross['prompts']} "
                f"(x{cross['builtin_factor']:g}) |")
        lines += ["", f"Same-device conditions (the denominator): {direction.get('conditions', '–')}."]
    return lines


def write(doc: dict[str, Any], out: Path, *, stem: str = "benchmark-gpu") -> list[Path]:
    """Write ``stem``.md, .json and .png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js, png = out / f"{stem}.md", out / f"{stem}.json", out / f"{stem}.png"
    md.write_text(render(doc))
    js.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    plot(doc, png)
    return [md, js, png]


def plot(doc: dict[str, Any], path: Path) -> None:
    """Weights, the largest shape's peak, and decode as a fraction of the roofline, per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [r for r in doc["synthetic"] if any(_measured(v) for v in r["variants"])]
    keys = ["fp16", "fp16-lora", "nf4", "nf4-lora"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.2
    names = [_arch(r) for r in reports]
    for i, key in enumerate(keys):
        weights, peaks, roof = [], [], []
        for rep in reports:
            row = next((v for v in rep["variants"] if v["variant"] == key), None)
            done = [s for s in _measured(row or {}) if "error" not in s]
            weights.append(((row or {}).get("memory", {}).get("weights_bytes") or 0) / MIB / 1024)
            peaks.append((done[-1]["peak"]["peak_bytes"] / MIB / 1024) if done else 0)
            roof.append(100 * (done[0].get("roofline_fraction") or 0) if done else 0)
        x = [j + (i - 1.5) * width for j in range(len(reports))]
        axes[0].bar(x, weights, width, label=key)
        axes[1].bar(x, peaks, width, label=key)
        axes[2].bar(x, roof, width, label=key)
    for ax, title, unit in ((axes[0], "weights", "GiB"), (axes[1], "peak at the largest shape", "GiB"),
                            (axes[2], "decode at the first shape, % of bandwidth roofline", "%")):
        ax.set_xticks(range(len(reports)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
    axes[0].legend(fontsize=8)
    device = reports[0]["device"] if reports else {"description": "no architecture measured"}
    fig.suptitle(f"config-only architectures on {device.get('gpu') or device['description']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
