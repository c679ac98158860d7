"""A calibration run: reference greedy paths per variant, each perturbation's noise on them, the tolerances.

``harness-calibrate``'s command line (``run.py``) hands its checked arguments here; the
perturbations themselves are ``conditions.py``'s, and the printed report ``render.py``'s.
The result is one plain dictionary (``calibration.json``), so rendering never re-measures.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from harness.calibrate.conditions import default_envs, perturbations, regression_scores
from harness.calibrate.context import Context, CrossDevice
from harness.cli import golden_dirs, progress
from harness.judge.tolerance import tolerance_problem
from harness.judge.noise import (
    FLOORS, Item, Noise, Recommendation, Scored, measure, recommend, reference_paths, smallest_margins,
)

say = progress("harness-calibrate")
"""Progress on stderr, one line each (the calibration's steps are long)."""


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
                say(f"{suite.name}::{spec.id}: skipped, the tokenizer has no chat template")
                continue
            except TemplateRefusal as exc:
                say(f"{suite.name}::{spec.id}: skipped, the chat template refuses its messages ({exc.reason})")
                continue
            cap = spec.max_new_tokens if max_new_tokens is None else min(spec.max_new_tokens, max_new_tokens)
            items.append(Item(f"{suite.name}::{spec.id}", tuple(ids), cap))
    if not items:
        raise ValueError(f"no greedy prompts found in {', '.join(paths)}: calibration needs a suite with "
                         "`kind: greedy` checks")
    return items[:max_prompts] if max_prompts else items


def run_calibration(args: argparse.Namespace) -> dict[str, Any]:
    from harness.models.devices import pick_device
    from harness.models.pool import ModelPool
    from harness.models.provenance import attn_implementation
    from harness.models.machine import library_versions
    from harness.models.registry import check_attn_implementation, load_registry
    from harness.models.sources import resolve
    from harness.models.variants import parse_variants

    registry = load_registry(Path(args.registry))
    rootdir = Path(args.registry).resolve().parent  # relative paths in the registry are relative to it
    resolved = resolve(args.model, registry=registry, rootdir=rootdir, adapter=args.adapter, progress=say)
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
        say(f"{variant.key}: reference greedy paths of {len(items)} prompts")
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
    for name, run in perturbations(ctx, pool, variant, paths, conditions, envs):
        say(f"{variant.key}: {name}")
        try:
            scores = run()
        except (HarnessError, RuntimeError, OSError, ValueError) as exc:
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            say(f"{variant.key}: {name} skipped ({skipped[name]})")
            continue
        observed.append((measure(name, names, ref_steps, scores), scores))
        say(f"{variant.key}: {_summary(observed[-1][0])}")
    cross = _measure_cross_device(ctx, pool, variant, [n for n, _ in observed], safety=safety) if ctx.cross else None
    pool.release()
    rec = recommend([n for n, _ in observed], safety=safety)
    refused = tolerance_problem(rec.as_tolerance())
    tolerances = _tolerances(rec, variant.key, half=pool.resolved.half.dtype)
    regressed: list[tuple[Noise, list[Scored]]] = []
    for regression in ctx.regressions:
        if regression.needs_adapter and not variant.lora:
            continue
        say(f"{variant.key}: regression {regression.name}")
        scores = regression_scores(ctx, variant, regression, paths)
        regressed.append((measure(regression.name, names, ref_steps, scores), scores))
        failed = _verdicts(names, reference, scores, tolerances)
        say(f"{variant.key}: {_summary(regressed[-1][0])}; prompts failed (recommended/default): "
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
    say(f"{variant.key}: {label}, {len(paths)} goldens")
    noise, scores = score_goldens(pool.get(variant).model, pool.tokenizer, paths, label=label)
    say(f"{variant.key}: {_summary(noise)}")
    model = NoiseModel(tolerances=builtin_tolerances(pool.resolved.half.dtype))
    builtin = model.tolerance(variant.key)
    return {
        "golden_class": ctx.cross.golden_class, "prompts": len(paths), "steps": noise.steps, "skipped": skipped,
        "noise": _noise_dict(noise, {}), "builtin_factor": model.cross_device_factor,
        "failed_at_builtin": verdicts(paths, scores, model.tolerance(variant.key, cross_device=True)),
        "factors": factors(noise, same, builtin=builtin, safety=safety),
    }


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


def _noise_dict(noise: Noise, failed: dict[str, Any]) -> dict[str, Any]:
    return {
        "failed": failed,
        "condition": noise.condition, "steps": noise.steps, "mean_abs_dlogp": noise.mean_abs_dlogp,
        "max_abs_dlogp": noise.max_abs_dlogp, "max_gap_shift": noise.max_gap_shift,
        "nonfinite": noise.nonfinite, "flips": [asdict(f) for f in noise.flips],
        "items": {k: asdict(v) for k, v in noise.items.items()},
    }

