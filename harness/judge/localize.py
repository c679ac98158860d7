"""Where behaviour first changes: per-module relative differences against a noise floor.

The noise floor is measured, not assumed: the OLD model runs the same inputs a
second time with another attention kernel (eager instead of sdpa). Kernel choice is
a benign change — same weights, same maths, different summation order — so the
relative difference it makes at each module is what rounding alone does there. A
module's NEW-vs-OLD difference counts as a change only above
``max(FACTOR * noise at that module, dtype floor)``; the floor covers modules where
the two kernels agree exactly (the embedding, the first norm).

The same module names serve a golden-only localization (``harness.judge.fingerprints``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness.observe.activations import layer_index, module_kind

FACTOR = 5.0
# Relative differences below these are rounding of the compute dtype, whatever the kernel.
DTYPE_FLOOR = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


@dataclass(frozen=True)
class ModuleDiff:
    name: str
    relative: float
    noise: float
    threshold: float

    @property
    def changed(self) -> bool:
        return not self.relative <= self.threshold  # NaN counts as changed

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.name, "relative_diff": _num(self.relative), "noise": _num(self.noise),
                "threshold": _num(self.threshold), "changed": self.changed}


def _num(value: float) -> float | str:
    return float(f"{value:.4g}") if math.isfinite(value) else str(value)


def threshold(noise: float, dtype: str) -> float:
    return max(FACTOR * noise, DTYPE_FLOOR.get(dtype, DTYPE_FLOOR["float16"]))


def compare_modules(expected: dict[str, Any], actual: dict[str, Any], noise: dict[str, float],
                    dtype: str) -> list[ModuleDiff]:
    """Per module (in the expected run's execution order): relative difference vs its threshold."""
    from harness.observe.activations import relative_difference

    rows: list[ModuleDiff] = []
    for name, tensor in expected.items():
        other = actual.get(name)
        relative = float("inf") if other is None else relative_difference(tensor, other)
        level = noise.get(name, 0.0)
        rows.append(ModuleDiff(name, relative, level, threshold(level, dtype)))
    return rows


def merge_worst(runs: list[list[ModuleDiff]]) -> list[ModuleDiff]:
    """Per module, the prompt with the largest relative difference (noise: the largest too)."""
    merged: dict[str, ModuleDiff] = {}
    for rows in runs:
        for row in rows:
            seen = merged.get(row.name)
            if seen is None:
                merged[row.name] = row
            else:
                relative = max(seen.relative, row.relative) if not math.isnan(row.relative) else row.relative
                noise = max(seen.noise, row.noise)
                merged[row.name] = ModuleDiff(row.name, relative, noise, max(seen.threshold, row.threshold))
    return list(merged.values())


def first_change(rows: list[ModuleDiff]) -> ModuleDiff | None:
    return next((row for row in rows if row.changed), None)


def describe(name: str | None, *, tokenizer_changed: bool = False) -> str:
    """The reviewer's sentence: where behaviour first changes."""
    if tokenizer_changed:
        return "before layer 0: the tokenizer (the prompts encode to different token ids)"
    if name is None:
        return "no change beyond noise at any layer"
    if name == "embedding":
        return "before layer 0: the embeddings"
    index = layer_index(name)
    if index is not None:
        return f"behaviour first changes at layer {index} ({module_kind(name)})"
    return f"behaviour first changes after the last layer ({module_kind(name)})"
