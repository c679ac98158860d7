"""The contract between suites and check kinds, and the registry of kinds.

A kind is a pair: a ``CheckSpec`` subclass (what the YAML says, validated) and
a ``Check`` subclass (what runs). Checks observe the model through a
``CheckContext``; they never parse YAML, load models or decide where goldens live.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator

from harness.judge.compare import GOLDEN_SIDES, Sides
from harness.suites.names import check_id_problem
from harness.models.variants import ALL_KEYS, VariantSpec

if TYPE_CHECKING:
    import pytest

    from harness.judge.tolerance import NoiseModel

    from harness.models.devices import Device
    from harness.golden import GoldenStore
    from harness.models.pool import Loaded, ModelPool


class CheckSpec(BaseModel):
    """Fields every check has; kinds add their own (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="The check's name, unique in the suite: it names the test (`id[variant]`) and the "
                                "golden file, so ASCII letters, digits, '-', '_' and '.' only.")
    kind: str = Field(description="Which check this is (one of the kinds below).")
    description: str = Field("", description="What the check is for, in words; shown nowhere else but the suite.")
    variants: list[str] | None = Field(
        None, description="Run only in these variants (default: the suite's `variants:`, else every variant the kind "
                          "judges).", json_schema_extra={"items": {"enum": list(ALL_KEYS)}})
    # Registry names (or folder names) of the models this check was written for: an assertion on
    # what one model says ("contains Paris") is not a property of every correct model.
    models: list[str] | None = Field(
        None, description="Registry names (or folder names) of the models this check was written for; on another "
                          "model it skips, saying so (default: every model).")
    # A suite's ``defaults: tolerance:``, layered under the check's own ``tolerance:`` field by field
    # (set by the suite loader; None where the suite sets none or the kind takes no tolerance).
    _suite_tolerance: Any = PrivateAttr(default=None)
    _tolerance_places: tuple[str, str] = PrivateAttr(default=("the suite's defaults", "the check"))

    def noise_model(self, *, half: str = "float16") -> NoiseModel:
        """The built-in tolerances of a model running in ``half``, then the suite's defaults, then the check's
        own, field by field."""
        from harness.judge.tolerance import layered

        suite_where, check_where = self._tolerance_places
        return layered(self._suite_tolerance, getattr(self, "tolerance", None), suite_where=suite_where,
                       check_where=check_where, half=half)

    @field_validator("id")
    @classmethod
    def _id_names_a_golden_file(cls, value: str) -> str:
        problem = check_id_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("models", "variants")
    @classmethod
    def _selects_something(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None and not value:
            name = info.field_name
            raise ValueError(f"an empty list selects no {name.removesuffix('s')}, so the check would never run; "
                             f"remove the key (all {name}) or list {name}")
        return value

    def ignored(self) -> dict[str, str]:
        """Fields set to a value that cannot take effect with the rest of this spec: field -> why.

        Set on the check itself they are a suite error (a tolerance that ``match: exact``
        overrides is a reader's trap); set in ``defaults:`` they are fine.
        """
        return {}

    @field_validator("variants")
    @classmethod
    def _variants_known(cls, value: list[str] | None) -> list[str] | None:
        for key in value or []:
            if key not in ALL_KEYS:
                match = difflib.get_close_matches(key, ALL_KEYS, n=1)
                hint = f"; did you mean {match[0]!r}?" if match else ""
                raise ValueError(f"unknown variant {key!r} (known: {', '.join(ALL_KEYS)}){hint}")
        return value


@dataclass
class CheckContext:
    """Everything a check may use: the pool, the variant, goldens, the pytest request."""

    suite: str
    suite_path: Path
    check_id: str
    variant: VariantSpec | None
    pool: ModelPool
    goldens: GoldenStore
    device: Device
    request: pytest.FixtureRequest
    figures: dict[str, Any] = field(default_factory=dict)
    sides: Sides = GOLDEN_SIDES  # reference mode names OLD and NEW instead of the golden and this run
    # reference mode runs a check on OLD too: its figures and notes are told apart from NEW's
    figure_prefix: str = ""
    note_prefix: str = ""
    one_pass_goldens: bool = False  # --one-pass-goldens: greedy goldens judged from one pass, never decoded

    def record(self, **figures: Any) -> None:
        """Figures (MB, tokens/s, KL...) for the session report and JUnit properties."""
        self.figures.update(figures)
        for name, value in figures.items():
            self.request.node.user_properties.append((self.figure_prefix + name, value))

    @property
    def tokenizer(self) -> Any:
        return self.pool.tokenizer

    def loaded(self, variant: VariantSpec | None = None) -> Loaded:
        target = variant or self.variant
        assert target is not None, "a model-level check asked for a model"
        return self.pool.get(target)

    @property
    def model(self) -> Any:
        return self.loaded().model

    @property
    def half(self) -> str:
        """The half precision this model's fp16 variants run in: the built-in tolerances follow it."""
        return self.pool.resolved.half.dtype

    def golden_path(self) -> Path:
        return self.goldens.path(
            suite=self.suite, check_id=self.check_id, variant=self.variant.key if self.variant else None
        )

    def recorded_against(self) -> str | None:
        """What this item was recorded against, if anything: its golden file (readable or not), or in
        reference mode OLD's run; None where nothing was (a new item, or a kind without goldens)."""
        path = self.golden_path()
        if self.goldens.peek(path) is None and not (self.sides is GOLDEN_SIDES and self.goldens.reference(path).is_file()):
            return None
        return f"its golden {path.name}" if self.sides is GOLDEN_SIDES else f"{self.sides.expected_short}'s run"

    def note(self, text: str) -> None:
        """A line for the terminal summary and the report that a passing check must not keep silent
        (an accepted near-tie, a fragile golden, a cross-device judgement)."""
        self.request.node.user_properties.append(("harness_note", self.note_prefix + text))

    def forgive(self, text: str) -> None:
        """A line for what a passing check forgave (an accepted near-tie, a widened tolerance): counted and
        listed in the terminal summary and the report, never silent."""
        self.request.node.user_properties.append(("harness_forgiven", text))

    def forgive_widened(self, tol: Any) -> None:
        """Each field of a flat tolerance that a suite or check set above the built-in default."""
        from harness.judge.allowance import widened_defaults

        for line in widened_defaults(tol):
            self.forgive(f"widened tolerance for {self.subject}: {line}")

    def count_flips(self, flips: int, probabilities: list[float]) -> None:
        """This golden's accepted flips and its steps' flip probabilities, for the session's near-tie budget
        over all goldens of this suite and variant (``harness.judge.flips``)."""
        from harness.judge.flips import flips_property

        group = f"{self.suite}[{self.variant.key}]" if self.variant else self.suite
        self.request.node.user_properties.append(flips_property(group, flips, probabilities))

    @property
    def subject(self) -> str:
        """How notes and messages name this item: ``check[variant]``."""
        return f"{self.check_id}[{self.variant.key}]" if self.variant else self.check_id

    def assert_golden(self, actual: Any, explain: Callable[[Any, Any], str],
                      judge: Callable[[Any, Any], bool] | None = None, sidecar: dict[str, Any] | None = None) -> None:
        """``sidecar``: extra data for the golden's ``.meta.json`` when an update writes it (never compared)."""
        __tracebackhide__ = True
        extra: dict[str, Any] = {"check": f"{self.suite}::{self.check_id}"}
        if self.variant is not None:
            extra["variant"] = self.variant.key
        self.goldens.assert_matches(self.golden_path(), actual, explain=explain, provenance_extra=extra,
                                    judge=judge, sidecar=sidecar, owner=self.suite_path)


class ReferenceRun(Protocol):
    """What a check sees of reference mode (``--reference OLD``): one item's context on OLD and on NEW.

    ``harness.run.reference.ReferencePair`` is the one implementation; the contract lives here so
    that checks depend on the run only through it, and the run on checks, never both ways.
    """

    @property
    def old(self) -> CheckContext: ...

    @property
    def new(self) -> CheckContext: ...

    @property
    def sides(self) -> Sides: ...

    @property
    def label(self) -> str: ...

    def on_old(self, *, alone: bool = False) -> CheckContext:
        """OLD's context, NEW's model freed where both do not fit (``alone``: freed in any case)."""
        ...

    def on_new(self, *, alone: bool = False) -> CheckContext:
        """NEW's context, OLD's model freed where both do not fit (``alone``: freed in any case)."""
        ...

    def judge_against_record(self, check: Check[Any]) -> None:
        """A golden-style check: OLD's observation, recorded in memory, is NEW's golden."""
        ...

    def run_on_both(self, check: Check[Any]) -> None:
        """A property of the model itself: judged on NEW, and a failure says whether OLD held it."""
        ...


S = TypeVar("S", bound=CheckSpec)


class Check(ABC, Generic[S]):
    """Behaviour of one kind. ``per_variant = False`` kinds run once per model."""

    Spec: ClassVar[type[CheckSpec]]
    kind: ClassVar[str]
    per_variant: ClassVar[bool] = True
    needs_gpu: ClassVar[bool] = False
    uses_goldens: ClassVar[bool] = False  # judged by ctx.assert_golden: reference mode runs it on OLD first

    def __init__(self, spec: S) -> None:
        self.spec = spec

    @classmethod
    def unjudgeable(cls, variant_key: str) -> str | None:
        """Why this kind can never judge ``variant_key`` (``lora_merge`` on a variant without an adapter), or None.

        Such variants get no item (a check listing one is a suite error); an item that ran
        anyway would be a skip, green in a gate run, for a check nobody judged.
        """
        return None

    @abstractmethod
    def run(self, ctx: CheckContext) -> None:
        """Observe and compare; raise CheckFailure with a reviewer's message on a difference."""

    def run_against_reference(self, pair: ReferenceRun) -> None:
        """Reference mode (``--reference OLD``): judge NEW against OLD, measured in this session.

        Golden-style kinds judge NEW against OLD's recorded observation; the others run on
        both and say whether a failure on NEW held on OLD. Kinds whose verdict is a figure
        (budgets, drift, sampled expectations) override this to compare the figures.
        """
        __tracebackhide__ = True
        (pair.judge_against_record if self.uses_goldens else pair.run_on_both)(self)


_REGISTRY: dict[str, type[Check[Any]]] = {}


def register_check(kind: str) -> Callable[[type[Check[Any]]], type[Check[Any]]]:
    """Class decorator: make ``kind`` usable in suites. Names are unique."""

    def decorate(cls: type[Check[Any]]) -> type[Check[Any]]:
        if kind in _REGISTRY and _REGISTRY[kind] is not cls:
            raise ValueError(f"check kind {kind!r} is registered twice ({_REGISTRY[kind]} and {cls})")
        cls.kind = kind
        _REGISTRY[kind] = cls
        return cls

    return decorate


def get_check(kind: str) -> type[Check[Any]]:
    """The class for ``kind``; unknown names raise KeyError with a 'did you mean'."""
    if kind not in _REGISTRY:
        match = difflib.get_close_matches(kind, list(_REGISTRY), n=1)
        hint = f"did you mean {match[0]!r}? " if match else ""
        raise KeyError(f"{hint}known kinds: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[kind]


def known_kinds() -> list[str]:
    return sorted(_REGISTRY)
