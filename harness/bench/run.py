"""``harness-bench``: the fp16-vs-NF4 comparison in one command.

Measures every variant of one model in one process, with the same pool and the
same functions the ``memory``, ``throughput`` and ``drift`` checks use, and writes
``report.md`` (a table), ``report.json`` (raw figures, device, library versions) and
``memory.png`` (bar charts)::

    harness-bench --model smollm2-135m --device auto --out bench-out/

On CPU the report says that memory is process RSS and that speeds are CPU speeds.

``--config NAME|PATH`` measures an architecture without its weights: the model is built from
its config.json with random weights (``harness.models.synthetic``), saved, and loaded through the same
pool, so memory and speed are the architecture's (drift is not measured: the weights mean
nothing). ``--sweep 1x128,8x512`` measures peaks, the KV cache, prefill and decode speed and the
decode bandwidth roofline at each batch x prompt shape, and flags shapes where 4-bit peaks above
or decodes slower than 16-bit::

    harness-bench --config llama-3-8b --device cuda --sweep 1x128,8x512,32x1024 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.cli import (
    EXIT_FINDING, EXIT_OK, ToolParser, check_adapter, check_out_folder, check_registry, check_variants,
    golden_dir_argument, golden_dirs, progress, run_tool, some_text, whole_number,
)
from harness.bench.report import render_markdown, write_outputs
from harness.measure import (
    NF4_BITS_PER_WEIGHT, Shape, measure_throughput, model_device, nf4_estimate, synthetic_prompt_ids,
)
from harness.measure.roofline import peak_bandwidth

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Three tips for staying healthy are",
]
DRIFT_KEY = "bench:drift-reference"

_say = progress("harness-bench")


def _parser() -> argparse.ArgumentParser:
    p = ToolParser(
        prog="harness-bench",
        description="Measure weights, peak memory, prefill/decode speed and output drift of a model's "
                    "variants (fp16, NF4, with and without the LoRA adapter) in one process.",
    )
    p.add_argument("--model", default=None, help="registry name, model folder, .gguf or hub id (default: registry default)")
    p.add_argument("--config", default=None, metavar="NAME|PATH",
                   help="config-only: an architecture built from its config.json with random weights, a shipped "
                        "name (" + ", ".join(_shipped()) + ") or a config.json path; instead of --model")
    p.add_argument("--work-dir", default=None,
                   help="where --config writes the random model (default: a temporary folder, removed after); "
                        "a RAM disk such as /dev/shm saves the disk round trip of a large model")
    p.add_argument("--sweep", default=None, metavar="BxP,...",
                   help="batch x prompt-token shapes to measure peaks, KV cache and speed at, e.g. 1x128,8x512 "
                        "(default: --batch x --prompt-tokens); each generates --new-tokens")
    p.add_argument("--bandwidth", type=float, default=None, metavar="GB/s",
                   help="peak memory bandwidth for the decode roofline (default: from a table of known GPUs)")
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


def _shipped() -> list[str]:
    from harness.models.synthetic import shipped_configs

    return list(shipped_configs())


def parse_sweep(text: str | None, *, new_tokens: int) -> list[Shape]:
    """``--sweep 1x128,8x512``: (batch, prompt tokens) pairs, each generating ``new_tokens``."""
    shapes: list[Shape] = []
    for part in (text or "").split(","):
        part = part.strip().lower()
        if not part:
            continue
        batch, sep, prompt = part.partition("x")
        if not sep or not batch.isdigit() or not prompt.isdigit() or int(batch) < 1 or int(prompt) < 1:
            raise ValueError(f"--sweep {text!r}: {part!r} is not BATCHxPROMPT_TOKENS (e.g. 8x512); give a comma "
                             "list of positive whole numbers")
        shapes.append(Shape(batch=int(batch), prompt_tokens=int(prompt), new_tokens=new_tokens))
    if text is not None and not shapes:
        raise ValueError(f"--sweep {text!r}: no shape given; e.g. --sweep 1x128,8x512")
    return shapes



def main(argv: list[str] | None = None) -> int:
    """Exit 0: every variant measured (or unavailable on this platform, which the report says); 1: a variant
    failed to load, the report is incomplete; 2: nothing measured (a usage error, found before a model loads, or
    a model that cannot be used); 3: an unexpected error inside the harness."""
    args = _parser().parse_args(argv)
    return run_tool("harness-bench", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    golden = golden_dirs(args.golden_dir, args.registry)
    out = check_out_folder("--out", args.out, golden_dirs=golden, writes=OUTPUTS)
    if args.work_dir is not None:  # --config writes a whole model folder and a registry there
        check_out_folder("--work-dir", args.work_dir, golden_dirs=golden, writes=())
    check_registry(args.registry, required=args.config is None)  # --config writes its own
    check_variants(args.variants)
    check_adapter("--adapter", args.adapter)
    report = run_bench(args)
    write_outputs(report, out)
    print(render_markdown(report))
    _say(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'memory.png'}")
    failed = [row["variant"] for row in report["variants"] if row.get("status") == "failed"]
    if failed:
        _say(f"{', '.join(failed)} failed to load: the report is incomplete")
        return EXIT_FINDING
    return EXIT_OK


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the variants of ``--model``, or of ``--config``'s random model (removed afterwards)."""
    if args.config is None:
        return _run(args, synthetic=None)
    if args.model is not None:
        raise ValueError("--config and --model both given: --config builds a random model of an architecture, "
                         "--model loads a real one; pass one of them")
    import shutil
    import tempfile

    from harness.models.devices import pick_device
    from harness.models.synthetic import materialize

    created = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="harness-bench-")) if created else Path(args.work_dir)
    try:
        synthetic = materialize(args.config, out_dir=work, device=pick_device(args.device).name, progress=_say)
        registry = work / "models.yaml"
        name = synthetic.folder.name
        registry.write_text(json.dumps({"default": name, "models": {name: {
            "path": str(synthetic.folder), "adapter": str(synthetic.adapter),
            "description": f"{synthetic.name} config with random weights"}}}, indent=2))
        args = argparse.Namespace(**{**vars(args), "model": name, "registry": str(registry), "adapter": None})
        return _run(args, synthetic=synthetic.figures())
    finally:
        if created:
            shutil.rmtree(work, ignore_errors=True)
        else:
            for path in work.glob("*-random*"):
                shutil.rmtree(path, ignore_errors=True)


def _run(args: argparse.Namespace, *, synthetic: dict[str, Any] | None) -> dict[str, Any]:
    """Measure the variants; every figure comes from the checks' own functions."""
    from harness.measure.drift import compare_to_reference, default_reference, reference_observation
    from harness.measure.footprint import Workload, measure_memory
    from harness.observe.prompts import encode_prompt
    from harness.errors import HarnessError
    from harness.models.pool import VariantUnavailable
    from harness.models.provenance import adapter_fingerprint, model_fingerprint
    from harness.models.machine import library_versions
    from harness.run.session import HarnessSession, Options
    from harness.models.variants import RUN_ORDER, VariantSpec

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
    new_tokens = max(2, args.new_tokens)
    shapes = parse_sweep(args.sweep, new_tokens=new_tokens) or [
        Shape(batch=args.batch, prompt_tokens=args.prompt_tokens, new_tokens=new_tokens)]
    shape = shapes[0]
    bandwidth = peak_bandwidth(_gpu_name(device), override_gb_s=args.bandwidth)
    drift_ids = [encode_prompt(tokenizer, prompt=p, messages=None) for p in prompts]
    fp16 = VariantSpec("fp16", False)
    # A variant's reference observation is taken while it is loaded (as the drift check does);
    # random weights have no behaviour to drift from.
    references = set() if synthetic else {fp16.key} | {default_reference(v).key for v in variants if v.lora}

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
            "layout_at_load": mem.layout_at_load, "layout": mem.layout,
        }
        if variant.quant == "nf4":
            row["nf4_estimate"] = nf4_estimate(loaded.model).figures()
        row["sweep"] = []
        for each in shapes:
            _say(f"{variant.key}: {each}")
            row["sweep"].append(measure_shape(loaded.model, tokenizer, each, device=device, rounds=args.rounds,
                                              warmup=args.warmup, weight_bytes=mem.weights_bytes
                                              + (mem.quant_state_bytes or 0), bandwidth=bandwidth))
        first = row["sweep"][0]
        row["throughput"] = first.get("throughput") or {"error": first.get("error")}
        row["drift"] = {}
        if synthetic:
            row["drift"] = {"skipped": "random weights (config-only): no behaviour to drift from"}
            continue
        if variant.key in references:
            _say(f"{variant.key}: reference continuations for drift")
            pool.observe(variant, DRIFT_KEY, lambda l, v=variant: reference_observation(
                l.model, tokenizer, drift_ids, args.drift_tokens, variant=v.key))
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
    from harness.bench.doc import flags

    measured = [r for r in rows if "memory" in r]
    label = "GPU peak allocated" if device.is_cuda else "process RSS"
    return {
        "synthetic": synthetic,
        "bandwidth": bandwidth.figures() if bandwidth else None,
        "flags": flags(measured, peak_label=label),
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
            "throughput_shape": asdict(shape), "sweep": [asdict(x) for x in shapes],
            "rounds": args.rounds, "warmup_rounds": args.warmup,
            "drift_prompts": prompts, "drift_new_tokens": args.drift_tokens,
            "nf4_bits_per_weight": NF4_BITS_PER_WEIGHT, "units": "MiB = 2**20 bytes",
        },
        "load_counts": dict(pool.load_counts),
        "variants": rows,
    }


def measure_shape(model: Any, tokenizer: Any, shape: Shape, *, device: Any, rounds: int, warmup: int,
                  weight_bytes: int, bandwidth: Any) -> dict[str, Any]:
    """One shape: the KV cache it holds, then the peak around its timed rounds, then the roofline.

    A shape that does not fit (out of memory) is recorded as such; the next shape still runs.
    """
    import torch

    from harness.measure import measure_peak, release_memory
    from harness.measure.roofline import decode_roofline_fraction, kv_cache_bytes, measured_kv_cache_bytes

    out: dict[str, Any] = {"shape": asdict(shape)}
    total = shape.prompt_tokens + shape.new_tokens
    try:
        ids = torch.tensor([synthetic_prompt_ids(tokenizer, total)] * shape.batch, device=model_device(model))
        kv = measured_kv_cache_bytes(model, ids)
        del ids
        if kv is None:
            kv = kv_cache_bytes(model.config, batch=shape.batch, tokens=total)
            out["kv_cache_source"] = "config (full attention)"
        out["kv_cache_bytes"] = int(kv)
        thr, peak = measure_peak(lambda: measure_throughput(model, tokenizer, shape, device=device, rounds=rounds,
                                                            warmup_rounds=warmup), device=device)
    except torch.OutOfMemoryError as exc:
        release_memory(device)
        out["error"] = f"out of memory: {str(exc).splitlines()[0][:160]}"
        return out
    out["throughput"] = {**thr.figures(), "rounds_s": [asdict(r) for r in thr.rounds]}
    out["peak"] = {**asdict(peak), "label": peak.label}
    kv_mid = int(kv * (shape.prompt_tokens + shape.new_tokens / 2) / total)
    out["roofline_fraction"] = decode_roofline_fraction(
        weight_bytes=weight_bytes, kv_bytes_mid=kv_mid, decode_tokens_per_s=thr.decode_tokens_per_s,
        batch=shape.batch, bandwidth=bandwidth)
    out["bytes_per_decode_step"] = weight_bytes + kv_mid
    return out


def _gpu_name(device: Any) -> str | None:
    if not device.is_cuda:
        return None
    import torch

    return torch.cuda.get_device_name(device.name)


def _cpu_info(device: Any) -> dict[str, Any]:
    import os

    import torch

    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.is_cuda:
        info["gpu"] = torch.cuda.get_device_name(device.name)
        info["cuda"] = torch.version.cuda
    return info


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
