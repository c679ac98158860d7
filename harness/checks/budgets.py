"""Budget tables shared by the budget check kinds: models, device-class keys, lookups, comparisons.

A budget belongs to the model it was measured on, as goldens do: a table is
``{model: {device class: {variant: budget}}}``. The model is the name goldens are stored
under (the registry name, or the folder's name for ``--model PATH``). A device class is
``cpu``, ``cuda``, ``cuda-smXY`` or ``any``, looked up from the most to the least specific.
A model the table does not name has no absolute budget: its figures are recorded and the
item says it judged nothing (a skip with the reason), never a pass by accident.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.models.variants import ALL_KEYS

if TYPE_CHECKING:
    from harness.checks.base import CheckContext

T = TypeVar("T")

DEVICE_KEY_PATTERN = r"(any|cpu|cuda|cuda-sm\d+)"

# The suite reference's words for the keys the budget kinds share.
BUDGETS_HELP = ("`{model: {device class: {variant: budget}}}`; device class `cpu`, `cuda`, `cuda-smXY` (e.g. "
                "`cuda-sm90`) or `any`, the most specific winning. On a model or device with none, figures are "
                "recorded and nothing is judged (a skip saying so).")
DEVICES_HELP = "Run only on these device classes (`cpu`, `cuda`, `cuda-smXY`, `any`); skip elsewhere."


def device_keys(device_class: str) -> list[str]:
    """Lookup order for a budget table: the exact class, its family, then ``any``."""
    keys = [device_class]
    family = device_class.split("-", 1)[0]
    if family != device_class:
        keys.append(family)
    keys.append("any")
    return keys


def device_matches(devices: Sequence[str] | None, device_class: str) -> bool:
    """Whether a list of device keys (None: all devices) covers ``device_class``."""
    return devices is None or any(key in devices for key in device_keys(device_class))


def validate_device_list(devices: list[str] | None) -> list[str] | None:
    import re

    for key in devices or []:
        if not re.fullmatch(DEVICE_KEY_PATTERN, key):
            raise ValueError(f"{key!r} is not a device class (cpu, cuda, cuda-smXY or any)")
    return devices


def validate_model_list(models: list[str] | None) -> list[str] | None:
    for name in models or []:
        if not str(name).strip():
            raise ValueError("an empty model name")
    return models


def models_match(models: Sequence[str] | None, model: str) -> bool:
    """Whether a comparison restricted to ``models`` (None: every model) applies to ``model``."""
    return models is None or model in models


def budget_for(table: Mapping[str, Mapping[str, Mapping[str, T]]], *, model: str, device_class: str,
               variant: str) -> tuple[T | None, str | None]:
    """The budget for ``variant`` of ``model`` on ``device_class``, and where it came from."""
    per_device = table.get(model)
    if per_device is None:
        return None, None
    for key in device_keys(device_class):
        per_variant = per_device.get(key)
        if per_variant is not None and variant in per_variant:
            return per_variant[variant], f"{model}.{key}.{variant}"
    return None, None


def missing_budget(table: Mapping[str, Any], *, model: str, device_class: str, variant: str) -> str:
    """Why no budget applies, in words a report can show."""
    if model not in table:
        named = ", ".join(sorted(table)) or "none"
        return (f"no budget for model {model!r} (this check has budgets for: {named}); budgets belong to "
                f"the model they were measured on. Fix: add `{model}: {{{device_class}: {{{variant}: {{...}}}}}}` "
                "under budgets once its figures are reviewed")
    return f"no budget for model {model!r} on device class {device_class!r}, variant {variant!r}"


class Budget(BaseModel):
    """A budget entry; one that sets no limit would judge nothing and pass, so it is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _sets_a_limit(self) -> Budget:
        if all(value is None for value in self.model_dump().values()):
            raise ValueError(f"an empty budget judges nothing; set at least one of {', '.join(type(self).model_fields)}")
        return self


class NoBudgetWarning(UserWarning):
    """A budget check ran where its suite sets no budget: figures recorded, nothing judged."""


def nothing_judged(where: str, why: str) -> NoReturn:
    """An item that judged nothing is not a pass: it skips, saying why (its figures are recorded)."""
    import pytest

    pytest.skip(f"{where}: nothing judged: {why}; figures recorded")


def observation_key(ctx: CheckContext, purpose: str, fields: Mapping[str, Any]) -> str:
    """A memo key for the pool: suite file + check id + the spec fields that shape the measurement.

    Ids are unique only within a suite, and two checks with one id may measure differently.
    """
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{ctx.suite_path}::{ctx.check_id}:{purpose}:{digest}"


def _device_level_error(key: str, where: str) -> str | None:
    import re

    if re.fullmatch(DEVICE_KEY_PATTERN, key) or key in ALL_KEYS:
        return (f"{where}: {key!r} is a {'device class' if key not in ALL_KEYS else 'variant'} where a model "
                "name belongs; budgets belong to the model they were measured on: "
                f"{where}: {{smollm2-135m: {{cpu: {{nf4: {{...}}}}}}}} (the name goldens are stored under)")
    return None


def validate_device_table(table: Any, *, where: str) -> Any:
    """``{device class: {variant: budget}}``; typos must not disable a budget."""
    import difflib
    import re

    if not isinstance(table, Mapping):
        return table
    for device_key, per_variant in table.items():
        device_key = str(device_key)
        if not re.fullmatch(DEVICE_KEY_PATTERN, device_key):
            hint = " (variants go one level down: {cpu: {nf4: {...}}})" if device_key in ALL_KEYS else ""
            raise ValueError(
                f"{where}: {device_key!r} is not a device class; use cpu, cuda, cuda-smXY "
                f"(e.g. cuda-sm90, as the report header shows) or any{hint}"
            )
        for variant in per_variant if isinstance(per_variant, Mapping) else ():
            if variant not in ALL_KEYS:
                match = difflib.get_close_matches(variant, ALL_KEYS, n=1)
                raise ValueError(
                    f"{where}.{device_key}: unknown variant {variant!r} (known: {', '.join(ALL_KEYS)})"
                    + (f"; did you mean {match[0]!r}?" if match else "")
                )
    return table


def validate_model_table(table: Any, inner: Any, *, where: str = "budgets") -> Any:
    """``{model: inner}``, where ``inner(value, where=...)`` validates one model's table.

    Runs before pydantic's own validation (``mode="before"``) so that a missing or misplaced
    level is reported as such, not as a type error one level down.
    """
    if not isinstance(table, Mapping):
        return table
    for model, per_model in table.items():
        error = _device_level_error(str(model), where)
        if error:
            raise ValueError(error)
        inner(per_model, where=f"{where}.{model}")
    return table


def validate_budget_table(table: Any) -> Any:
    """Memory and throughput budgets: ``{model: {device class: {variant: budget}}}``."""
    return validate_model_table(table, validate_device_table)


class VariantComparison(BaseModel):
    """Two variants measured in the same session: ``variant`` against ``reference``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str = Field(description="The variant judged.", json_schema_extra={"enum": list(ALL_KEYS)})
    reference: str = Field(description="The variant it is compared with.", json_schema_extra={"enum": list(ALL_KEYS)})
    devices: list[str] | None = Field(None, description="Device classes this applies to (default: all).")
    models: list[str] | None = Field(None, description="Models this applies to (default: every model).")

    @field_validator("variant", "reference")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ALL_KEYS:
            raise ValueError(f"unknown variant {value!r} (known: {', '.join(ALL_KEYS)})")
        return value

    @field_validator("devices")
    @classmethod
    def _device_keys(cls, value: list[str] | None) -> list[str] | None:
        return validate_device_list(value)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        return validate_model_list(value)

    @model_validator(mode="after")
    def _two_variants(self) -> VariantComparison:
        if self.variant == self.reference:
            raise ValueError("a comparison needs two different variants")
        return self

    def applies(self, *, variant: str, device_class: str, model: str) -> bool:
        return (self.variant == variant and device_matches(self.devices, device_class)
                and models_match(self.models, model))


def skip_unless_device(devices: list[str] | None, ctx: CheckContext) -> None:
    """A check declared for some device classes (``devices: [cuda]``) skips elsewhere, saying why."""
    if not device_matches(devices, ctx.device.klass):
        import pytest

        pytest.skip(f"{ctx.check_id} runs on {', '.join(devices or [])} only; this session runs on "
                    f"{ctx.device.description} (class {ctx.device.klass})")
