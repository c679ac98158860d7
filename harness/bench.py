"""``harness-bench``: the fp16-vs-NF4 comparison in one command.

Measures every variant of one model in one process, with the same pool and the
same functions the ``memory``, ``throughput`` and ``drift`` checks use, and writes
``report.md`` (a table), ``report.json`` (raw figures, device, library versions) and
``memory.png`` (bar charts)::

    harness-bench --model smollm2-135m --device auto --out bench-out/

On CPU the report says that memory is process RSS and that speeds are CPU speeds.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.cli import (
    EXIT_FINDING, EXIT_OK, ToolParser, check_adapter, check_out_folder, check_registry, check_variants,
    golden_dir_argument, golden_dirs, run_tool, some_text, whole_number,
)
from harness.measure import MIB, NF4_BITS_PER_WEIGHT, Shape, measure_throughput, mib, nf4_estimate
from harness.outputs import strict_json

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Three tips for staying healthy are",
]
DRIFT_KEY = "bench:drift-reference"


def _parser() -> argparse.ArgumentParser:
    p = ToolParser(
        prog="harness-bench",
        description="Measure weights, peak memory, prefill/decode speed and output drift of a model's "
                    "variants (fp16, NF4, with and without the LoRA adapter) in one process.",
    )
    p.add_argument("--model", default=None, help="registry name, model folder, .gguf or hub id (default: registry default)")
    p.add_argument("--registry", default="models.yaml", help="model registry (default: ./models.yaml)")
    p.add_argument("--variants", default=None, help="comma list out of fp16,nf4,fp16-lora,nf4-lora (default: all known); fp16 is always measured as the reference")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (overrides the registry)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out/)")
    p.add_argument("--batch", type=whole_number(minimum=1), default=1, help="throughput batch size (default 1)")
    p.add_argument("--prompt-tokens", type=whole_number(minimum=1), default=64,
                   help="throughput prompt length (default 64)")
    p.add_argument("--new-tokens", type=whole_number(minimum=2, what="the first new token comes from the prefill, "
                                                                    "decode needs at least one more"),
                   default=16, help="throughput new tokens (default 16, at least 2)")
    p.add_argument("--rounds", type=whole_number(minimum=1), default=3, help="timed rounds (default 3; medians reported)")
    p.add_argument("--warmup", type=whole_number(minimum=0), default=1, help="warm-up rounds (default 1)")
    p.add_argument("--workload-batch", type=whole_number(minimum=1), default=2,
                   help="memory workload batch size (default 2)")
    p.add_argument("--workload-tokens", type=whole_number(minimum=1), default=16,
                   help="memory workload new tokens (default 16)")
    p.add_argument("--drift-tokens", type=whole_number(minimum=1), default=16,
                   help="greedy tokens of the reference per drift prompt (default 16)")
    p.add_argument("--prompt", action="append", type=some_text, default=None,
                   help="a prompt for the memory and drift workloads (repeatable)")
    golden_dir_argument(p)
    return p


OUTPUTS = ("report.md", "report.json", "memory.png")


def main(argv: list[str] | None = None) -> int:
    """Exit 0: every variant measured (or unavailable on this platform, which the report says); 1: a variant
    failed to load, the report is incomplete; 2: nothing measured (a usage error, found before a model loads, or
    a model that cannot be used); 3: an unexpected error inside the harness."""
    args = _parser().parse_args(argv)
    return run_tool("harness-bench", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    out = check_out_folder("--out", args.out, golden_dirs=golden_dirs(args.golden_dir, args.registry), writes=OUTPUTS)
    check_registry(args.registry, required=True)
    check_variants(args.variants)
    check_adapter("--adapter", args.adapter)
    report = run_bench(args)
    write_outputs(report, out)
    print(render_markdown(report))
    print(f"harness-bench: wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'memory.png'}", file=sys.stderr)
    failed = [row["variant"] for row in report["variants"] if row.get("status") == "failed"]
    if failed:
        print(f"harness-bench: {', '.join(failed)} failed to load: the report is incomplete", file=sys.stderr)
        return EXIT_FINDING
    return EXIT_OK


def _say(line: str) -> None:
    print(f"harness-bench: {line}", file=sys.stderr, flush=True)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the variants; every figure comes from the checks' own functions."""
    from harness.checks.drift import compare_to_reference, default_reference, reference_observation
    from harness.checks.memory import Workload, measure_memory
    from harness.checks.prompts import encode_prompt
    from harness.errors import HarnessError
    from harness.pool import VariantUnavailable
    from harness.provenance import adapter_fingerprint, library_versions, model_fingerprint
    from harness.session import HarnessSession, Options
    from harness.variants import RUN_ORDER, VariantSpec

    out = Path(args.out)
    session = HarnessSession(Options(
        model=args.model, registry=Path(args.registry).resolve(), variants=args.variants,
        adapter=args.adapter, device=args.device, golden_dir=out.resolve() / "unused-goldens",
        update=False, rootdir=Path.cwd(),
    ))
    variants = session.variants
    keys = {v.key for v in variants} | {"fp16"}
    variants = [VariantSpec.from_key(k) for k in RUN_ORDER if k in keys]
    resolved = session.resolve(progress=_say)
    device = session.device
    pool = session.pool
    tokenizer = pool.tokenizer
    prompts = args.prompt or DEFAULT_PROMPTS
    workload = Workload(prompts=prompts, max_new_tokens=args.workload_tokens, batch_size=args.workload_batch)
    shape = Shape(batch=args.batch, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    drift_ids = [encode_prompt(tokenizer, prompt=p, messages=None) for p in prompts]
    fp16 = VariantSpec("fp16", False)
    # A variant's reference observation is taken while it is loaded (as the drift check does).
    references = {fp16.key} | {default_reference(v).key for v in variants if v.lora}

    rows: list[dict[str, Any]] = []
    for variant in variants:
        row: dict[str, Any] = {"variant": variant.key}
        rows.append(row)
        _say(f"{variant.key}: loading")
        try:
            loaded = pool.get(variant)
        except HarnessError as exc:
            # a platform without the variant is a fact to report; a load that broke is a failure
            row["error"] = str(exc)
            row["status"] = "unavailable" if isinstance(exc, VariantUnavailable) else "failed"
            _say(f"{variant.key}: {row['status']}: {exc}")
            continue
        row["load_seconds"] = round(loaded.seconds, 2)
        _say(f"{variant.key}: memory workload")
        mem = measure_memory(loaded, tokenizer, workload, device=device)
        row["memory"] = {
            "weights_bytes": mem.weights_bytes, "quant_state_bytes": mem.quant_state_bytes,
            "quant_state_after_workload_bytes": mem.quant_state_after_bytes,
            "expected_nf4_bytes": mem.expected_nf4_bytes, "generated_tokens": mem.generated_tokens,
            "peak": {**asdict(mem.peak), "label": mem.peak.label},
        }
        if variant.quant == "nf4":
            row["nf4_estimate"] = nf4_estimate(loaded.model).figures()
        _say(f"{variant.key}: throughput ({shape})")
        thr = measure_throughput(loaded.model, tokenizer, shape, device=device, rounds=args.rounds,
                                 warmup_rounds=args.warmup)
        row["throughput"] = {**thr.figures(), "rounds_s": [asdict(r) for r in thr.rounds]}
        if variant.key in references:
            _say(f"{variant.key}: reference continuations for drift")
            pool.observe(variant, DRIFT_KEY, lambda l, v=variant: reference_observation(
                l.model, tokenizer, drift_ids, args.drift_tokens, variant=v.key))
        row["drift"] = {}
        for label, ref in (("fp16", fp16), ("base", default_reference(variant) if variant.lora else None)):
            if ref is None or ref == variant or ref.key not in {v.key for v in variants}:
                continue
            try:
                observation = pool.observe(ref, DRIFT_KEY, lambda l, r=ref: reference_observation(
                    l.model, tokenizer, drift_ids, args.drift_tokens, variant=r.key))
            except (VariantUnavailable, HarnessError) as exc:
                row["drift"][label] = {"error": str(exc)}
                continue
            result = compare_to_reference(pool.get(variant).model, observation, variant=variant.key)
            row["drift"][label] = {**result.figures(), "first_divergence_detail":
                                   asdict(result.first_divergence) if result.first_divergence else None}
    base = next((r for r in rows if r["variant"] == "fp16" and "memory" in r), None)
    for row in rows:
        if base is not None and "memory" in row:
            row["saving_vs_fp16"] = round(base["memory"]["weights_bytes"] / row["memory"]["weights_bytes"], 3)
    pool.release()
    return {
        "model": session.model_name,
        "source": resolved.source,
        "revision": resolved.revision,
        "model_fingerprint": model_fingerprint(resolved.path),
        "adapter": str(resolved.adapter) if resolved.adapter else None,
        "adapter_fingerprint": adapter_fingerprint(resolved.adapter),
        "device": {"name": device.name, "class": device.klass, "description": device.description,
                   "is_cuda": device.is_cuda, **_cpu_info(device)},
        "versions": library_versions(),
        "settings": {
            "memory_workload": workload.model_dump(),
            "throughput_shape": asdict(shape), "rounds": args.rounds, "warmup_rounds": args.warmup,
            "drift_prompts": prompts, "drift_new_tokens": args.drift_tokens,
            "nf4_bits_per_weight": NF4_BITS_PER_WEIGHT, "units": "MiB = 2**20 bytes",
        },
        "load_counts": dict(pool.load_counts),
        "variants": rows,
    }


def _cpu_info(device: Any) -> dict[str, Any]:
    import os

    import torch

    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(device.name)
        info["cuda"] = torch.version.cuda
    return info


# -- outputs ---------------------------------------------------------------------------------
COLUMNS = ["variant", "weights MiB", "peak MiB", "expected MiB (NF4)", "saving vs fp16",
           "prefill tok/s", "decode tok/s", "mean KL vs fp16", "top-1 vs fp16"]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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
            _fmt(thr["prefill_tokens_per_s"]),
            _fmt(thr["decode_tokens_per_s"]),
            _fmt(drift.get("mean_kl"), 4) if drift else "(reference)" if row["variant"] == "fp16" else "–",
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
        f"first decoding step, decode = the rest ((new tokens - 1) per row). Drift: KL(fp16 || variant) and top-1 agreement at every position of "
        f"{len(s['drift_prompts'])} prompts + fp16's greedy {s['drift_new_tokens']} tokens, teacher-forced.",
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
            f"{mib(mem['quant_state_bytes']):.2f} MiB of quant-state constants, {with_state:.2f} MiB together.",
        ]
        after = mem.get("quant_state_after_workload_bytes") or 0
        if after and after != mem["quant_state_bytes"]:
            lines += [
                "",
                f"After the first forward the constants take {mib(after):.2f} MiB: this bitsandbytes "
                "backend un-nests the double quantization on first use (absmax kept at 16 bits).",
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
    ax.bar([i - width / 2 for i in x], [r["throughput"]["prefill_tokens_per_s"] for r in rows], width, label="prefill")
    ax.bar([i + width / 2 for i in x], [r["throughput"]["decode_tokens_per_s"] for r in rows], width, label="decode")
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
