"""Constructed regressions: small real changes to a model, to show where the noise ends.

Each one is a modified copy of the model folder (weights or config) or of the adapter folder,
written to a temporary directory and loaded exactly as the original is, so every variant (NF4
quantizes the changed weights) sees the change a broken conversion or a bad merge would make.
Unchanged files are linked, not copied.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT = ("weights:0.005,weights:0.01,weights:0.02,weights:0.05,rope_theta:1.05,rope_theta:0.5,"
           "rms_norm_eps:1e-6,rms_norm_eps:1e-4,lora_b:0.9,lora_b:1.1")
Kind = Literal["weights", "rope_theta", "rms_norm_eps", "lora_b"]
KINDS: tuple[str, ...] = ("weights", "rope_theta", "rms_norm_eps", "lora_b")


@dataclass(frozen=True)
class Regression:
    """``weights:S`` Gaussian noise of S x each matrix's std on the middle layer; ``rope_theta:F``
    multiplies rope_theta; ``rms_norm_eps:V`` sets it; ``lora_b:F`` multiplies the adapter's lora_B."""

    kind: Kind
    value: float

    @property
    def name(self) -> str:
        return {
            "weights": f"weight noise {self.value:g} x std on one layer",
            "rope_theta": f"rope_theta x {self.value:g}",
            "rms_norm_eps": f"rms_norm_eps = {self.value:g}",
            "lora_b": f"adapter lora_B x {self.value:g}",
        }[self.kind]

    @property
    def needs_adapter(self) -> bool:
        return self.kind == "lora_b"


def parse(text: str) -> list[Regression]:
    """``--regressions``: ``default`` or a comma list of KIND:VALUE."""
    text = DEFAULT if text.strip() == "default" else text
    out: list[Regression] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        kind, sep, value = part.partition(":")
        if kind not in KINDS or not sep:
            raise ValueError(f"--regressions: {part!r} is not KIND:VALUE with KIND one of {', '.join(KINDS)}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--regressions: {part!r}: {value!r} is not a number") from None
        if not math.isfinite(number) or (kind != "lora_b" and number <= 0):
            raise ValueError(f"--regressions: {part!r}: {kind} takes a finite number"
                             + ("" if kind == "lora_b" else " above 0") + " (a regression of a known size)")
        out.append(Regression(kind, number))  # type: ignore[arg-type]
    return out


def _link_tree(src: Path, dst: Path, *, except_: set[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.name not in except_ and file.is_file():
            os.symlink(file.resolve(), dst / file.name)


def apply(regression: Regression, *, model: Path, adapter: Path | None, workdir: Path) -> tuple[Path, Path | None]:
    """A (model folder, adapter folder) pair with the regression applied, under ``workdir``."""
    if regression.kind == "lora_b":
        if adapter is None:
            raise ValueError("lora_b needs an adapter")
        return model, _rescale_adapter(adapter, workdir / "adapter", regression.value)
    if regression.kind == "weights":
        return _noisy_weights(model, workdir / "model", regression.value), adapter
    return _changed_config(model, workdir / "model", regression.kind, regression.value), adapter


def _changed_config(src: Path, dst: Path, key: str, value: float) -> Path:
    _link_tree(src, dst, except_={"config.json"})
    config = json.loads((src / "config.json").read_text())
    if key == "rope_theta":
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            rope["rope_theta"] = rope["rope_theta"] * value
        else:
            config["rope_theta"] = config.get("rope_theta", 10000.0) * value
    else:
        config[key] = value
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def middle_layer(names: list[str]) -> str | None:
    """The prefix of the middle decoder layer (``model.layers.15.``), read from tensor names."""
    import re

    layers = sorted({int(m.group(1)) for n in names if (m := re.search(r"\.layers\.(\d+)\.", n))})
    if not layers:
        return None
    index = layers[len(layers) // 2]
    return next(n[: n.index(f".layers.{index}.") + len(f".layers.{index}.")] for n in names if f".layers.{index}." in n)


def _noisy_weights(src: Path, dst: Path, scale: float, *, seed: int = 0) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shards = sorted(src.glob("*.safetensors"))
    names = [n for shard in shards for n in _tensor_names(shard)]
    prefix = middle_layer(names)
    if prefix is None:
        raise ValueError(f"{src}: no decoder layers (.layers.N.) found in the weights")
    target = next(shard for shard in shards if any(n.startswith(prefix) for n in _tensor_names(shard)))
    _link_tree(src, dst, except_={target.name})
    tensors = load_file(str(target))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if name.startswith(prefix) and tensor.ndim == 2:
            weight = tensor.float()
            noise = torch.randn(weight.shape, generator=generator) * (scale * float(weight.std()))
            tensors[name] = (weight + noise).to(tensor.dtype)
    save_file(tensors, str(dst / target.name), metadata={"format": "pt"})
    return dst


def _tensor_names(shard: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as fh:
        return list(fh.keys())


def _rescale_adapter(src: Path, dst: Path, factor: float) -> Path:
    from safetensors.torch import load_file, save_file

    _link_tree(src, dst, except_={"adapter_model.safetensors"})
    tensors = load_file(str(src / "adapter_model.safetensors"))
    tensors = {k: (v * factor if "lora_B" in k else v) for k, v in tensors.items()}
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def cleanup(workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
