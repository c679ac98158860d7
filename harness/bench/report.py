"""``harness-bench``'s outputs: ``report.md`` (the table and its notes), ``report.json`` and
``memory.png``, all rendered from the one report dictionary the run builds.

Apart from the measuring (``harness.bench.run``): rendering reads only that dictionary, never a
model or a device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness.bench.doc import fmt as _fmt
from harness.measure.memory import MIB, mib
from harness.measure.nf4 import NF4_BITS_PER_WEIGHT
from harness.report.outputs import strict_json

COLUMNS = ["variant", "weights MiB", "peak MiB", "expected MiB (NF4)", "saving vs fp16",
           "prefill tok/s", "decode tok/s", "mean KL vs fp16", "top-1 vs fp16"]


def table_rows(report: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []
    for row in report["variants"]:
        if "error" in row:
            rows.append([row["variant"], f"{row.get('status', 'unavailable')}: {row['error'][:80]}"]
                        + [""] * (len(COLUMNS) - 2))
            continue
        mem, thr, drift = row["memory"], row["throughput"], row["drift"].get("fp16", {})
        rows.append([
            row["variant"],
            _fmt(mib(mem["weights_bytes"])),
            _fmt(mib(mem["peak"]["peak_bytes"])),
            _fmt(mib(mem["expected_nf4_bytes"])) if mem["expected_nf4_bytes"] else "–",
            f"{row['saving_vs_fp16']:.2f}x" if "saving_vs_fp16" in row else "–",
            _fmt(thr.get("prefill_tokens_per_s")),
            _fmt(thr.get("decode_tokens_per_s")),
            _fmt(drift.get("mean_kl"), 4) if drift else "(reference)" if row["variant"] == "fp16" and not
            row["drift"].get("skipped") else "–",
            _fmt(drift.get("top1_agreement"), 3) if drift else "–",
        ])
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    dev = report["device"]
    cpu = not dev["is_cuda"]
    peak_label = "process RSS" if cpu else "GPU peak allocated"
    header = [c if c != "peak MiB" else f"peak MiB ({peak_label})" for c in COLUMNS]
    s = report["settings"]
    shape = s["throughput_shape"]
    lines = [
        f"# Memory benchmark: {report['model']}",
        "",
        f"- Model: {report['source']}" + (f" @ {report['revision']}" if report["revision"] else "")
        + f" (weights fingerprint {report['model_fingerprint']})",
        f"- Device: {dev['description']} (class `{dev['class']}`), torch threads {dev['torch_threads']}",
        "- Libraries: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
    ]
    synthetic = report.get("synthetic")
    if synthetic:
        lines += ["", f"**Config-only: the {synthetic['name']} architecture ({synthetic['parameters']:,} parameters) "
                      "with random weights.** Weights, peaks and speeds are the architecture's; drift is not "
                      "measured (random weights have no behaviour)."]
    if cpu:
        lines += [
            "",
            "**On CPU: \"peak\" is the whole process's resident memory (RSS) during the workload — "
            "Python, torch and the model together — not GPU memory; the speeds are CPU speeds and "
            "say nothing about a GPU.**",
        ]
    else:
        lines += ["", "Peak is `torch.cuda.max_memory_allocated` during the workload (reserved in report.json)."]
    lines += [
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += [
        "",
        f"Sizes in MiB (2^20 bytes). Weights: `model.get_memory_footprint()`. Peak: during "
        f"{len(s['memory_workload']['prompts'])} prompts in batches of {s['memory_workload']['batch_size']}, "
        f"{s['memory_workload']['max_new_tokens']} new tokens each. Speeds: batch {shape['batch']} x "
        f"{shape['prompt_tokens']} prompt tokens -> {shape['new_tokens']} new tokens, median of {s['rounds']} "
        f"rounds after {s['warmup_rounds']} warm-up; one generate call per round, prefill = time to its "
        f"first decoding step, decode = the rest ((new tokens - 1) per row). " + (
            "Drift: not measured (random weights)." if synthetic else
            f"Drift: KL(fp16 || variant) and top-1 agreement at every position of {len(s['drift_prompts'])} "
            f"prompts + fp16's greedy {s['drift_new_tokens']} tokens, teacher-forced."),
    ]
    measured = [r for r in report["variants"] if "memory" in r]
    if cpu and measured:
        lines += [
            "",
            "Process RSS just before each workload (the interpreter, torch, allocator leftovers from "
            "earlier variants, and the model): " + ", ".join(
                f"{r['variant']} {mib(r['memory']['peak']['baseline_bytes']):.0f} MiB" for r in measured)
            + ". On CPU the peak therefore does not show the weight savings; the weights column does.",
        ]
    from harness.bench.doc import sweep_section

    lines += sweep_section(report)
    nf4 = next((r for r in report["variants"] if r["variant"] == "nf4" and "nf4_estimate" in r), None)
    if nf4 is not None:
        est, mem = nf4["nf4_estimate"], nf4["memory"]
        with_state = mib(mem["weights_bytes"] + mem["quant_state_bytes"])
        lines += [
            "",
            "## NF4 size: expected vs measured",
            "",
            f"Expected from first principles: {est['quantized_weights']:,} weights in "
            f"{est['quantized_modules']} quantized Linear layers x {NF4_BITS_PER_WEIGHT:.4f} bits "
            f"(4-bit codes + one 8-bit absmax per 64 + one fp32 per 64x256) = {est['quantized_mb']:.2f} MiB, "
            f"plus {est['other_params']:,} other parameters (embeddings, norms, lm_head; a tied head once) "
            f"x 16 bits = {est['other_16bit_mb']:.2f} MiB: **{est['expected_nf4_mb']:.2f} MiB**.",
            "",
            f"Measured: `get_memory_footprint()` = **{mib(mem['weights_bytes']):.2f} MiB** (packed 4-bit "
            f"weights + 16-bit rest; it does not count bitsandbytes' block constants), "
            f"{mib(mem['quant_state_bytes']):.2f} MiB of quant-state constants, {with_state:.2f} MiB together"
            + (f", in the {mem['layout_at_load']}." if mem.get("layout_at_load") else "."),
        ]
        after = mem.get("quant_state_after_workload_bytes") or 0
        if after and after != mem["quant_state_bytes"]:
            lines += [
                "",
                f"After the first forward the constants take {mib(after):.2f} MiB"
                + (f" ({mem['layout']})" if mem.get("layout") else "")
                + ": on this CPU bitsandbytes repacks the weights for its fused kernel at the first forward "
                "and undoes the double quantization (a bfloat16 absmax per block of 64).",
            ]
    lora = [r for r in report["variants"] if r.get("drift", {}).get("base")]
    if lora:
        lines += ["", "## Adapters vs their base", "", "| variant | base | mean KL | max KL | top-1 | first divergence |",
                  "|---|---|---|---|---|---|"]
        for r in lora:
            d = r["drift"]["base"]
            base = "fp16" if r["variant"].startswith("fp16") else "nf4"
            lines.append(f"| {r['variant']} | {base} | {_fmt(d.get('mean_kl'), 4)} | {_fmt(d.get('max_kl'), 3)} | "
                         f"{_fmt(d.get('top1_agreement'), 3)} | {_fmt(d.get('first_divergence'))} |")
    return "\n".join(lines) + "\n"


def write_outputs(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(strict_json(report, indent=2, sort_keys=True, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(report))
    plot(report, out / "memory.png")


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["variants"] if "memory" in r]
    names = [r["variant"] for r in rows]
    cpu = not report["device"]["is_cuda"]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    ax = axes[0]
    width = 0.27
    weights = [r["memory"]["weights_bytes"] / MIB for r in rows]
    expected = [(r["memory"]["expected_nf4_bytes"] or 0) / MIB for r in rows]
    peak = [r["memory"]["peak"]["peak_bytes"] / MIB for r in rows]
    ax.bar([i - width for i in x], weights, width, label="weights")
    ax.bar(list(x), expected, width, label="expected (NF4)")
    ax.bar([i + width for i in x], peak, width, label="peak (process RSS)" if cpu else "peak (GPU allocated)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("MiB")
    ax.set_title("memory" + (" (CPU: peak is process RSS)" if cpu else ""))
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.bar([i - width / 2 for i in x], [r["throughput"].get("prefill_tokens_per_s", 0) for r in rows], width,
           label="prefill")
    ax.bar([i + width / 2 for i in x], [r["throughput"].get("decode_tokens_per_s", 0) for r in rows], width,
           label="decode")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens/s")
    ax.set_yscale("log")
    ax.set_title("speed" + (" (CPU speeds)" if cpu else ""))
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.bar(list(x), [r["drift"].get("fp16", {}).get("mean_kl", 0.0) for r in rows], 0.5)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("mean KL(fp16 || variant), nats")
    ax.set_title("drift vs fp16")
    fig.suptitle(f"{report['model']} on {report['device']['description']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
