"""The pytest plugin: options, hooks and fixtures. Thin; the work happens elsewhere."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from harness.errors import HarnessError
from harness.report import SessionRecord
from harness.session import HarnessSession, Options

_STATE = pytest.StashKey[HarnessSession]()
_RECORD = pytest.StashKey[SessionRecord]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness", "behaviour tests of causal language models (harness)")
    group.addoption("--model", default=None, metavar="NAME|PATH",
                    help="registry name, local model folder, .gguf file or hub id (default: the registry's default)")
    group.addoption("--registry", default=None, metavar="FILE",
                    help="model registry (default: models.yaml at the rootdir)")
    group.addoption("--variants", default=None, metavar="LIST",
                    help="comma list out of fp16,nf4,fp16-lora,nf4-lora (default: all; -lora ones where an adapter is known)")
    group.addoption("--adapter", default=None, metavar="PATH",
                    help="LoRA adapter folder; overrides the registry's adapter")
    group.addoption("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where models run (default: auto, a GPU when there is one)")
    group.addoption("--golden-dir", default=None, metavar="DIR",
                    help="golden files root (default: golden/ at the rootdir)")
    group.addoption("--harness-report", default=None, metavar="FILE.md",
                    help="write a Markdown summary of the session (pasteable as a pull-request comment)")
    group.addoption("--harness-obtained", default=None, metavar="DIR",
                    help="on a golden mismatch, write what was obtained under DIR (same layout as goldens)")
    group.addoption("--golden-device", default=None, metavar="CLASS|auto",
                    help="where this device class has no goldens, judge against another class's (e.g. cpu; "
                         "auto: the nearest recorded) with cross-device tolerances; never writes there")
    group.addoption("--allow-update-in-ci", action="store_true", default=False,
                    help="allow --snapshot-update when the CI environment variable is set")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "harness: an item generated from a YAML suite")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason where none is")
    # noise from dependencies' imports (torch.jit in bitsandbytes/peft), not from the model under test
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
    config.stash[_STATE] = HarnessSession(_options(config))
    config.stash[_RECORD] = SessionRecord()
    config.pluginmanager.register(_Recorder(config.stash[_RECORD]), "harness-recorder")


def _options(config: pytest.Config) -> Options:
    root = Path(config.rootpath)
    golden = Path(config.getoption("golden_dir") or root / "golden")
    if golden.exists() and not golden.is_dir():
        raise pytest.UsageError(f"--golden-dir {golden}: this is a file, not a folder. Fix: pass a folder.")
    update = bool(config.getoption("update_snapshots", default=False))
    if update and os.environ.get("CI") and not config.getoption("allow_update_in_ci"):
        raise pytest.UsageError(
            "--snapshot-update refused: the CI environment variable is set, and a CI job that rewrites "
            "goldens would pass on any change. Fix: update goldens on your machine and commit the reviewed "
            "diff, or pass --allow-update-in-ci if this job really should write them."
        )
    variants = config.getoption("variants")
    if variants:
        from harness.variants import ALL_KEYS

        bad = [v for v in variants.split(",") if v.strip() and v.strip() not in ALL_KEYS]
        if bad:
            raise pytest.UsageError(f"--variants: unknown variant {bad[0]!r}. Fix: choose from {','.join(ALL_KEYS)}.")
    registry = Path(config.getoption("registry") or root / "models.yaml")
    return Options(
        model=config.getoption("model"), registry=registry, variants=variants,
        adapter=config.getoption("adapter"), device=config.getoption("device"),
        golden_dir=golden.resolve(), update=update, rootdir=root,
        obtained_dir=Path(config.getoption("harness_obtained")).resolve() if config.getoption("harness_obtained") else None,
        golden_device=_golden_device(config.getoption("golden_device")),
    )


def _golden_device(value: str | None) -> str | None:
    from harness.golden import name_is_safe

    if value is not None and not name_is_safe(value):
        raise pytest.UsageError(f"--golden-device {value!r}: give a device class as named under the golden "
                                "folder (cpu, cuda-sm90, ...) or auto.")
    return value


def harness_state(config: pytest.Config) -> HarnessSession:
    """The session's harness state; harness errors here are usage errors."""
    return config.stash[_STATE]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    from harness.collect import SuiteFile, is_suite_file

    if is_suite_file(file_path, parent):
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
        if spec is not None:
            from harness.variants import RUN_ORDER

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
    if "variant" in metafunc.fixturenames:
        try:
            variants = harness_state(metafunc.config).variants
        except (HarnessError, ValueError) as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("variant", variants, ids=[v.key for v in variants], scope="function")


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

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist controller: each worker's load counts, for the summary."""
        loads = getattr(node, "workeroutput", {}).get("harness_loads")
        if loads:
            self.record.worker_loads[node.gateway.id] = loads


def pytest_sessionstart(session: pytest.Session) -> None:
    _warn_unpinned(session.config)


def _warn_unpinned(config: pytest.Config) -> None:
    """In gate mode (CI set), an unpinned hub model can change under the goldens."""
    if not os.environ.get("CI"):
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
        return
    path = config.getoption("harness_report")
    if path and record.outcomes:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(markdown(state, record, exitstatus=int(exitstatus)), encoding="utf-8")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    from harness.report import terminal_summary, unused_goldens

    state, record = harness_state(config), config.stash[_RECORD]
    terminal_summary(terminalreporter, state, record)
    unused = unused_goldens(state, record, config, exitstatus=int(exitstatus))
    if unused is not None and unused:
        terminalreporter.write_line(f"goldens that no check used ({len(unused)}): delete them or restore their checks")
        for file in unused:
            terminalreporter.write_line(f"  {file}")
