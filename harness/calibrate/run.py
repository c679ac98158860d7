"""``harness-calibrate``: measure a model's numerical noise on this device and recommend tolerances.

Runs the greedy prompts of the suites under benign perturbations (attention kernels, CPU thread
count and SIMD level, a padded batch, no KV cache), measures how far each moves the chosen
tokens' log-probabilities along the reference path, and prints the tolerances per variant as a
``defaults:`` block a suite can take::

    harness-calibrate --model smollm2-135m --variants fp16,nf4 --out calib/

A perturbation set by an environment variable (``ATEN_CPU_CAPABILITY``) needs a fresh process:
it runs in a worker subprocess that scores the same paths.

This module is the command line: arguments, all checked before a model loads, and the
files written. The run is ``calibration.py``'s, the perturbations ``conditions.py``'s (and
``worker.py``'s, in a fresh process), the report ``render.py``'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.calibrate import calibration
from harness.calibrate.render import render_markdown, render_yaml
from harness.cli import (
    EXIT_FINDING, EXIT_OK, ToolParser, ToolUsageError, check_adapter, check_attn, check_out_folder, check_registry,
    check_variants, finite_number, golden_dir_argument, golden_dirs, run_tool, whole_number,
)
from harness.judge.noise import FLOORS
from harness.judge.tolerance import MAX_NATS
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
        from harness.calibrate.worker import run_job

        return run_job(Path(args.worker))
    return run_tool("harness-calibrate", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    out = validate_arguments(args)
    result = calibration.run_calibration(args)
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
        calibration.say(f"wrote {out / 'calibration.json'}, {out / 'calibration.md'}, {out / 'tolerance.yaml'}")
    refused = [key for key, data in result["variants"].items() if data.get("refused")]
    if refused:
        calibration.say(f"no tolerance recommended for {', '.join(refused)}: the measured noise is beyond what a "
                        "suite accepts (see above)")
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


if __name__ == "__main__":
    raise SystemExit(main())
