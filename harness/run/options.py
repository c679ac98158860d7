"""The harness's command-line options: declared, then checked together before anything runs.

A bad value is one usage error naming the option and the fix, raised while pytest configures,
not one error per item an hour later; ``plugin.py`` only wires this into pytest's hooks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from harness.run.ci import in_ci
from harness.errors import HarnessError
from harness.report.outputs import output_in_golden_problem, output_options
from harness.run.session import Options


def add_options(parser: pytest.Parser) -> None:
    """One ``harness`` group in ``pytest --help``, next to syrupy's ``--snapshot-update``."""
    group = parser.getgroup("harness", "behaviour tests of causal language models (harness)")
    group.addoption("--model", default=None, metavar="NAME|PATH",
                    help="registry name, local model folder, .gguf file or hub id (default: the registry's default)")
    group.addoption("--reference", default=None, metavar="NAME|PATH",
                    help="reference mode: judge every check against a live run of this model (OLD; resolved like "
                         "--model) on the same variant and device, instead of golden files; the report reads NEW vs OLD")
    group.addoption("--registry", default=None, metavar="FILE",
                    help="model registry (default: models.yaml at the rootdir)")
    group.addoption("--variants", default=None, metavar="LIST",
                    help="comma list out of fp16,nf4,fp16-lora,nf4-lora (default: all; -lora ones where an adapter is known)")
    group.addoption("--adapter", default=None, metavar="PATH",
                    help="LoRA adapter folder; overrides the registry's adapter")
    group.addoption("--reference-adapter", default=None, metavar="PATH|NAME",
                    help="with --reference: the LoRA adapter OLD's -lora variants apply, a folder or a registry "
                         "name (its adapter); overrides OLD's registry adapter (default: OLD's own, else NEW's, "
                         "and the summary says so)")
    group.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where models run (default: auto, a GPU when there is one)")
    group.addoption("--attn-implementation", default=None, metavar="KERNEL",
                    help="attention kernel for this run (eager, sdpa, flash_attention_2, ...); overrides the "
                         "registry's attn_implementation. Env: HARNESS_ATTN_IMPLEMENTATION")
    group.addoption("--device-map", default=None, metavar="STRATEGY",
                    help="spread a model that does not fit one device over GPUs, CPU and disk (accelerate: auto, "
                         "balanced, balanced_low_0, sequential); overrides the registry's device_map")
    group.addoption("--max-memory", default=None, metavar="DEV=SIZE,...",
                    help="per-device limits for --device-map, e.g. 0=20GiB,cpu=60GiB (implies --device-map auto); "
                         "what does not fit goes to the next device, then to disk")
    group.addoption("--offload-folder", default=None, metavar="DIR",
                    help="where weights offloaded to disk are kept (implies --device-map auto)")
    group.addoption("--golden-dir", default=None, metavar="DIR",
                    help="golden files root (default: golden/ at the rootdir)")
    group.addoption("--harness-report", default=None, metavar="FILE.md",
                    help="write a Markdown summary of the session (pasteable as a pull-request comment)")
    group.addoption("--harness-obtained", default=None, metavar="DIR",
                    help="on a golden mismatch, write what was obtained under DIR (same layout as goldens)")
    group.addoption("--golden-device", default=None, metavar="CLASS|auto",
                    help="where this device class has no goldens, judge against another class's (e.g. cpu; "
                         "auto: the nearest recorded) with cross-device tolerances (x3, assumed: not measured "
                         "yet); never writes there. Under CI it needs --allow-cross-device-in-ci")
    group.addoption("--allow-cross-device-in-ci", action="store_true", default=False,
                    help="allow --golden-device when the CI environment variable is set")
    group.addoption("--shard", default=None, metavar="K/N",
                    help="run shard K of N: whole load groups (a variant's items, the model-level items) dealt "
                         "deterministically, so N jobs run every item once and each loads a variant at most once; "
                         "merge their --harness-result files with `harness-report merge`")
    group.addoption("--harness-result", default=None, metavar="FILE.json|DIR",
                    help="write the session's machine-readable result (verdicts, reasons, figures, provenance, "
                         "commit, golden and suite hashes) for `harness-report merge`; a folder gets "
                         "harness-result-K-of-N.json")
    group.addoption("--one-pass-goldens", action="store_true", default=False,
                    help="judge greedy goldens from one forward pass over each golden's path only, never "
                         "decoding: faster, NOT the gate's verdict (a close call the one pass accepts can make "
                         "a real decode diverge). By default an item whose one pass is not decisive (a flip, a "
                         "near-tie margin, bounds nearly used up) is judged by a real decode")
    group.addoption("--allow-update-in-ci", action="store_true", default=False,
                    help="allow --snapshot-update when the CI environment variable is set")
    parser.addini("harness_suites", type="linelist", default=[],
                  help="glob patterns (relative to the rootdir) of YAML files outside suites/ that are "
                       "harness suites; YAML elsewhere is collected only when named on the command line")


def options_from_config(config: pytest.Config) -> Options:
    """Every option checked before anything runs: a bad value is one usage error, not N item errors."""
    root = Path(config.rootpath)
    golden = Path(config.getoption("golden_dir") or root / "golden")
    if golden.exists() and not golden.is_dir():
        raise pytest.UsageError(f"--golden-dir {golden}: this is a file, not a folder. Fix: pass a folder.")
    update = bool(config.getoption("update_snapshots", default=False))
    if update and in_ci() and not config.getoption("allow_update_in_ci"):
        raise pytest.UsageError(
            "--snapshot-update refused: the CI environment variable is set, and a CI job that rewrites "
            "goldens would pass on any change. Fix: update goldens on your machine and commit the reviewed "
            "diff, or pass --allow-update-in-ci if this job really should write them (CI=false or CI=0 "
            "means not CI)."
        )
    if config.getoption("golden_device") and in_ci() and not config.getoption("allow_cross_device_in_ci"):
        raise pytest.UsageError(
            f"--golden-device {config.getoption('golden_device')} refused: the CI environment variable is set, and a "
            "gate that judges one device class against another's goldens uses a cross-device tolerance that is "
            "assumed (x3), not measured, so it forgives an unknown amount. Fix: record this device class's own "
            "goldens with --snapshot-update and commit them, or pass --allow-cross-device-in-ci to accept the "
            "assumed tolerance on purpose."
        )
    reference = config.getoption("reference")
    if reference is not None and update:
        raise pytest.UsageError(
            f"--reference {reference} with --snapshot-update: reference mode judges the model against a live "
            "run of the reference and never reads or writes golden files, so there is nothing to update. "
            "Fix: drop --snapshot-update to compare NEW with OLD, or drop --reference to record goldens."
        )
    for flag, dest in (("--golden-device", "golden_device"), ("--harness-obtained", "harness_obtained")):
        if reference is not None and config.getoption(dest):
            raise pytest.UsageError(
                f"--reference {reference} with {flag}: reference mode judges against a live run of the reference "
                f"model, not golden files, so {flag} (which concerns goldens) would be silently ignored. Fix: drop "
                f"{flag}, or drop --reference to judge against goldens."
            )
    variants = _variants_option(config.getoption("variants"))
    registry = _registry_option(config.getoption("registry"), root / "models.yaml")
    _writable_file_option("--harness-report", config.getoption("harness_report"))
    for flag, value, erases in output_options(config.option):
        problem = output_in_golden_problem(flag, value, golden, erases=erases)
        if problem:
            raise pytest.UsageError(problem)
    adapter = config.getoption("adapter")
    if adapter:
        _adapter_option(f"--adapter {adapter}", Path(adapter).expanduser())
    reference_adapter = _reference_adapter_option(config.getoption("reference_adapter"), reference=reference,
                                                  registry=registry, root=root)
    obtained = config.getoption("harness_obtained")
    if obtained and Path(obtained).exists() and not Path(obtained).is_dir():
        raise pytest.UsageError(f"--harness-obtained {obtained}: this is a file, not a folder. Fix: pass a folder.")
    if obtained:
        from harness.golden import overlap_problem

        problem = overlap_problem(golden, Path(obtained))
        if problem:
            raise pytest.UsageError(problem)
    option_attn = config.getoption("attn_implementation")
    attn = option_attn or os.environ.get("HARNESS_ATTN_IMPLEMENTATION") or None
    if attn:
        from harness.models.registry import check_attn_implementation

        try:
            check_attn_implementation(attn)
        except ValueError as exc:
            where = "--attn-implementation" if option_attn else \
                "the environment variable HARNESS_ATTN_IMPLEMENTATION (read when --attn-implementation is not given)"
            fix = "" if option_attn else " Fix: correct or unset HARNESS_ATTN_IMPLEMENTATION."
            raise pytest.UsageError(f"{where}: {exc}.{fix}") from None
    shard, result = _shard_options(config.getoption("shard"), config.getoption("harness_result"))
    device_map, max_memory, offload = _placement_options(config)
    return Options(
        model=config.getoption("model"), registry=registry, variants=variants,
        adapter=adapter, device=config.getoption("device"),
        golden_dir=golden.resolve(), update=update, rootdir=root,
        obtained_dir=Path(obtained).resolve() if obtained else None,
        attn_implementation=attn,
        golden_device=_golden_device(config.getoption("golden_device")),
        reference=reference, reference_adapter=reference_adapter, shard=shard, result=result,
        device_map=device_map, max_memory=max_memory, offload_folder=offload,
        one_pass_goldens=bool(config.getoption("one_pass_goldens", default=False)),
    )


def _adapter_option(given: str, path: Path) -> None:
    """An adapter folder checked from its files alone (no torch): a bad one is one usage error now, which
    starts with the option as ``given``."""
    from harness.models.adapters import adapter_config

    try:
        adapter_config(path)
    except HarnessError as exc:
        raise pytest.UsageError(f"{given}: " + str(exc).removeprefix(f"Adapter {path}: ")) from None


def _reference_adapter_option(value: str | None, *, reference: str | None, registry: Path, root: Path) -> str | None:
    """``--reference-adapter`` as the absolute folder OLD's ``-lora`` variants load: a folder (relative to the
    working directory, as ``--adapter``), or a registry entry's ``adapter:`` (relative to the rootdir)."""
    if value is None:
        return None
    if reference is None:
        raise pytest.UsageError(
            f"--reference-adapter {value} without --reference: it is the adapter of the reference model (OLD), "
            "and there is no reference model in this run. Fix: add --reference OLD, or use --adapter for the "
            "model under test.")
    given, path = f"--reference-adapter {value}", Path(value).expanduser()
    entry = None if path.exists() else _registry_entry(registry, value)
    if entry is not None and not entry.adapter:
        raise pytest.UsageError(
            f"{given}: the registry entry {value!r} has no `adapter:`, so it names no adapter. Fix: pass an "
            "adapter folder, or a registry entry that sets `adapter:`.")
    if entry is not None and entry.adapter:
        from harness.models.sources import adapter_folder

        path = adapter_folder(None, entry.adapter, root) or path
        given += f" (its registry adapter {entry.adapter})"
    _adapter_option(given, path)
    return str(path.absolute())


def _registry_entry(registry: Path, name: str) -> Any:
    """``name``'s registry entry, or None (a registry that does not load is the collection's to report)."""
    from harness.models.registry import load_registry

    try:
        return load_registry(registry).models.get(name) if registry.is_file() else None
    except HarnessError:
        return None


def _placement_options(config: pytest.Config) -> tuple[str | None, Any, Path | None]:
    """``--device-map``, ``--max-memory`` and ``--offload-folder``, checked before anything loads."""
    from harness.models.placement import check_device_map, gpu_limit_problem, parse_max_memory

    device_map, max_memory, folder = (config.getoption(n) for n in ("device_map", "max_memory", "offload_folder"))
    try:
        device_map = None if device_map is None else check_device_map(device_map)
        max_memory = None if max_memory is None else parse_max_memory(max_memory)
    except ValueError as exc:
        raise pytest.UsageError(f"{exc}.") from None
    problem = gpu_limit_problem(max_memory)
    if problem and _runs_on_cpu(config.getoption("device")):
        raise pytest.UsageError(f"--max-memory {config.getoption('max_memory')}: {problem}. Nothing was run.")
    if folder and Path(folder).exists() and not Path(folder).is_dir():
        raise pytest.UsageError(f"--offload-folder {folder}: this is a file, not a folder. Fix: pass a folder.")
    return device_map, max_memory, Path(folder).resolve() if folder else None


def _runs_on_cpu(device: str) -> bool:
    """Whether ``--device`` puts this session on the CPU (``auto`` without a CUDA device)."""
    if device == "cpu":
        return True
    if device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


def _shard_options(shard_text: str | None, result_text: str | None) -> tuple[Any, Path | None]:
    """``--shard K/N`` parsed; ``--harness-result`` as the file it will be (a folder gets a name)."""
    from harness.report.result import result_path
    from harness.run.shard import Shard

    shard = None
    if shard_text is not None:
        try:
            shard = Shard.parse(shard_text)
        except ValueError as exc:
            raise pytest.UsageError(f"{exc}.") from None
    if result_text is None:
        return shard, None
    path = result_path(result_text, shard)
    _writable_file_option("--harness-result", str(path))
    return shard, path.absolute()


def _variants_option(value: str | None) -> str | None:
    """``--variants`` names known variants, at least one: an empty selection would judge nothing."""
    if value is None:
        return None
    from harness.models.variants import ALL_KEYS

    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise pytest.UsageError(
            f"--variants {value!r} selects no variant, so every per-variant check would silently "
            f"disappear. Fix: list at least one of {','.join(ALL_KEYS)}, or leave the option out for all."
        )
    bad = [v for v in names if v not in ALL_KEYS]
    if bad:
        raise pytest.UsageError(f"--variants: unknown variant {bad[0]!r}. Fix: choose from {','.join(ALL_KEYS)}.")
    return value


def _registry_option(value: str | None, default: Path) -> Path:
    """A registry that is a folder (or an explicit one that is missing) is one usage error, not one per suite."""
    path = Path(value) if value else default
    if path.is_dir():
        raise pytest.UsageError(
            f"--registry {path}: this is a folder; the registry is one YAML file. "
            "Fix: pass the file, e.g. --registry models.yaml."
        )
    if value and not path.is_file():
        raise pytest.UsageError(
            f"--registry {path}: no such file. Fix: pass an existing registry file, or leave the option out "
            "for models.yaml at the rootdir."
        )
    return path


def _writable_file_option(name: str, value: str | None) -> None:
    """A report path that cannot be a file is refused now, not after an hour of tests."""
    if not value:
        return
    path = Path(value)
    if path.is_dir():
        raise pytest.UsageError(f"{name} {value}: this is a folder. Fix: pass a file name, e.g. {name} report.md.")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise pytest.UsageError(f"{name} {value}: {parent} is a file, not a folder. Fix: pass a path in a folder.")


def _golden_device(value: str | None) -> str | None:
    from harness.suites.names import name_problem

    if value is not None and name_problem(value):
        raise pytest.UsageError(f"--golden-device {value!r}: give a device class as named under the golden "
                                "folder (cpu, cuda-sm90, ...) or auto.")
    return value
