"""The harness's state for one pytest session: options, the model, its pool and goldens.

Options are validated when pytest starts; the model is resolved (fetched,
converted) only once items that need it were collected, and loaded lazily.
The state lives on the pytest config (``harness_state``), so the plugin's hooks and the
collector both reach it from here, neither from the other.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from harness.run.ci import in_ci
from harness.errors import NotJudged
from harness.golden import SuiteNames
from harness.suites.names import golden_folder_name
from harness.models.variants import VariantSpec, parse_variants

if TYPE_CHECKING:
    from harness.checks.base import CheckContext
    from harness.models.devices import Device
    from harness.golden import GoldenStore
    from harness.models.pool import ModelPool
    from harness.models.placement import Placement
    from harness.models.registry import ModelEntry, Registry
    from harness.run.shard import Shard
    from harness.models.sources import ResolvedModel
    from harness.suites.spec import CheckEntry, SuiteSpec


@dataclass(frozen=True)
class Options:
    """The ``harness`` command-line options, validated."""

    model: str | None
    registry: Path
    variants: str | None
    adapter: str | None
    device: str
    golden_dir: Path
    update: bool
    rootdir: Path
    obtained_dir: Path | None = None
    attn_implementation: str | None = None
    golden_device: str | None = None  # --golden-device
    reference: str | None = None  # --reference: judge every check against this model, live
    reference_adapter: str | None = None  # --reference-adapter: OLD's adapter (an absolute folder)
    shard: Shard | None = None  # --shard K/N
    device_map: str | None = None  # --device-map, --max-memory, --offload-folder (over the registry's)
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: Path | None = None
    result: Path | None = None  # --harness-result: the machine-readable result file
    one_pass_goldens: bool = False  # --one-pass-goldens: greedy goldens judged from one pass only (not the gate's verdict)


class HarnessSession:
    def __init__(self, options: Options) -> None:
        self.options = options
        self._registry: Registry | None = None
        self._variants: list[VariantSpec] | None = None
        self._resolved: ResolvedModel | None = None
        self._pool: ModelPool | None = None
        self._reference_resolved: ResolvedModel | None = None
        self._reference_pool: ModelPool | None = None
        self._goldens: GoldenStore | None = None
        self._device: Device | None = None
        self.suite_errors = 0
        self.suite_names = SuiteNames()
        self.removed_temp_files: list[Path] = []
        self.removed_sidecars: list[Path] = []  # sidecars without a golden, removed when an update starts
        self.progress_lines: list[str] = []
        self.unselected: list[str] = []  # checks whose `variants:` selects none of this session's
        self.suites_without_registry: list[Path] = []
        self.worker_numerics: dict[str, Any] | None = None  # xdist controller: a worker's, where the model ran

    # -- cheap, at collection ---------------------------------------------------
    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from harness.models.registry import load_registry

            self._registry = load_registry(self.options.registry)
        return self._registry

    @property
    def model_name(self) -> str:
        """The registry name (or folder name) goldens are stored under, without resolving."""
        return self._display_name(self.options.model or self.registry.default)

    @property
    def reference_name(self) -> str | None:
        """``--reference``'s name as reports show it (OLD), None outside reference mode."""
        return None if self.options.reference is None else self._display_name(self.options.reference)

    def _display_name(self, value: str) -> str:
        if value in self.registry.models:
            return golden_folder_name(value)
        path = Path(value)
        name = path.stem if path.suffix == ".gguf" else path.name
        return golden_folder_name(name or path.resolve().name)

    @property
    def variants(self) -> list[VariantSpec]:
        if self._variants is None:
            value = self.options.model or self.registry.default
            entry = self.registry.models.get(value)
            adapter_known = bool(self.options.adapter or (entry and entry.adapter))
            self._variants = parse_variants(self.options.variants, adapter_known=adapter_known)
        return self._variants

    # -- expensive, once items need a model ----------------------------------------
    def resolve(self, progress: Any = None) -> ResolvedModel:
        if self._resolved is None:
            from harness.models.sources import resolve

            def note(line: str) -> None:
                self.progress_lines.append(line)
                if progress:
                    progress(line)

            self._resolved = resolve(
                self.options.model, registry=self.registry, rootdir=self.options.rootdir,
                adapter=self.options.adapter, progress=note,
            )
        return self._resolved

    def resolve_reference(self, progress: Any = None) -> ResolvedModel | None:
        """OLD in reference mode, with the adapter ``reference_adapter`` picks."""
        if self.options.reference is not None and self._reference_resolved is None:
            from harness.models.sources import resolve

            adapter, _ = self.reference_adapter()
            self._reference_resolved = resolve(
                self.options.reference, registry=self.registry, rootdir=self.options.rootdir, adapter=adapter,
                progress=progress or (lambda _: None), option="--reference")
        return self._reference_resolved

    def reference_adapter(self) -> tuple[str | None, bool]:
        """OLD's adapter and whether it is NEW's (``harness.run.reference.pick_reference_adapter``)."""
        from harness.models.sources import adapter_folder
        from harness.run.reference import pick_reference_adapter

        opts = self.options
        if opts.reference is None:
            return None, False
        models = self.registry.models
        new = models.get(opts.model or self.registry.default)
        return pick_reference_adapter(option=opts.reference_adapter, old=models.get(opts.reference or ""),
                                      new=adapter_folder(opts.adapter, new.adapter if new else None, opts.rootdir))

    @property
    def device(self) -> Device:
        if self._device is None:
            from harness.models.devices import pick_device

            self._device = pick_device(self.options.device)
        return self._device

    @property
    def pool(self) -> ModelPool:
        if self._pool is None:
            from harness.models.pool import ModelPool

            resolved = self.resolve()
            self._pool = ModelPool(resolved=resolved, device=self.device,
                                   attn_implementation=self.options.attn_implementation,
                                   placement=self.placement(resolved.entry))
        return self._pool

    @property
    def reference_pool(self) -> ModelPool:
        """OLD's pool in reference mode: same device and attention kernel as NEW's."""
        if self._reference_pool is None:
            from harness.models.pool import ModelPool

            resolved = self.resolve_reference()
            assert resolved is not None, "reference_pool outside reference mode"
            self._reference_pool = ModelPool(resolved=resolved, device=self.device,
                                             attn_implementation=self.options.attn_implementation,
                                             placement=self.placement(resolved.entry))
            new = self.pool.resolved.half
            if resolved.half.dtype != new.dtype:
                self._reference_pool.notes.append(
                    f"runs in {resolved.half.describe()}, NEW in {new.describe()}: every 16-bit comparison judges "
                    "the change of half precision together with the model's; set dtype: on a registry entry to "
                    "compare like with like")
        return self._reference_pool

    def placement(self, entry: ModelEntry) -> Placement | None:
        """The command line's placement over the registry entry's; None: the whole model on one device."""
        from harness.models.placement import Placement

        opts = self.options
        folder = opts.offload_folder or (self.options.rootdir / entry.offload_folder if entry.offload_folder else None)
        device_map = opts.device_map or entry.device_map
        max_memory = opts.max_memory or entry.max_memory
        if device_map is None and max_memory is None and folder is None:
            return None
        if folder is None:  # peft re-dispatches an adapter's base and needs a folder for what goes to disk
            from harness.models.sources import cache_dir

            folder = cache_dir() / "offload" / self.model_name
        return Placement(device_map=device_map or "auto", max_memory=max_memory, offload_folder=folder)

    @property
    def goldens(self) -> GoldenStore:
        if self._goldens is None:
            from harness.golden import GoldenStore

            self._goldens = GoldenStore(
                root=self.options.golden_dir, model=self.model_name, device_class=self.device.klass,
                update=self.options.update, provenance=self.provenance(),
                obtained_dir=self.options.obtained_dir, judge_device=self.options.golden_device,
                rootdir=self.options.rootdir, gate=in_ci(),
            )
        return self._goldens

    def provenance(self, *, reference: bool = False) -> dict[str, Any]:
        """Where the model (or, with ``reference``, OLD in reference mode) comes from, for sidecars and reports."""
        from harness.models.machine import NUMERICS_KEY, library_versions
        from harness.models.provenance import (
            adapter_fingerprint, attn_implementation, model_fingerprint, tokenizer_fingerprint,
        )

        resolved = self.resolve_reference() if reference else self.resolve()
        assert resolved is not None, "reference provenance outside reference mode"
        pool = self.reference_pool if reference else self.pool
        return {
            "model": self.reference_name if reference else self.model_name,
            "source": resolved.source,
            "revision": resolved.revision,
            "model_fingerprint": model_fingerprint(resolved.path),
            "tokenizer_fingerprint": tokenizer_fingerprint(resolved.path),
            "adapter_fingerprint": adapter_fingerprint(resolved.adapter),
            "device": self.device.klass,
            "attn_implementation": attn_implementation(pool.requested_attn, resolved.path),
            "versions": library_versions(),
            NUMERICS_KEY: self.numerics(),
        }

    def numerics(self) -> dict[str, Any]:
        """This machine's numerics as the model sees them: an xdist controller, which loads no model, takes a
        worker's (the CPU is the same, the threads are the worker's) rather than importing bitsandbytes."""
        from harness.models.machine import numerics

        return self.worker_numerics if self.worker_numerics is not None else numerics(self.device.klass.split("-")[0])

    # -- running ----------------------------------------------------------------
    def run_check(self, suite: SuiteSpec, entry: CheckEntry, variant: VariantSpec | None,
                  request: pytest.FixtureRequest) -> None:
        __tracebackhide__ = True
        from harness.checks.base import CheckContext
        from harness.models.pool import VariantUnavailable

        reference = self.options.reference is not None
        models = entry.check.spec.models
        names = [self.model_name] + ([self.reference_name or ""] if reference else [])
        if models is not None and not set(names) & set(models):
            unknown = self._unknown_models(models)
            if unknown:
                raise _not_judged(request, unknown)
            raise _skip_here(f"{entry.check.spec.id} was written for {', '.join(models)} (its `models:` key), not "
                             f"for {' or '.join(names)}: add this model there, or write its own check")
        if entry.check.needs_gpu and not self.device.is_cuda:
            reason = f"{entry.check.kind} needs a CUDA device; running on {self.device.description}"
            if reference:
                raise _not_judged(request, reason)
            raise _skip_here(reason)
        if reference:
            self._run_against_reference(suite, entry, variant, request)
            return
        ctx = CheckContext(
            suite=suite.name, suite_path=suite.path, check_id=entry.check.spec.id, variant=variant,
            pool=self.pool, goldens=self.goldens, device=self.device, request=request,
            one_pass_goldens=self.options.one_pass_goldens,
        )
        golden = ctx.golden_path()
        heard = len(self.pool.logit_alarms)
        try:
            entry.check.run(ctx)
        except NotJudged as exc:
            raise self._logits_alarm(heard) or _not_judged(request, str(exc)) from None
        except VariantUnavailable as exc:
            expected = self._variant_has_goldens(variant)
            if expected is not None:
                raise _not_judged(request, f"{exc}; but goldens for {variant} on this device class exist "
                                           f"({expected}), so this machine should run it") from None
            raise _skip_here(str(exc)) from None
        except pytest.skip.Exception as exc:
            raise self._logits_alarm(heard) or _skip_here(exc.msg) from None
        else:
            alarm = self._logits_alarm(heard)
            if alarm is not None:
                raise alarm
        finally:
            # user_properties travel to the xdist controller and into JUnit XML
            goldens = self.goldens
            if golden in goldens.used or os.path.exists(golden):
                request.node.user_properties.append(("harness_golden", str(golden)))
            if golden in goldens.written or golden in goldens.updated:
                request.node.user_properties.append(("harness_golden_written", str(golden)))

    def _logits_alarm(self, heard: int) -> BaseException | None:
        """The first non-finite-logits error raised since the pool had ``heard`` of them: it fails the item
        even where the check caught it (as a decoding error, a skip), so NaN never ends as a pass or a skip."""
        alarms = self.pool.logit_alarms
        return alarms[heard] if len(alarms) > heard else None

    def _unknown_models(self, models: list[str]) -> str | None:
        """Why a check's ``models:`` looks like a typo (a name neither registered nor this session's), or None.

        A check written for other registered models skips here as a matter of course; one whose
        list names no model anyone has would skip everywhere, green, and judge nothing ever.
        """
        import difflib

        known = set(self.registry.models) | {golden_folder_name(name) for name in self.registry.models}
        known.add(self.model_name)
        if self.reference_name is not None:
            known.add(self.reference_name)
        unknown = [name for name in models if name not in known]
        if not unknown:
            return None
        match = difflib.get_close_matches(unknown[0], sorted(known), n=1)
        return (f"its `models:` names {unknown[0]!r}, which is neither a model of the registry "
                f"{self.options.registry.name} ({', '.join(sorted(self.registry.models))}) nor this session's model "
                f"{self.model_name!r}, so it would never run anywhere"
                + (f"; did you mean {match[0]!r}?" if match else "; a typo, or a model folder not registered?")
                + " Fix: correct the name, or register that model")

    def _run_against_reference(self, suite: SuiteSpec, entry: CheckEntry, variant: VariantSpec | None,
                               request: pytest.FixtureRequest) -> None:
        """Reference mode: the check judges NEW against OLD, both run in this session (``harness.run.reference``).

        Nothing under the golden folder is read or written; whatever cannot be judged
        (a skip, a variant that does not load) is NOT JUDGED, never a plain skip.
        """
        __tracebackhide__ = True
        from harness.checks.base import CheckContext
        from harness.run.reference import LiveReference, Recorder, ReferencePair, reference_sides
        from harness.models.pool import VariantUnavailable

        sides = reference_sides(new=self.model_name, old=self.reference_name or "")

        def context(pool: ModelPool, goldens: Any, **side: str) -> CheckContext:
            return CheckContext(suite=suite.name, suite_path=suite.path, check_id=entry.check.spec.id,
                                variant=variant, pool=pool, goldens=goldens, device=self.device, request=request,
                                sides=sides, one_pass_goldens=self.options.one_pass_goldens, **side)

        recorder = Recorder()
        live = LiveReference(records=recorder.records, label=f"{sides.actual} vs {sides.expected}",
                             old=sides.expected)
        pair = ReferencePair(
            old=context(self.reference_pool, recorder, figure_prefix="old_", note_prefix=f"{sides.expected}: "),
            new=context(self.pool, live),
        )
        try:
            entry.check.run_against_reference(pair)
        except (NotJudged, VariantUnavailable) as exc:
            raise _not_judged(request, str(exc)) from None
        except pytest.skip.Exception as exc:
            raise _not_judged(request, exc.msg) from None

    def _variant_has_goldens(self, variant: VariantSpec | None) -> Path | None:
        """The golden folder of ``variant`` on this device class, when it holds goldens."""
        if variant is None:
            return None
        folder = self.options.golden_dir / self.model_name / self.device.klass / variant.key
        with contextlib.suppress(OSError):
            if folder.is_dir() and any(folder.rglob("*.json")):
                return folder
        return None


SESSION_KEY = pytest.StashKey[HarnessSession]()


def harness_state(config: pytest.Config) -> HarnessSession:
    """The session's harness state, kept on the pytest config (the plugin puts it there at configure)."""
    return config.stash[SESSION_KEY]


def _not_judged(request: pytest.FixtureRequest, reason: str) -> BaseException:
    """A skip tagged as "not judged": in a gate run the session fails because of it."""
    from harness.errors import NOT_JUDGED_PROPERTY

    request.node.user_properties.append((NOT_JUDGED_PROPERTY, reason))
    return _skip_here(f"NOT JUDGED: {reason}")


def _skip_here(reason: str) -> BaseException:
    """A skip reported at the suite's YAML line, not inside the harness."""
    exc = pytest.skip.Exception(reason, _use_item_location=True)
    return exc
