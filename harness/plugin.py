"""The pytest plugin: hooks and fixtures. Thin; the work happens elsewhere (options: ``harness.run.options``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.run.ci import in_ci
from harness.errors import HarnessError
from harness.run.options import add_options, options_from_config
from harness.report.outputs import LazyBenchmarkJson
from harness.report.record import SessionRecord
from harness.run.session import SESSION_KEY, HarnessSession, harness_state

if TYPE_CHECKING:
    from harness.run.threads import ThreadShare

_RECORD = pytest.StashKey[SessionRecord]()
_THREADS = pytest.StashKey["ThreadShare | None"]()


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.register(LazyBenchmarkJson(parser), "harness-lazy-benchmark-json")
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    """An xdist worker takes its share of the cores before any conftest can import torch."""
    from harness.run.threads import apply, worker_share

    share = worker_share()
    if share is not None:
        apply(share)
    early_config.stash[_THREADS] = share


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "harness: an item generated from a YAML suite")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason where none is")
    # set on every item for `-n N --dist loadgroup`; pytest-xdist registers it only where it is installed
    config.addinivalue_line("markers", "xdist_group(name): items pytest-xdist keeps on one worker (one load a variant)")
    # noise from dependencies, not from the model under test: torch.jit in bitsandbytes/peft's imports;
    # peft asking a transformers 5 model `is_gradient_checkpointing` whenever it wraps one in an adapter
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
    config.stash[SESSION_KEY] = HarnessSession(options_from_config(config))
    config.stash[_RECORD] = SessionRecord()
    config.pluginmanager.register(_Recorder(config.stash[_RECORD], config.stash[SESSION_KEY]), "harness-recorder")
    options = harness_state(config).options
    if options.result is not None and not hasattr(config, "workerinput"):  # the controller writes it, once
        from harness.report.result import ResultWriter

        config.pluginmanager.register(ResultWriter(config, options.result, shard=options.shard,
                                                   state=harness_state(config), record=config.stash[_RECORD]),
                                      "harness-result")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    from harness.run.collect import SuiteFile, is_suite_file

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
    from harness.run.items import HarnessItem, run_order

    items.sort(key=run_order)
    from harness.run.shard import load_group

    for item in items:
        if isinstance(item, HarnessItem):
            # `pytest -n N --dist loadgroup` keeps a variant's items on one worker: one load each
            item.add_marker(pytest.mark.xdist_group(load_group(item)))


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_shard(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """``--shard K/N`` keeps this shard's load groups, after -k/-m: shards split what the session would run.

    Also with ``--harness-result`` alone: the plan (what was collected) is part of the result.
    """
    options = harness_state(config).options
    if options.shard is None and options.result is None:
        return
    from harness.run.shard import Shard, plan

    kept, dropped, record = plan(items, options.shard or Shard(1, 1), rootdir=Path(config.rootpath))
    config.stash[_RECORD].plan = record
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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
    from harness.models.pool import VariantUnavailable

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

    def __init__(self, record: SessionRecord, state: HarnessSession) -> None:
        self.record, self.state = record, state

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
        if output.get("harness_threads"):
            self.record.worker_threads[node.gateway.id] = output["harness_threads"]
        if output.get("harness_numerics") and self.state.worker_numerics is None:
            self.state.worker_numerics = output["harness_numerics"]
        self.record.add_unselected(output.get("harness_unselected", ()))
        if self.record.plan is None:  # every worker collects the same items, so the same plan
            self.record.plan = output.get("harness_plan")


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
    from harness.report.markdown import markdown
    from harness.report.record import pool_loads

    config = session.config
    state, record = harness_state(config), config.stash[_RECORD]
    if hasattr(config, "workeroutput"):
        if state._pool is not None:
            config.workeroutput["harness_loads"] = pool_loads(state._pool)
        share = config.stash.get(_THREADS, None)
        if share is not None:
            from harness.run.threads import torch_threads

            config.workeroutput["harness_threads"] = {"share": share.as_dict(), "torch": torch_threads()}
        config.workeroutput["harness_unselected"] = list(state.unselected)
        config.workeroutput["harness_plan"] = record.plan
        if state._pool is not None:  # where the model ran: the controller reports these numerics
            config.workeroutput["harness_numerics"] = state.numerics()
        return
    record.add_unselected(state.unselected)
    record.notes[:0] = _reference_notes(state)
    if _empty_shard(state, record, session):
        session.exitstatus = pytest.ExitCode.OK
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


def _reference_notes(state: HarnessSession) -> list[str]:
    """Reference mode's session lines: OLD running ``-lora`` variants with NEW's adapter is said."""
    from harness.run.reference import borrowed_adapter_line

    try:
        adapter, borrowed = state.reference_adapter()
        if adapter is None or not borrowed or not any(variant.lora for variant in state.variants):
            return []
    except (HarnessError, ValueError):  # a registry or --variants that does not load was reported at collection
        return []
    return [borrowed_adapter_line(adapter, old=state.reference_name or "", rootdir=state.options.rootdir)]


def _empty_shard(state: HarnessSession, record: SessionRecord, session: pytest.Session) -> bool:
    """A shard dealt no group (more shards than load groups) ran nothing, rightly: not pytest's 5."""
    return (state.options.shard is not None and session.exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED
            and record.plan is not None and record.plan["collected"] > 0 and not record.plan["selected"])


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from harness.report.summary import budget_section, terminal_summary, unjudged_section

    state, record = harness_state(config), config.stash[_RECORD]
    terminal_summary(terminalreporter, state, record)
    if state.options.reference is None:  # reference mode reads nothing under the golden folder
        _golden_folder_summary(terminalreporter, state, record, config, exitstatus)
    unjudged_section(terminalreporter, record, ci=in_ci())
    budget_section(terminalreporter, record)
    if state.options.shard is not None and record.plan is not None:
        mine = [name for name, group in record.plan["groups"].items() if group["shard"] == state.options.shard.index]
        terminalreporter.write_line(f"harness: shard {state.options.shard}: {len(record.plan['selected'])} of "
                                    f"{record.plan['collected']} items, load groups: {', '.join(mine) or 'none'}")
    writer = config.pluginmanager.get_plugin("harness-result")
    if writer is not None and writer.error:
        terminalreporter.write_line(f"harness: {writer.error}", red=True)
    if record.report_error:
        terminalreporter.write_line(f"harness: {record.report_error}", red=True)


def _golden_folder_summary(terminalreporter: Any, state: HarnessSession, record: SessionRecord,
                           config: pytest.Config, exitstatus: int) -> None:
    from harness.report.display import relative_paths, shown_path
    from harness.golden import tree_report
    from harness.report.summary import unused_goldens

    if state.removed_temp_files:
        terminalreporter.write_line(f"removed {len(state.removed_temp_files)} leftover temporary files of "
                                    "an interrupted update from the golden folder")
    if state.removed_sidecars:
        terminalreporter.write_line(f"removed {len(state.removed_sidecars)} sidecars whose golden file does not "
                                    "exist from the golden folder")
        for sidecar in state.removed_sidecars:
            terminalreporter.write_line(f"  {sidecar}")
    for line in tree_report(state.options.golden_dir):
        terminalreporter.write_line(relative_paths(line, state.options.rootdir))
    try:
        unused = unused_goldens(state, record, config, exitstatus=int(exitstatus))
    except OSError as exc:
        terminalreporter.write_line(f"goldens that no check used: not listed, the golden folder cannot be read ({exc})")
        unused = None
    if unused is not None and unused:
        terminalreporter.write_line(f"goldens that no check used ({len(unused)}): delete them or restore their checks")
        for file in unused:
            terminalreporter.write_line(f"  {shown_path(file, state.options.rootdir)}")
