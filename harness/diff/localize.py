"""Where behaviour first changes: per-module relative differences against a noise floor.

The noise floor is measured, not assumed: the OLD model runs the same inputs a
second time with another attention kernel (eager instead of sdpa). Kernel choice is
a benign change — same weights, same maths, different summation order — so the
relative difference it makes at each module is what rounding alone does there. A
module's NEW-vs-OLD difference counts as a change only above
``max(FACTOR * noise at that module, dtype floor)``; the floor covers modules where
the two kernels agree exactly (the embedding, the first norm).

The same module names serve a golden-only localization: ``fingerprint`` keeps a few
numbers per module at a few positions, ``localize`` compares two fingerprints.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.diff.activations import capture, layer_index, module_kind

FACTOR = 5.0
# Relative differences below these are rounding of the compute dtype, whatever the kernel.
DTYPE_FLOOR = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
FINGERPRINT_VERSION = 1
PROJECTIONS = 2
# Fingerprints: relative change (in units of the hidden state's RMS) that counts as changed
# when no measured noise is given. Eager-vs-sdpa in float16 on CPU moves fingerprints of
# SmolLM2-135M by at most ~9e-3 at any module; 5% noise on one layer's MLP weights moves that
# layer by ~0.12.
DEFAULT_FINGERPRINT_NOISE = 2e-2


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
    from harness.diff.activations import relative_difference

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


# -- fingerprints (golden-only localization) ---------------------------------------------

def fingerprint(model: Any, input_ids: list[int], *, positions: int = 3) -> dict[str, Any]:
    """A few numbers per module at a few positions: RMS and two fixed random projections.

    Small enough for a golden's sidecar (about 30 numbers per layer), sensitive enough to
    tell "unchanged within noise" from "changed": a change in any direction moves a random
    projection. Store it with the golden; compare with ``localize``.
    """
    import torch

    ids = list(input_ids)
    picked = sorted({0, len(ids) // 2, len(ids) - 1})[:positions] if ids else []
    store = capture(model, ids)
    modules: dict[str, list[float]] = {}
    for name, tensor in store.items():
        hidden = tensor[picked].reshape(len(picked), -1)
        directions = _directions(hidden.shape[-1], torch)
        rms = hidden.pow(2).mean(dim=-1).sqrt()
        proj = hidden @ directions
        values = torch.cat([rms[:, None], proj], dim=-1).flatten().tolist()
        modules[name] = [float(f"{v:.5g}") for v in values]
    return {"version": FINGERPRINT_VERSION, "positions": picked, "tokens": len(ids),
            "ids_sha256": hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:16],
            "modules": modules}


def _directions(width: int, torch: Any) -> Any:
    gen = torch.Generator().manual_seed(width)
    vectors = torch.randn(width, PROJECTIONS, generator=gen)
    return vectors / vectors.norm(dim=0, keepdim=True)


def fingerprint_differences(expected: dict[str, Any], actual: dict[str, Any]) -> list[tuple[str, float]]:
    """(module, largest change in RMS units) in execution order; inf where a module is missing."""
    width = 1 + PROJECTIONS
    rows: list[tuple[str, float]] = []
    for name in sorted(expected.get("modules", {}), key=_order):
        exp = expected["modules"][name]
        act = actual.get("modules", {}).get(name)
        if act is None or len(act) != len(exp):
            rows.append((name, float("inf")))
            continue
        worst = 0.0
        for start in range(0, len(exp), width):
            scale = max(abs(exp[start]), 1e-12)
            for e, a in zip(exp[start:start + width], act[start:start + width]):
                change = abs(a - e) / scale
                worst = change if math.isnan(change) else max(worst, change)
        rows.append((name, worst))
    return rows


def localize(fp_expected: dict[str, Any], fp_actual: dict[str, Any],
             noise: float | dict[str, float] | None = None) -> str:
    """"behaviour first changes at layer 14 (mlp)", "before layer 0: ...", or "no change ...".

    ``noise``: the relative change (in RMS units) that rounding alone may cause, one number
    or one per module; default ``DEFAULT_FINGERPRINT_NOISE``.
    """
    if fp_expected.get("ids_sha256") != fp_actual.get("ids_sha256"):
        return "before layer 0: the tokenizer (the prompt encodes to different token ids)"
    for name, change in fingerprint_differences(fp_expected, fp_actual):
        level = noise.get(name, DEFAULT_FINGERPRINT_NOISE) if isinstance(noise, dict) else \
            (DEFAULT_FINGERPRINT_NOISE if noise is None else noise)
        if not change <= level:
            if name == "embedding":
                return "before layer 0: the tokenizer or embeddings"
            return describe(name) + f" (fingerprint moved {change:.3g} x RMS, noise {level:.3g})"
    return "no change beyond noise at any layer"


def sidecar_localization(sidecar: Path, model: Any, input_ids: list[int],
                         noise: float | dict[str, float] | None = None) -> str | None:
    """For a failing golden: where ``model`` first differs from the model that recorded it.

    Reads the ``fingerprint`` a golden's sidecar holds (written at record time from
    ``fingerprint(model, input_ids)``); None when there is none to compare with.
    """
    import json

    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(recorded, dict) or recorded.get("version") != FINGERPRINT_VERSION:
        return None
    return "localization (activation fingerprint vs the recording model): " + \
        localize(recorded, fingerprint(model, input_ids), noise)


def _order(name: str) -> tuple[int, int, str]:
    """Execution order from a canonical name (fingerprints are stored with sorted keys)."""
    if name == "embedding":
        return (-1, 0, name)
    index = layer_index(name)
    if index is not None:
        part = name.rsplit(".", 1)[-1]
        rank = {"input_norm": 0, "attention": 1, "post_norm": 2, "mlp": 3, "output": 9}.get(part, 5)
        return (index, rank, name)
    return (1 << 30, {"norm": 0, "head": 1}.get(name, 2), name)
