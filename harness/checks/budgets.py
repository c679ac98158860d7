"""Budget tables shared by the budget check kinds: device-class keys, lookups, comparisons.

A budget table is ``{device class: {variant: budget}}``; a device class is ``cpu``,
``cuda``, ``cuda-smXY`` or ``any``, looked up from the most to the least specific.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from harness.variants import ALL_KEYS

if TYPE_CHECKING:
    from harness.checks.base import CheckContext

T = TypeVar("T")

DEVICE_KEY_PATTERN = r"(any|cpu|cuda|cuda-sm\d+)"


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


def budget_for(table: Mapping[str, Mapping[str, T]], *, device_class: str, variant: str) -> tuple[T | None, str | None]:
    """The budget for ``variant`` on ``device_class`` and the device key it came from."""
    for key in device_keys(device_class):
        per_variant = table.get(key)
        if per_variant is not None and variant in per_variant:
            return per_variant[variant], key
    return None, None


class NoBudgetWarning(UserWarning):
    """A budget check ran where its suite sets no budget: figures recorded, nothing judged."""


def validate_budget_table(table: Any) -> Any:
    """Budget tables are ``{device class: {variant: budget}}``; typos must not disable a budget.

    Runs before pydantic's own validation (``mode="before"``) so that a misplaced level
    is reported as such, not as a type error one level down.
    """
    import difflib
    import re

    from harness.variants import ALL_KEYS

    if not isinstance(table, Mapping):
        return table
    for device_key, per_variant in table.items():
        device_key = str(device_key)
        if not re.fullmatch(DEVICE_KEY_PATTERN, device_key):
            hint = " (variants go one level down: budgets: {cpu: {nf4: {...}}})" if device_key in ALL_KEYS else ""
            raise ValueError(
                f"budgets: {device_key!r} is not a device class; use cpu, cuda, cuda-smXY "
                f"(e.g. cuda-sm90, as the report header shows) or any{hint}"
            )
        for variant in per_variant if isinstance(per_variant, Mapping) else ():
            if variant not in ALL_KEYS:
                match = difflib.get_close_matches(variant, ALL_KEYS, n=1)
                raise ValueError(
                    f"budgets.{device_key}: unknown variant {variant!r} (known: {', '.join(ALL_KEYS)})"
                    + (f"; did you mean {match[0]!r}?" if match else "")
                )
    return table


class VariantComparison(BaseModel):
    """Two variants measured in the same session: ``variant`` against ``reference``, by ``ratio``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: str
    reference: str
    ratio: float = Field(gt=0)
    devices: list[str] | None = Field(None, description="device classes this applies to (default: all)")

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

    @model_validator(mode="after")
    def _two_variants(self) -> VariantComparison:
        if self.variant == self.reference:
            raise ValueError("a comparison needs two different variants")
        return self


def skip_unless_device(devices: list[str] | None, ctx: CheckContext) -> None:
    """A check declared for some device classes (``devices: [cuda]``) skips elsewhere, saying why."""
    if not device_matches(devices, ctx.device.klass):
        import pytest

        pytest.skip(f"{ctx.check_id} runs on {', '.join(devices or [])} only; this session runs on "
                    f"{ctx.device.description} (class {ctx.device.klass})")
