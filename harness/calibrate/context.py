"""What every calibration condition shares: the model, the device, the prompts (and where the
cross-device goldens are). Its own module so that the conditions and the fresh-process worker,
which runs one of them, both name it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.judge.noise import Item


@dataclass
class Context:
    """What every condition needs: the resolved model, the device, the prompts and their paths."""

    resolved: Any
    device: Any
    items: list[Item]
    reference_attn: str | None
    regressions: list[Any]
    cross: CrossDevice | None = None


@dataclass(frozen=True)
class CrossDevice:
    """``--golden-device``: whose goldens to score on this device, and where they are."""

    root: Path
    model: str
    golden_class: str
