"""Tensor-by-tensor comparison of two checkpoints, streamed with ``safe_open``.

One tensor of each side is in memory at a time, never two whole models. A side
with a LoRA adapter is compared by its *effective* weights (base + scale * B @ A),
since that is what the model computes with: an adapter update then shows up on
exactly the modules it targets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.observe.activations import layer_index


@dataclass(frozen=True)
class Side:
    """A checkpoint to compare: a model folder, optionally with a peft LoRA adapter folder."""

    model: Path
    adapter: Path | None = None


@dataclass(frozen=True)
class TensorChange:
    name: str
    relative: float  # ||new - old|| / ||old||
    max_abs: float
    numel: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "relative_diff": _finite(self.relative), "max_abs_diff": _finite(self.max_abs),
                "numel": self.numel, "layer": layer_index(_canonical(self.name))}


@dataclass
class WeightsDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    reshaped: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    dtype_changed: list[tuple[str, str, str]] = field(default_factory=list)
    changed: list[TensorChange] = field(default_factory=list)  # most changed first
    unchanged: int = 0

    @property
    def identical(self) -> bool:
        return not (self.added or self.removed or self.reshaped or self.changed)

    def as_dict(self, top: int = 20) -> dict[str, Any]:
        return {
            "added": self.added, "removed": self.removed,
            "reshaped": [{"name": n, "old": o, "new": w} for n, o, w in self.reshaped],
            "dtype_changed": [{"name": n, "old": o, "new": w} for n, o, w in self.dtype_changed],
            "changed_count": len(self.changed), "unchanged_count": self.unchanged,
            "most_changed": [c.as_dict() for c in self.changed[:top]],
        }


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _canonical(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``layers.3...`` so layer_index can read it."""
    index = name.find("layers.")
    return name[index:] if index >= 0 else name


class _Reader:
    """Lazy access to a folder's safetensors tensors (sharded or not) plus an adapter's deltas."""

    def __init__(self, side: Side) -> None:
        from safetensors import safe_open

        self._handles: list[Any] = []
        self.where: dict[str, Any] = {}
        for file in sorted(side.model.glob("*.safetensors")):
            handle = safe_open(str(file), framework="pt")
            self._handles.append(handle)
            for key in handle.keys():
                self.where[key] = handle
        self.deltas = _adapter_deltas(side.adapter, set(self.where)) if side.adapter else {}

    def shape(self, key: str) -> list[int]:
        return list(self.where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self.where[key].get_slice(key).get_dtype())

    def tensor(self, key: str) -> Any:
        value = self.where[key].get_tensor(key).float()
        delta = self.deltas.get(key)
        return value + delta if delta is not None else value


def _adapter_deltas(adapter: Path, base_keys: set[str]) -> dict[str, Any]:
    """scale * B @ A for each LoRA module, keyed by the base weight it adds to."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    alpha = float(config.get("lora_alpha", 8))
    deltas: dict[str, Any] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None:
            continue
        module = key.split(".lora_A.")[0]
        rank = a.shape[0]
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        target = _base_key(module, base_keys)
        if target is not None:
            deltas[target] = (b.float() @ a.float()) * scale
    return deltas


def _base_key(module: str, base_keys: set[str]) -> str | None:
    """``base_model.model.model.layers.0.self_attn.q_proj`` -> the base file's weight key."""
    name = module.removeprefix("base_model.model.")
    for candidate in (f"{name}.weight", f"model.{name}.weight", f"{name.removeprefix('model.')}.weight"):
        if candidate in base_keys:
            return candidate
    return None


def diff_weights(old: Side, new: Side) -> WeightsDiff:
    """Added, removed, reshaped tensors and every changed tensor by relative norm of the difference."""
    import torch

    left, right = _Reader(old), _Reader(new)
    result = WeightsDiff()
    result.added = sorted(set(right.where) - set(left.where))
    result.removed = sorted(set(left.where) - set(right.where))
    for key in sorted(set(left.where) & set(right.where)):
        old_shape, new_shape = left.shape(key), right.shape(key)
        if old_shape != new_shape:
            result.reshaped.append((key, old_shape, new_shape))
            continue
        if left.dtype(key) != right.dtype(key):
            result.dtype_changed.append((key, left.dtype(key), right.dtype(key)))
        a, b = left.tensor(key), right.tensor(key)
        if torch.equal(a, b):
            result.unchanged += 1
            continue
        diff = b - a
        norm = float(a.norm())
        delta = float(diff.norm())
        relative = delta / norm if norm > 0 else float("inf")
        if not math.isfinite(delta):
            relative = float("inf")
        result.changed.append(TensorChange(key, relative, float(diff.abs().max()), a.numel()))
    result.changed.sort(key=lambda c: (-c.relative if math.isfinite(c.relative) else -math.inf, c.name))
    return result
