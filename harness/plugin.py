"""The pytest plugin: options, hooks and fixtures. Thin; the work happens elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from harness.ci import in_ci
from harness.errors import HarnessError
from harness.outputs import LazyBenchmarkJson, output_in_golden_problem, output_options
from harness.report import SessionRecord
from harness.session import SESSION_KEY, HarnessSession, Options, harness_state

_RECORD = pytest.StashKey[SessionRecord]()


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.register(LazyBenchmarkJson(parser), "harness-lazy-benchmark-json")
    group = parser.getgroup("harness", "behaviour tests of causal language models (harness)")
    group.addoption("--model", default=None, metavar="NAME|PATH",
                    help="registry name, local model folder, .gguf file or hub id (default: the registry's default)")
    group.addoption("--reference", default=None, metavar="NAME|PATH",
                    help="reference mode: judge golden-style checks (greedy, tokenization, chat_template, "
                         "generation_config) against a live run of this model (OLD; resolved like --model) on the "
                         "same variant and device, instead of golden files; the report reads NEW vs OLD")
    group.addoption("--registry", default=None, metavar="FILE",
                    help="model registry (default: models.yaml at the rootdir)")
    group.addoption("--variants", default=None, metavar="LIST",
                    help="comma list out of fp16,nf4,fp16-lora,nf4-lora (default: all; -lora ones where an adapter is known)")
    group.addoption("--adapter", default=None, metavar="PATH",
                    help="LoRA adapter folder; overrides the registry's adapter")
    group.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where models run (default: auto, a GPU when there is one)")
    group.addoption("--attn-implementation", default=None, metavar="KERNEL",
                    help="attention kernel for this run (eager, sdpa, flash_attention_2, ...); overrides the "
                         "registry's attn_implementation. Env: HARNESS_ATTN_IMPLEMENTATION")
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
    group.addoption("--allow-update-in-ci", action="store_true", default=False,
                    help="allow --snapshot-update when the CI environment variable is set")
    parser.addini("harness_suites", type="linelist", default=[],
                  help="glob patterns (relative to the rootdir) of YAML files outside suites/ that are "
                       "harness suites; YAML elsewhere is collected only when named on the command line")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "harness: an item generated from a YAML suite")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason where none is")
    # noise from dependencies' imports (torch.jit in bitsandbytes/peft), not from the model under test
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    config.stash[SESSION_KEY] = HarnessSession(_options(config))
    config.stash[_RECORD] = SessionRecord()
    config.pluginmanager.register(_Recorder(config.stash[_RECORD]), "harness-recorder")


def _options(config: pytest.Config) -> Options:
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
        from harness.pool import adapter_config

        try:
            adapter_config(Path(adapter).expanduser())
        except HarnessError as exc:
            raise pytest.UsageError(f"--adapter {adapter}: "
                                    + str(exc).removeprefix(f"Adapter {Path(adapter).expanduser()}: ")) from None
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
        from harness.registry import check_attn_implementation

        try:
            check_attn_implementation(attn)
        except ValueError as exc:
            where = "--attn-implementation" if option_attn else \
                "the environment variable HARNESS_ATTN_IMPLEMENTATION (read when --attn-implementation is not given)"
            fix = "" if option_attn else " Fix: correct or unset HARNESS_ATTN_IMPLEMENTATION."
            raise pytest.UsageError(f"{where}: {exc}.{fix}") from None
    return Options(
        model=config.getoption("model"), registry=registry, variants=variants,
        adapter=adapter, device=config.getoption("device"),
        golden_dir=golden.resolve(), update=update, rootdir=root,
        obtained_dir=Path(obtained).resolve() if obtained else None,
        attn_implementation=attn,
        golden_device=_golden_device(config.getoption("golden_device")),
        reference=reference,
    )


def _variants_option(value: str | None) -> str | None:
    """``--variants`` names known variants, at least one: an empty selection would judge nothing."""
    if value is None:
        return None
    from harness.variants import ALL_KEYS

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
    from harness.names import name_problem

    if value is not None and name_problem(value):
        raise pytest.UsageError(f"--golden-device {value!r}: give a device class as named under the golden "
                                "folder (cpu, cuda-sm90, ...) or auto.")
    return value


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    from harness.collect import SuiteFile, is_suite_file

    if is_suite_file(file_path, parent):
        state = harness_state(parent.config)
        if not state.options.registry.is_file():
            state.suites_without_registry.append(file_path)  # one usage error for all, after collection
            return None
        return SuiteFile.from_parent(parent, path=file_path)
    return None


def pytest_collection(session: pytest.Session) -> None:
    """Validate --variants against the registry before collecting, so a bad value is a usage error."""
    state = harness_state(session.config)
    if not state.options.registry.is_file():
        return  # reported when a suite or fixture needs the registry
    try:
        state.variants  # noqa: B018
    except (HarnessError, ValueError) as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order items so each variant loads once: model-level first, then variant by variant."""
    from harness.collect import HarnessItem

    def order(item: pytest.Item) -> int:
        if isinstance(item, HarnessItem):
            return item.run_order
        spec = getattr(getattr(item, "callspec", None), "params", {}).get("variant")
        from harness.variants import RUN_ORDER, VariantSpec

        if isinstance(spec, VariantSpec):  # a user's own "variant" parameter may be anything
            return RUN_ORDER.index(spec.key)
        return -2

    items.sort(key=order)
    for item in items:
        if isinstance(item, HarnessItem):
            # `pytest -n N --dist loadgroup` keeps a variant's items on one worker: one load each
            variant = item.harness_variant
            item.add_marker(pytest.mark.xdist_group(variant.key if variant else "tokenizer"))


def pytest_collection_finish(session: pytest.Session) -> None:
    """Resolve the model once we know items need it: a missing model stops the session here."""
    orphans = harness_state(session.config).suites_without_registry
    if orphans:
        registry = harness_state(session.config).options.registry
        raise pytest.UsageError(
            f"{len(orphans)} suite file(s) found ({orphans[0]}{', ...' if len(orphans) > 1 else ''}), but the "
            f"model registry {registry} does not exist. Fix: pass --registry FILE, or create models.yaml "
            "at the rootdir (README.md, \"Your own model\")."
        )
    if session.config.option.collectonly:
        return
    if not any("harness_session" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    state = harness_state(session.config)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def progress(line: str) -> None:
        if reporter is not None:
            reporter.write_line(f"harness: {line}")

    try:
        state.variants  # noqa: B018 - validates --variants against the adapter
        state.device  # noqa: B018 - validates --device
        state.resolve(progress=progress)
        state.resolve_reference(progress=progress)
    except (HarnessError, ValueError) as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """A broken suite is an error of that file only: the other suites still run."""
    state = harness_state(session.config)
    if session.testsfailed and session.testsfailed == state.suite_errors:
        session.config.option.continue_on_collection_errors = True


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Ordinary tests that use ``variant`` (or ``model``) run once per active variant."""
    if "variant" in metafunc.fixturenames and not _parametrizes(metafunc, "variant"):
        try:
            variants = harness_state(metafunc.config).variants
        except (HarnessError, ValueError) as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("variant", variants, ids=[v.key for v in variants], scope="function")


def _parametrizes(metafunc: pytest.Metafunc, name: str) -> bool:
    """Whether the test parametrizes ``name`` itself (then it is the user's, not the harness's)."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",")]
        if name in names:
            return True
    return False


@pytest.fixture(scope="session")
def harness_session(request: pytest.FixtureRequest) -> HarnessSession:
    """The harness state: pool, goldens, device. Model resolution errors end the session."""
    state = harness_state(request.config)
    try:
        state.resolve()
    except (HarnessError, ValueError) as exc:
        pytest.exit(str(exc), returncode=4)
    return state


@pytest.fixture
def tokenizer(harness_session: HarnessSession) -> Any:
    """The model's tokenizer (pad token set for causal LMs)."""
    return harness_session.pool.tokenizer


@pytest.fixture
def model(harness_session: HarnessSession, variant: Any) -> Any:
    """The model loaded in the current ``variant`` (loaded once per session per variant)."""
    from harness.pool import VariantUnavailable

    try:
        return harness_session.pool.get(variant).model
    except VariantUnavailable as exc:
        pytest.skip(str(exc))


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = harness_state(config)
    opts = state.options
    if opts.reference is not None:
        return [
            f"harness: reference mode: NEW {opts.model or '(registry default)'} vs OLD {opts.reference} "
            f"registry={opts.registry} device={opts.device} variants={opts.variants or '(all)'} "
            "(golden files are neither read nor written)"
        ]
    return [
        f"harness: model={opts.model or '(registry default)'} registry={opts.registry} "
        f"device={opts.device} variants={opts.variants or '(all)'} goldens={opts.golden_dir}"
        + (" [updating goldens]" if opts.update else "")
    ]


class _Recorder:
    """Hooks that need the config but whose signature lacks it (registered per config)."""

    def __init__(self, record: SessionRecord) -> None:
        self.record = record

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.record.deselected += len(items)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.record.add(report)

    @pytest.hookimpl(optionalhook=True)  # defined by pytest-xdist, which only the dev extra installs
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: each worker's loads and collection notes, for the summary."""
        output = getattr(node, "workeroutput", {})
        loads = output.get("harness_loads")
        if loads:
            self.record.worker_loads[node.gateway.id] = loads
        self.record.add_unselected(output.get("harness_unselected", ()))


def pytest_sessionstart(session: pytest.Session) -> None:
    _warn_unpinned(session.config)
    state = harness_state(session.config)
    if state.options.update and not hasattr(session.config, "workerinput"):
        # before any worker writes: a temporary file found now is an interrupted update's
        from harness.golden import remove_leftover_temp_files, remove_orphan_sidecars

        state.removed_temp_files = remove_leftover_temp_files(state.options.golden_dir)
        state.removed_sidecars = remove_orphan_sidecars(state.options.golden_dir)


def _warn_unpinned(config: pytest.Config) -> None:
    """In gate mode (CI set), an unpinned hub model can change under the goldens."""
    if not in_ci():
        return
    state = harness_state(config)
    if not state.options.registry.is_file():
        return
    try:
        entry = state.registry.models.get(state.options.model or state.registry.default)
    except HarnessError:
        return
    if entry is not None and entry.hub and not (entry.revision and len(entry.revision) == 40):
        import warnings

        warnings.warn(pytest.PytestWarning(
            f"model {entry.hub} has no pinned revision (a 40-hex commit) in {state.options.registry}: "
            "the hub can change it under this gate. Fix: set `revision:` to a commit id."
        ), stacklevel=1)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from harness.report import _pool_loads, markdown

    config = session.config
    state, record = harness_state(config), config.stash[_RECORD]
    if hasattr(config, "workeroutput"):
        if state._pool is not None:
            config.workeroutput["harness_loads"] = _pool_loads(state._pool)
        config.workeroutput["harness_unselected"] = list(state.unselected)
        return
    record.add_unselected(state.unselected)
    if in_ci() and record.unjudged() and not config.option.collectonly and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        record.gate_failed = True
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    if record.flips.exceeded() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # flips that together are not noise
    path = config.getoption("harness_report")
    if path and (record.outcomes or record.unjudged()):
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(markdown(state, record, exitstatus=int(session.exitstatus)), encoding="utf-8")
        except Exception as exc:  # noqa: BLE001 - a report problem must not hide the verdict or flip it
            record.report_error = f"--harness-report {path} could not be written: {type(exc).__name__}: {exc}"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from harness.report import budget_section, terminal_summary, unjudged_section

    state, record = harness_state(config), config.stash[_RECORD]
    terminal_summary(terminalreporter, state, record)
    if state.options.reference is None:  # reference mode reads nothing under the golden folder
        _golden_folder_summary(terminalreporter, state, record, config, exitstatus)
    unjudged_section(terminalreporter, record, ci=in_ci())
    budget_section(terminalreporter, record)
    if record.report_error:
        terminalreporter.write_line(f"harness: {record.report_error}", red=True)


def _golden_folder_summary(terminalreporter: Any, state: HarnessSession, record: SessionRecord,
                           config: pytest.Config, exitstatus: int) -> None:
    from harness.golden import tree_report
    from harness.report import unused_goldens

    if state.removed_temp_files:
        terminalreporter.write_line(f"removed {len(state.removed_temp_files)} leftover temporary files of "
                                    "an interrupted update from the golden folder")
    if state.removed_sidecars:
        terminalreporter.write_line(f"removed {len(state.removed_sidecars)} sidecars whose golden file does not "
                                    "exist from the golden folder")
        for sidecar in state.removed_sidecars:
            terminalreporter.write_line(f"  {sidecar}")
    for line in tree_report(state.options.golden_dir):
        terminalreporter.write_line(line)
    try:
        unused = unused_goldens(state, record, config, exitstatus=int(exitstatus))
    except OSError as exc:
        terminalreporter.write_line(f"goldens that no check used: not listed, the golden folder cannot be read ({exc})")
        unused = None
    if unused is not None and unused:
        terminalreporter.write_line(f"goldens that no check used ({len(unused)}): delete them or restore their checks")
        for file in unused:
            terminalreporter.write_line(f"  {file}")
