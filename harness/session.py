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

from harness.ci import in_ci
from harness.errors import NotJudged
from harness.golden import SuiteNames
from harness.names import golden_folder_name
from harness.variants import VariantSpec, parse_variants

if TYPE_CHECKING:
    from harness.checks.base import CheckContext
    from harness.devices import Device
    from harness.golden import GoldenStore
    from harness.pool import ModelPool
    from harness.registry import Registry
    from harness.sources import ResolvedModel
    from harness.spec import CheckEntry, SuiteSpec


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
    reference: str | None = None  # --reference: judge golden-style checks against this model, live


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

    # -- cheap, at collection ---------------------------------------------------
    @property
    def registry(self) -> Registry:
        if self._registry is None:
            from harness.registry import load_registry

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
            from harness.sources import resolve

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
        """OLD in reference mode: its registry adapter, else the same ``--adapter`` as NEW."""
        if self.options.reference is None:
            return None
        if self._reference_resolved is None:
            import dataclasses

            from harness.sources import resolve

            resolved = resolve(self.options.reference, registry=self.registry, rootdir=self.options.rootdir,
                               progress=progress or (lambda _: None), option="--reference")
            if resolved.adapter is None and self.options.adapter:
                resolved = dataclasses.replace(resolved, adapter=self.resolve().adapter)
            self._reference_resolved = resolved
        return self._reference_resolved

    @property
    def device(self) -> Device:
        if self._device is None:
            from harness.devices import pick_device

            self._device = pick_device(self.options.device)
        return self._device

    @property
    def pool(self) -> ModelPool:
        if self._pool is None:
            from harness.pool import ModelPool

            self._pool = ModelPool(resolved=self.resolve(), device=self.device,
                                   attn_implementation=self.options.attn_implementation)
        return self._pool

    @property
    def reference_pool(self) -> ModelPool:
        """OLD's pool in reference mode: same device and attention kernel as NEW's."""
        if self._reference_pool is None:
            from harness.pool import ModelPool

            resolved = self.resolve_reference()
            assert resolved is not None, "reference_pool outside reference mode"
            self._reference_pool = ModelPool(resolved=resolved, device=self.device,
                                             attn_implementation=self.options.attn_implementation)
        return self._reference_pool

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
        from harness.provenance import (
            adapter_fingerprint, attn_implementation, library_versions, model_fingerprint, tokenizer_fingerprint,
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
        }

    # -- running ----------------------------------------------------------------
    def run_check(self, suite: SuiteSpec, entry: CheckEntry, variant: VariantSpec | None,
                  request: pytest.FixtureRequest) -> None:
        __tracebackhide__ = True
        from harness.checks.base import CheckContext
        from harness.pool import VariantUnavailable

        models = entry.check.spec.models
        if models is not None and self.model_name not in models:
            unknown = self._unknown_models(models)
            if unknown:
                raise _not_judged(request, unknown)
            pytest.skip(f"{entry.check.spec.id} was written for {', '.join(models)} (its `models:` key), not for "
                        f"{self.model_name}: add this model there, or write its own check")
        if entry.check.needs_gpu and not self.device.is_cuda:
            pytest.skip(f"{entry.check.kind} needs a CUDA device; running on {self.device.description}")
        if self.options.reference is not None:
            self._run_against_reference(suite, entry, variant, request)
            return
        ctx = CheckContext(
            suite=suite.name, suite_path=suite.path, check_id=entry.check.spec.id, variant=variant,
            pool=self.pool, goldens=self.goldens, device=self.device, request=request,
        )
        golden = ctx.golden_path()
        try:
            entry.check.run(ctx)
        except NotJudged as exc:
            raise _not_judged(request, str(exc)) from None
        except VariantUnavailable as exc:
            expected = self._variant_has_goldens(variant)
            if expected is not None:
                raise _not_judged(request, f"{exc}; but goldens for {variant} on this device class exist "
                                           f"({expected}), so this machine should run it") from None
            raise _skip_here(str(exc)) from None
        except pytest.skip.Exception as exc:
            raise _skip_here(exc.msg) from None
        finally:
            # user_properties travel to the xdist controller and into JUnit XML
            goldens = self.goldens
            if golden in goldens.used or os.path.exists(golden):
                request.node.user_properties.append(("harness_golden", str(golden)))
            if golden in goldens.written or golden in goldens.updated:
                request.node.user_properties.append(("harness_golden_written", str(golden)))

    def _unknown_models(self, models: list[str]) -> str | None:
        """Why a check's ``models:`` looks like a typo (a name neither registered nor this session's), or None.

        A check written for other registered models skips here as a matter of course; one whose
        list names no model anyone has would skip everywhere, green, and judge nothing ever.
        """
        import difflib

        known = set(self.registry.models) | {golden_folder_name(name) for name in self.registry.models}
        known.add(self.model_name)
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
        """Reference mode: a golden-style check runs on OLD (recorded), then on NEW judged against that record.

        Other kinds run on NEW only; one that asks for a golden anyway fails (nothing was recorded),
        never passes unjudged. Nothing under the golden folder is read or written.
        """
        __tracebackhide__ = True
        from harness.checks.base import CheckContext
        from harness.diff.reference import LiveReference, Recorder, reference_sides
        from harness.pool import VariantUnavailable, make_room

        sides = reference_sides(new=self.model_name, old=self.reference_name or "")

        def context(pool: ModelPool, goldens: Any) -> CheckContext:
            return CheckContext(suite=suite.name, suite_path=suite.path, check_id=entry.check.spec.id,
                                variant=variant, pool=pool, goldens=goldens, device=self.device, request=request,
                                sides=sides)

        try:
            records = self._record_reference(entry, context(self.reference_pool, Recorder())) \
                if entry.check.uses_goldens else {}
            make_room(self.reference_pool)
            live = LiveReference(records=records, label=f"{sides.actual} vs {sides.expected}", old=sides.expected)
            entry.check.run(context(self.pool, live))
        except NotJudged as exc:
            raise _not_judged(request, str(exc)) from None
        except VariantUnavailable as exc:
            raise _skip_here(str(exc)) from None
        except pytest.skip.Exception as exc:
            raise _skip_here(exc.msg) from None

    def _record_reference(self, entry: CheckEntry, ctx: CheckContext) -> dict[Path, Any]:
        """OLD's observation of one check, recorded in memory; a failure there is named as OLD's."""
        __tracebackhide__ = True
        from harness.errors import CheckFailure, HarnessError
        from harness.pool import VariantUnavailable, make_room

        make_room(self.pool)
        try:
            entry.check.run(ctx)
        except (NotJudged, VariantUnavailable):
            raise
        except pytest.skip.Exception as exc:
            raise NotJudged(f"the reference run {ctx.sides.expected} skipped this check ({exc.msg}), so "
                            f"{ctx.sides.actual} was not judged") from None
        except (CheckFailure, HarnessError) as exc:
            raise CheckFailure(f"the reference run {ctx.sides.expected} failed, so {ctx.sides.actual} was not "
                               f"judged against it: {exc}") from None
        return ctx.goldens.records  # the Recorder's

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
