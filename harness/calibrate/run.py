"""``harness-calibrate``: measure a model's numerical noise on this device and recommend tolerances.

Runs the greedy prompts of the suites under benign perturbations (attention kernels, CPU thread
count and SIMD level, a padded batch, no KV cache), measures how far each moves the chosen
tokens' log-probabilities along the reference path, and prints the tolerances per variant as a
``defaults:`` block a suite can take::

    harness-calibrate --model smollm2-135m --variants fp16,nf4 --out calib/

A perturbation set by an environment variable (``ATEN_CPU_CAPABILITY``) needs a fresh process:
it runs in a worker subprocess that scores the same paths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness.judge.tolerance import MAX_NATS, tolerance_problem
from harness.cli import (
    EXIT_FINDING, EXIT_OK, ToolParser, ToolUsageError, check_adapter, check_attn, check_out_folder, check_registry,
    check_variants, finite_number, golden_dir_argument, golden_dirs, run_tool, whole_number,
)
from harness.judge.noise import (
    FLOORS, Item, Noise, Recommendation, Scored, forced, forced_batch, measure, paths_from_json, paths_to_json,
    recommend, reference_paths, score_single_pass, smallest_margins,
)
from harness.report.outputs import strict_json

CONDITIONS = ("kernels", "threads", "env", "batch", "cache", "dither", "repeat")
# Above this factor even the floors (the smallest recommendation) exceed the bound suites enforce.
MAX_SAFETY = MAX_NATS / max(FLOORS.values())


def _parser() -> argparse.ArgumentParser:
    p = ToolParser(
        prog="harness-calibrate",
        description="Measure how far benign numeric changes (attention kernel, threads, SIMD level, padded "
                    "batch, KV cache) move a model's greedy log-probabilities, per variant, and print the "
                    "tolerances to put in a suite's defaults.",
    )
    p.add_argument("suites", nargs="*", default=["suites"], help="suite files or folders whose greedy prompts are used (default: suites/)")
    p.add_argument("--model", default=None, help="registry name, model folder, .gguf or hub id (default: registry default)")
    p.add_argument("--registry", default="models.yaml", help="model registry (default: ./models.yaml)")
    p.add_argument("--variants", default=None, help="comma list out of fp16,nf4,fp16-lora,nf4-lora (default: all known)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (overrides the registry)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--attn-implementation", default=None, metavar="KERNEL",
                   help="the reference kernel (default: the registry's, else transformers' default)")
    p.add_argument("--conditions", default=",".join(CONDITIONS[:-1]),
                   help=f"comma list out of {','.join(CONDITIONS)} (default: all but repeat; repeat "
                        "is added on CUDA, where kernels need not be deterministic)")
    p.add_argument("--env", action="append", default=None, metavar="NAME=VALUE",
                   help="an environment setting to measure in a fresh process (repeatable; default on an "
                        "AVX-512 CPU: ATEN_CPU_CAPABILITY=avx2)")
    p.add_argument("--max-new-tokens", type=whole_number(minimum=1), default=None,
                   help="cap on each prompt's new tokens (default: each check's own max_new_tokens, the goldens' "
                        "full length: late steps are where noise has accumulated most)")
    p.add_argument("--max-prompts", type=whole_number(minimum=1), default=None, help="use at most this many prompts")
    p.add_argument("--safety", type=finite_number(minimum=1.0, maximum=MAX_SAFETY,
                                                  what="below 1 a recommendation fails the noise it was measured on; "
                                                       f"above {MAX_SAFETY:g} even the floors exceed the "
                                                       f"{MAX_NATS:g}-nat bound suites enforce"),
                   default=3.0, help=f"recommended tolerance = observed max x SAFETY (default 3, 1..{MAX_SAFETY:g})")
    p.add_argument("--regressions", nargs="?", const="default", default=None, metavar="LIST",
                   help="also measure constructed regressions (KIND:VALUE list out of weights, rope_theta, "
                        "rms_norm_eps, lora_b; bare flag: a default set) and whether the tolerances catch them")
    p.add_argument("--golden-device", default=None, metavar="CLASS",
                   help="also score the greedy goldens that device class recorded (cpu, cuda-sm90, ...) on this "
                        "device, and report the cross-device noise as a factor of the same-device noise")
    p.add_argument("--out", default=None, help="write calibration.json, calibration.md and tolerance.yaml here")
    golden_dir_argument(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


OUTPUTS = ("calibration.json", "calibration.md", "tolerance.yaml")


def main(argv: list[str] | None = None) -> int:
    """Exit 0: tolerances recommended; 1: a variant's noise is beyond the bound suites enforce (none recommended
    for it); 2: nothing measured (a usage error, found before a model loads, or a model that cannot be used);
    3: an unexpected error inside the harness."""
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(Path(args.worker))
    return run_tool("harness-calibrate", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    out = validate_arguments(args)
    result = run_calibration(args)
    markdown, snippet = render_markdown(result), render_yaml(result)
    print(markdown)
    print(snippet)
    if result.get("cross_device"):
        from harness.calibrate.crossdevice import summary_lines

        cross = result["cross_device"]
        print("\n".join(summary_lines(result["model"], result["device"], cross["golden_class"], result["variants"])))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(strict_json(result, indent=2, sort_keys=True) + "\n")
        (out / "calibration.md").write_text(markdown + "\n```yaml\n" + snippet + "```\n")
        (out / "tolerance.yaml").write_text(snippet)
        _say(f"wrote {out / 'calibration.json'}, {out / 'calibration.md'}, {out / 'tolerance.yaml'}")
    refused = [key for key, data in result["variants"].items() if data.get("refused")]
    if refused:
        _say(f"no tolerance recommended for {', '.join(refused)}: the measured noise is beyond what a suite accepts "
             "(see above)")
        return EXIT_FINDING
    return EXIT_OK


def validate_arguments(args: argparse.Namespace) -> Path | None:
    """Every argument checked before a model is resolved or loaded; the output folder, if any."""
    out = None
    if args.out:
        out = check_out_folder("--out", args.out, golden_dirs=golden_dirs(args.golden_dir, args.registry),
                               writes=OUTPUTS)
    check_registry(args.registry, required=True)
    check_variants(args.variants)
    check_adapter("--adapter", args.adapter)
    check_attn("--attn-implementation", args.attn_implementation)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise ToolUsageError(f"--conditions {args.conditions!r}: " + (f"unknown condition {unknown[0]!r}" if unknown
                             else "no condition") + f". Fix: choose from {','.join(CONDITIONS)}.")
    for setting in args.env or []:
        name, sep, _ = setting.partition("=")
        if not sep or not name.strip():
            raise ToolUsageError(f"--env {setting!r}: expected NAME=VALUE. Fix: write the setting as a name, '=' and "
                                 "a value, e.g. --env ATEN_CPU_CAPABILITY=avx2.")
    if args.regressions:
        from harness.calibrate.regressions import KINDS, parse

        try:
            parse(args.regressions)
        except ValueError as exc:
            raise ToolUsageError(f"{exc}. Fix: give KIND:VALUE pairs with KIND one of {', '.join(KINDS)}, "
                                 "e.g. --regressions weights:0.02,lora_b:1.1, or the bare flag for a default set.") \
                from None
    for value in args.suites:
        if not Path(value).exists():
            raise ToolUsageError(f"{value}: no such suite file or folder. Fix: name suite files or folders "
                                 "(default: suites/).")
    return out


def _say(line: str) -> None:
    print(f"harness-calibrate: {line}", file=sys.stderr, flush=True)


# -- what to run --------------------------------------------------------------------------------
def suite_items(paths: list[str], tokenizer: Any, *, max_new_tokens: int | None, max_prompts: int | None) -> list[Item]:
    """The greedy checks of the suites, as prompts; chat prompts need a chat template."""
    from harness.observe.prompts import NoChatTemplate, TemplateRefusal, encode_prompt
    from harness.suites.spec import load_suite

    files: list[Path] = []
    for value in paths:
        path = Path(value)
        if not path.exists():
            raise ValueError(f"{value}: no such suite file or folder")
        files += sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    items: list[Item] = []
    for file in files:
        suite = load_suite(file)
        for entry in suite.checks:
            spec = entry.check.spec
            if entry.check.kind != "greedy":
                continue
            try:
                ids = encode_prompt(tokenizer, prompt=spec.prompt, messages=spec.messages)
            except NoChatTemplate:
                _say(f"{suite.name}::{spec.id}: skipped, the tokenizer has no chat template")
                continue
            except TemplateRefusal as exc:
                _say(f"{suite.name}::{spec.id}: skipped, the chat template refuses its messages ({exc.reason})")
                continue
            cap = spec.max_new_tokens if max_new_tokens is None else min(spec.max_new_tokens, max_new_tokens)
            items.append(Item(f"{suite.name}::{spec.id}", tuple(ids), cap))
    if not items:
        raise ValueError(f"no greedy prompts found in {', '.join(paths)}: calibration needs a suite with "
                         "`kind: greedy` checks")
    return items[:max_prompts] if max_prompts else items


def available_kernels(device: Any) -> list[str]:
    """Attention kernels this device and installation can run."""
    import importlib.util

    kernels = ["eager", "sdpa"]
    if device.is_cuda and importlib.util.find_spec("flash_attn") is not None:
        kernels.append("flash_attention_2")
    return kernels


def default_envs(device: Any) -> list[str]:
    """On an AVX-512 CPU, the AVX2 kernels that other CPUs (and many CI runners) use."""
    if device.is_cuda:
        return []
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return ["ATEN_CPU_CAPABILITY=avx2"] if capability.upper().startswith("AVX512") else []


# -- running --------------------------------------------------------------------------------------
@dataclass
class Context:
    """What every condition needs: the resolved model, the device, the prompts and their paths."""

    resolved: Any
    device: Any
    items: list[Item]
    reference_attn: str | None
    regressions: list[Any]
    cross: CrossDevice | None = None


@dataclass(frozen=True)
class CrossDevice:
    """``--golden-device``: whose goldens to score on this device, and where they are."""

    root: Path
    model: str
    golden_class: str


def run_calibration(args: argparse.Namespace) -> dict[str, Any]:
    from harness.models.devices import pick_device
    from harness.models.pool import ModelPool
    from harness.models.provenance import attn_implementation, library_versions
    from harness.models.registry import check_attn_implementation, load_registry
    from harness.models.sources import resolve
    from harness.models.variants import parse_variants

    registry = load_registry(Path(args.registry))
    rootdir = Path(args.registry).resolve().parent  # relative paths in the registry are relative to it
    resolved = resolve(args.model, registry=registry, rootdir=rootdir, adapter=args.adapter, progress=_say)
    device = pick_device(args.device)
    variants = parse_variants(args.variants, adapter_known=resolved.adapter is not None)
    conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    if device.is_cuda and "repeat" not in conditions:
        conditions.append("repeat")
    requested = args.attn_implementation or resolved.entry.attn_implementation
    if requested:
        check_attn_implementation(requested)
    reference_pool = ModelPool(resolved=resolved, device=device, attn_implementation=requested)
    items = suite_items(args.suites, reference_pool.tokenizer, max_new_tokens=args.max_new_tokens,
                        max_prompts=args.max_prompts)
    from harness.calibrate.regressions import parse

    ctx = Context(resolved, device, items, requested, parse(args.regressions) if args.regressions else [],
                  cross=_cross_device(args, resolved, device))
    envs = args.env if args.env is not None else default_envs(device)
    import torch

    result: dict[str, Any] = {
        "model": resolved.name, "source": resolved.source, "device": device.description,
        "reference": {"attn_implementation": attn_implementation(requested, resolved.path),
                      "threads": torch.get_num_threads() if not device.is_cuda else None,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "items": {it.name: {"prompt_tokens": len(it.prompt_ids), "max_new_tokens": it.max_new_tokens} for it in items},
        "safety": args.safety, "floors": FLOORS, "versions": library_versions(), "variants": {},
        "cross_device": None if ctx.cross is None else {
            "golden_class": ctx.cross.golden_class, "golden_dir": str(ctx.cross.root), "model": ctx.cross.model},
    }
    for variant in variants:
        _say(f"{variant.key}: reference greedy paths of {len(items)} prompts")
        result["variants"][variant.key] = calibrate_variant(ctx, reference_pool, variant, conditions, envs,
                                                            safety=args.safety)
    return result


def calibrate_variant(ctx: Context, pool: Any, variant: Any, conditions: list[str], envs: list[str], *,
                      safety: float) -> dict[str, Any]:
    """Reference paths of one variant, then each condition's scores of them, then tolerances."""
    from harness.errors import HarnessError

    names = [it.name for it in ctx.items]
    try:
        model = pool.get(variant).model
    except HarnessError as exc:
        pool.release()
        return {"skipped": str(exc)}
    reference = reference_paths(model, pool.tokenizer, ctx.items)
    ref_steps = [obs.steps for obs in reference]
    paths = [list(obs.token_ids) for obs in reference]
    observed: list[tuple[Noise, list[Scored]]] = []
    skipped: dict[str, str] = {}
    for name, run in _conditions(ctx, pool, variant, paths, conditions, envs):
        _say(f"{variant.key}: {name}")
        try:
            scores = run()
        except (HarnessError, RuntimeError, OSError, ValueError) as exc:
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _say(f"{variant.key}: {name} skipped ({skipped[name]})")
            continue
        observed.append((measure(name, names, ref_steps, scores), scores))
        _say(f"{variant.key}: {_summary(observed[-1][0])}")
    cross = _measure_cross_device(ctx, pool, variant, [n for n, _ in observed], safety=safety) if ctx.cross else None
    pool.release()
    rec = recommend([n for n, _ in observed], safety=safety)
    refused = tolerance_problem(rec.as_tolerance())
    tolerances = _tolerances(rec, variant.key, half=pool.resolved.half.dtype)
    regressed: list[tuple[Noise, list[Scored]]] = []
    for regression in ctx.regressions:
        if regression.needs_adapter and not variant.lora:
            continue
        _say(f"{variant.key}: regression {regression.name}")
        scores = _regressed(ctx, variant, regression, paths)
        regressed.append((measure(regression.name, names, ref_steps, scores), scores))
        failed = _verdicts(names, reference, scores, tolerances)
        _say(f"{variant.key}: {_summary(regressed[-1][0])}; prompts failed (recommended/default): "
             f"{len(failed['recommended'])}/{len(failed['default'])} of {len(names)}")
    margins = smallest_margins(names, ref_steps)
    return {
        "conditions": [_noise_dict(n, _verdicts(names, reference, s, tolerances)) for n, s in observed],
        "regressions": [_noise_dict(n, _verdicts(names, reference, s, tolerances)) for n, s in regressed],
        "skipped": skipped,
        "recommendation": asdict(rec),
        "refused": refused,  # why a suite would refuse the recommendation (it is then not recommended), or None
        "smallest_margins": {k: {"step": s, "margin": m} for k, (s, m) in margins.items()},
        "fragile": sorted(k for k, (_, m) in margins.items() if m < rec.tie_gap),
        **({"cross_device": cross} if cross is not None else {}),
    }


def _cross_device(args: argparse.Namespace, resolved: Any, device: Any) -> CrossDevice | None:
    """``--golden-device``: refused when it names this device's own class (that is not cross-device)."""
    if not args.golden_device:
        return None
    from harness.suites.names import golden_folder_name, name_problem

    klass = args.golden_device
    if name_problem(klass):
        raise ValueError(f"--golden-device {klass!r}: give a device class as named under the golden folder "
                         "(cpu, cuda-sm90, ...)")
    if klass == device.klass:
        raise ValueError(f"--golden-device {klass}: that is this device's own class ({device.description}); "
                         "cross-device noise needs goldens recorded on another class")
    model = golden_folder_name(resolved.name)
    root = golden_dirs(args.golden_dir, args.registry)[0]
    if not (root / model / klass).is_dir():
        raise ValueError(f"--golden-device {klass}: no goldens of {model!r} for that class under {root} "
                         f"(looked for {root / model / klass}). Fix: pass --golden-dir, or record them there first")
    return CrossDevice(root=root, model=model, golden_class=klass)


def _measure_cross_device(ctx: Context, pool: Any, variant: Any, same: list[Noise], *,
                          safety: float) -> dict[str, Any]:
    """The other class's goldens scored by this variant here, and the factors against ``same``."""
    from harness.judge.tolerance import NoiseModel
    from harness.calibrate.crossdevice import factors, golden_paths, score_goldens, verdicts
    from harness.judge.tolerance import builtin_tolerances

    assert ctx.cross is not None
    paths, skipped = golden_paths(ctx.items, root=ctx.cross.root, model=ctx.cross.model,
                                  device_class=ctx.cross.golden_class, variant=variant.key)
    if not paths:
        return {"skipped": "no comparable golden: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())}
    label = f"cross-device ({ctx.cross.golden_class} goldens)"
    _say(f"{variant.key}: {label}, {len(paths)} goldens")
    noise, scores = score_goldens(pool.get(variant).model, pool.tokenizer, paths, label=label)
    _say(f"{variant.key}: {_summary(noise)}")
    model = NoiseModel(tolerances=builtin_tolerances(pool.resolved.half.dtype))
    builtin = model.tolerance(variant.key)
    return {
        "golden_class": ctx.cross.golden_class, "prompts": len(paths), "steps": noise.steps, "skipped": skipped,
        "noise": _noise_dict(noise, {}), "builtin_factor": model.cross_device_factor,
        "failed_at_builtin": verdicts(paths, scores, model.tolerance(variant.key, cross_device=True)),
        "factors": factors(noise, same, builtin=builtin, safety=safety),
    }


def _conditions(ctx: Context, pool: Any, variant: Any, paths: list[list[int]], conditions: list[str],
                envs: list[str]) -> list[tuple[str, Callable[[], list[Scored]]]]:
    """(name, run) for each perturbation asked for and available here, cheapest first."""
    import torch

    out: list[tuple[str, Callable[[], list[Scored]]]] = []

    def loaded() -> Any:
        return pool.get(variant).model

    if "repeat" in conditions:
        out.append(("repeat", lambda: forced(loaded(), pool.tokenizer, ctx.items, paths)))
    if "batch" in conditions and len(ctx.items) > 1:
        out.append(("padded batch", lambda: forced_batch(loaded(), pool.tokenizer, ctx.items, paths)))
    if "cache" in conditions:
        out.append(("no KV cache (one forward pass)", lambda: score_single_pass(loaded(), ctx.items, paths)))
    if "dither" in conditions:
        out.append(("rounding dither (another kernel's rounding)", lambda: _dithered(loaded(), pool.tokenizer,
                                                                                    ctx.items, paths)))
    if "threads" in conditions and not ctx.device.is_cuda and torch.get_num_threads() > 1:
        # a fresh process: torch's and OpenMP's thread pools are sized once, at start
        out.append((f"threads=1 (default {torch.get_num_threads()})",
                    lambda: _in_subprocess(ctx, variant, paths, "OMP_NUM_THREADS=1")))
    if "kernels" in conditions:
        from harness.models.provenance import attn_implementation

        current = attn_implementation(ctx.reference_attn, ctx.resolved.path)
        for kernel in available_kernels(ctx.device):
            if kernel != current:
                out.append((f"attn={kernel}", lambda k=kernel: _with_kernel(ctx, pool, variant, k, paths)))
    if "env" in conditions:
        for setting in envs:
            out.append((f"env {setting}", lambda s=setting: _in_subprocess(ctx, variant, paths, s)))
    return out


def _dithered(model: Any, tokenizer: Any, items: list[Item], paths: list[list[int]]) -> list[Scored]:
    """The paths scored with every Linear output moved by up to half a unit in the last place (harness.judge.path_noise)."""
    from harness.judge.path_noise import rounding_dither

    with rounding_dither(model):
        return forced(model, tokenizer, items, paths)


def _summary(noise: Noise) -> str:
    """One line per finished condition, so a long run's progress is readable (and not lost)."""
    return (f"{noise.condition}: mean |Δ log p| {noise.mean_abs_dlogp:.4f}, max {noise.max_abs_dlogp:.4f}, "
            f"margin shift {noise.max_gap_shift:.4f}, flips {len(noise.flips)}"
            + (f" (widest gap {noise.max_flip_gap:.4f})" if noise.flips else "")
            + (f", {noise.nonfinite} NaN/inf steps" if noise.nonfinite else ""))


def _tolerances(rec: Recommendation, variant_key: str, *, half: str) -> dict[str, Any]:
    """The recommended tolerance and the engine's built-in default (for a model running in ``half``), to judge
    conditions against."""
    from harness.judge.tolerance import NoiseModel, Tolerance
    from harness.judge.tolerance import builtin_tolerances

    return {"recommended": Tolerance(**rec.as_tolerance(), source="recommended"),
            "default": NoiseModel(tolerances=builtin_tolerances(half)).tolerance(variant_key)}


def _verdicts(names: list[str], reference: list[Any], scores: list[Scored],
              tolerances: dict[str, Any]) -> dict[str, Any]:
    """Per tolerance, the prompts the golden comparison would fail, with its first reason."""
    from harness.judge.noise import judge

    out: dict[str, Any] = {}
    for label, tol in tolerances.items():
        failed = {}
        for name, obs, got in zip(names, reference, scores):
            verdict = judge(obs, got, tol)
            if not verdict.ok:
                failed[name] = verdict.reasons[0]
        out[label] = failed
    return out


def _regressed(ctx: Context, variant: Any, regression: Any, paths: list[list[int]]) -> list[Scored]:
    """The reference paths scored by a modified copy of the model (or adapter)."""
    import dataclasses

    from harness.models.pool import ModelPool
    from harness.calibrate.regressions import apply, cleanup

    workdir = Path(tempfile.mkdtemp(prefix="harness-regression-"))
    try:
        model_dir, adapter_dir = apply(regression, model=ctx.resolved.path, adapter=ctx.resolved.adapter,
                                       workdir=workdir)
        resolved = dataclasses.replace(ctx.resolved, path=model_dir, adapter=adapter_dir)
        pool = ModelPool(resolved=resolved, device=ctx.device, attn_implementation=ctx.reference_attn)
        try:
            return forced(pool.get(variant).model, pool.tokenizer, ctx.items, paths)
        finally:
            pool.release()
    finally:
        cleanup(workdir)


def _with_kernel(ctx: Context, pool: Any, variant: Any, kernel: str, paths: list[list[int]]) -> list[Scored]:
    from harness.models.pool import ModelPool

    pool.release()
    other = ModelPool(resolved=ctx.resolved, device=ctx.device, attn_implementation=kernel)
    try:
        return forced(other.get(variant).model, pool.tokenizer, ctx.items, paths)
    finally:
        other.release()


def _in_subprocess(ctx: Context, variant: Any, paths: list[list[int]], setting: str) -> list[Scored]:
    """Score the paths in a fresh Python whose environment has ``setting`` (NAME=VALUE)."""
    name, sep, value = setting.partition("=")
    if not sep or not name:
        raise ValueError(f"--env {setting!r}: expected NAME=VALUE")
    job = {
        "name": ctx.resolved.name, "path": str(ctx.resolved.path), "source": ctx.resolved.source,
        "entry": ctx.resolved.entry.model_dump(), "adapter": str(ctx.resolved.adapter) if ctx.resolved.adapter else None,
        "device": ctx.device.name.split(":")[0], "variant": variant.key, "attn": ctx.reference_attn,
        "items": [asdict(it) for it in ctx.items], "paths": paths,
    }
    with tempfile.TemporaryDirectory(prefix="harness-calibrate-") as tmp:
        job_file = Path(tmp) / "job.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "harness.calibrate.run", "--worker", str(job_file)],
                              env={**os.environ, name: value}, capture_output=True, text=True, check=False)
        out_file = job_file.with_suffix(".out.json")
        if proc.returncode != 0 or not out_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"worker with {setting} failed: {tail[0]}")
        return paths_from_json(json.loads(out_file.read_text())["paths"])


def _worker(job_file: Path) -> int:
    """Inside the fresh process: load the variant as the parent did and score the paths."""
    from harness.models.devices import pick_device
    from harness.models.pool import ModelPool
    from harness.models.registry import ModelEntry
    from harness.models.sources import ResolvedModel
    from harness.models.variants import VariantSpec

    job = json.loads(job_file.read_text())
    resolved = ResolvedModel(job["name"], Path(job["path"]), ModelEntry(**job["entry"]), job["source"],
                             Path(job["adapter"]) if job["adapter"] else None)
    pool = ModelPool(resolved=resolved, device=pick_device(job["device"]), attn_implementation=job["attn"])
    items = [Item(d["name"], tuple(d["prompt_ids"]), d["max_new_tokens"]) for d in job["items"]]
    paths = forced(pool.get(VariantSpec.from_key(job["variant"])).model, pool.tokenizer, items, job["paths"])
    job_file.with_suffix(".out.json").write_text(json.dumps({"paths": paths_to_json(paths)}))
    return 0


# -- rendering ---------------------------------------------------------------------------------
def _noise_dict(noise: Noise, failed: dict[str, Any]) -> dict[str, Any]:
    return {
        "failed": failed,
        "condition": noise.condition, "steps": noise.steps, "mean_abs_dlogp": noise.mean_abs_dlogp,
        "max_abs_dlogp": noise.max_abs_dlogp, "max_gap_shift": noise.max_gap_shift,
        "nonfinite": noise.nonfinite, "flips": [asdict(f) for f in noise.flips],
        "items": {k: asdict(v) for k, v in noise.items.items()},
    }


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


if __name__ == "__main__":
    raise SystemExit(main())
