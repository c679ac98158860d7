"""``harness-diff OLD NEW``: what changed between two models or adapters, and where.

Exit status as ``diff``: 0 no change, 1 changed, 2 the comparison could not be made (a usage
error, found before any model loads, or a model or adapter that cannot be used), 3 an
unexpected error inside the harness (``harness.cli``). Never 1 for anything but a change.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from harness.errors import HarnessError

from harness.cli import (
    EXIT_FINDING, EXIT_OK, ToolParser, check_out_folder, check_registry, golden_dir_argument, golden_dirs, run_tool,
    progress, whole_number,
)
from harness.diff.run import DiffSide

_say = progress("harness-diff")


def _parser() -> argparse.ArgumentParser:
    p = ToolParser(
        prog="harness-diff",
        description="Compare two models and/or LoRA adapters: files, weights, behaviour on the suites' prompts, "
                    "and the first layer where activations diverge beyond noise. Exit status: 0 no change, "
                    "1 changed, 2 the comparison could not be made (a usage error, a model or adapter that cannot "
                    "be used), 3 an unexpected error inside the harness.",
    )
    p.add_argument("old", metavar="OLD", help="registry name, model folder, or adapter folder (on --base)")
    p.add_argument("new", metavar="NEW", help="registry name, model folder, or adapter folder (on --base)")
    p.add_argument("--base", help="base model for an adapter folder (default: the registry's default model)")
    p.add_argument("--registry", default="models.yaml", help="model registry (default: ./models.yaml)")
    p.add_argument("--suites", nargs="*", default=["suites"],
                   help="suite files or folders whose greedy and drift prompts are run (default: suites/); "
                        "none: files and weights only")
    p.add_argument("--max-prompts", type=whole_number(minimum=0), default=8,
                   help="run at most this many prompts (default 8; 0: files and weights only)")
    p.add_argument("--new-tokens", type=whole_number(minimum=1, what="greedy tokens per prompt"), default=8,
                   help="greedy tokens per prompt (default 8)")
    p.add_argument("--quant", choices=["fp16", "nf4"], default="fp16", help="load both as this variant")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto, cpu or cuda")
    p.add_argument("--out", default="model-diff", help="folder for diff.md, diff.json, diff.png")
    golden_dir_argument(p)
    return p


OUTPUTS = ("diff.md", "diff.json", "diff.png")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_tool("harness-diff", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    from harness.models.devices import pick_device
    from harness.diff.prompts import suite_prompts
    from harness.diff.report import summary_lines, write_report
    from harness.diff.run import run_diff

    # every argument is checked before a model is resolved, converted or loaded
    out = check_out_folder("--out", args.out, golden_dirs=golden_dirs(args.golden_dir, args.registry),
                           writes=OUTPUTS)
    check_registry(args.registry, required=False)
    prompts = suite_prompts([Path(s) for s in args.suites])[: args.max_prompts]
    device = pick_device(args.device)
    registry = _registry(Path(args.registry))
    old = resolve_side(args.old, registry=registry, base=args.base, role="OLD")
    new = resolve_side(args.new, registry=registry, base=args.base, role="NEW")
    diff = run_diff(old, new, prompts=prompts, device=device, quant=args.quant,
                    new_tokens=args.new_tokens, progress=_say)
    written = write_report(diff, out)
    for line in summary_lines(diff):
        print(line)
    _say("wrote " + ", ".join(str(p) for p in written))
    return EXIT_OK if diff.unchanged else EXIT_FINDING


def _registry(path: Path):  # type: ignore[no-untyped-def]
    """The registry if there is one; folders alone need none."""
    from harness.models.registry import Registry, load_registry

    if path.is_file():
        return load_registry(path)
    return Registry(path=path, default="", models={})


def resolve_side(value: str, *, registry, base: str | None, role: str) -> DiffSide:  # type: ignore[no-untyped-def]
    """A registry name or model folder (no adapter), or an adapter folder applied to ``base``."""
    from harness.errors import ModelNotFoundError

    try:
        return _resolve_side(value, registry=registry, base=base, role=role)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"{role}: " + str(exc).removeprefix(f"{role} ")) from None


def _resolve_side(value: str, *, registry, base: str | None, role: str) -> DiffSide:  # type: ignore[no-untyped-def]
    from harness.errors import ModelNotFoundError
    from harness.models.adapters import adapter_config
    from harness.models.sources import resolve

    rootdir = registry.path.parent.resolve()
    folder = Path(value).expanduser()
    if (folder / "adapter_config.json").is_file() or (folder.is_dir() and any(folder.glob("adapter_model.*"))):
        try:
            adapter_config(folder)
        except HarnessError as exc:
            raise HarnessError(f"{role}: {exc}") from None
        base_name = base or registry.default
        if not base_name:
            raise ModelNotFoundError(f"{role} {value} is an adapter folder: pass --base MODEL (no registry default "
                                     "here).")
        resolved = resolve(base_name, registry=registry, rootdir=rootdir, adapter=str(folder.resolve()),
                           progress=_say, option="--base")
        return DiffSide(f"{base_name} + {folder.name}", resolved)
    resolved = resolve(value, registry=registry, rootdir=rootdir, progress=_say, option=role)
    return DiffSide(value if value in registry.models else folder.name, dataclasses.replace(resolved, adapter=None))


if __name__ == "__main__":
    sys.exit(main())
