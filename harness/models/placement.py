"""Models larger than one device: accelerate's ``device_map`` over GPUs, CPU and disk.

A registry entry (``device_map: auto``, ``max_memory: {0: 20GiB, cpu: 60GiB}``,
``offload_folder: offload/``) or the command line (``--device-map``, ``--max-memory``,
``--offload-folder``) asks transformers to place the model's layers where memory allows;
accelerate's hooks then move each offloaded layer's weights to the execution device for its
forward. The arithmetic is the same in the same dtype, so goldens recorded without offload
judge a run with it. NF4 cannot be offloaded: bitsandbytes' 4-bit layers cannot live on the CPU
beside a GPU, nor on disk, and transformers would keep such layers unquantized (that is not
NF4), so an NF4 variant whose map needs that fails to load with its own error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)
_DEVICE_KEY = re.compile(r"^(cpu|disk|mps|\d+|(cuda|xpu|npu|mlu|musa):\d+)$")


@dataclass(frozen=True)
class Placement:
    """How one model is spread: accelerate's strategy, per-device limits, where offloaded weights go."""

    device_map: str = "auto"
    max_memory: dict[str | int, str | int] | None = None
    offload_folder: Path | None = None

    def describe(self) -> str:
        limits = ", ".join(f"{k}={v}" for k, v in (self.max_memory or {}).items()) or "all free memory"
        folder = f", offload folder {self.offload_folder}" if self.offload_folder else ""
        return f"device_map {self.device_map} ({limits}{folder})"

    def from_pretrained_kwargs(self, device_name: str) -> dict[str, Any]:
        """What ``from_pretrained`` takes; a CPU session never places layers on a GPU."""
        max_memory = dict(self.max_memory) if self.max_memory else None  # transformers converts it in place
        if device_name == "cpu":
            problem = gpu_limit_problem(max_memory)
            if problem:
                raise ValueError(problem)
            if max_memory is None:
                import psutil

                max_memory = {"cpu": int(psutil.virtual_memory().available)}
        kwargs: dict[str, Any] = {"device_map": self.device_map, "max_memory": max_memory}
        if self.offload_folder is not None:
            self.offload_folder.mkdir(parents=True, exist_ok=True)
            kwargs["offload_folder"] = str(self.offload_folder)
        return kwargs


def gpu_limit_problem(max_memory: dict[str | int, str | int] | None) -> str | None:
    """Why these limits cannot serve a session on the CPU (they name a GPU), or None."""
    gpus = [k for k in (max_memory or {}) if k not in ("cpu", "disk", "mps")]
    if not gpus:
        return None
    return (f"max_memory names {gpus[0]!r}, a GPU, but this session runs on the CPU (--device cpu, or no GPU "
            "here): give only cpu (and disk) limits")


def check_device_map(value: str) -> str:
    if value not in DEVICE_MAPS:
        raise ValueError(f"device_map {value!r}: choose one of {', '.join(DEVICE_MAPS)} (accelerate's strategies)")
    return value


def check_max_memory(value: Any) -> dict[str | int, str | int]:
    """A mapping of device (GPU index, ``cpu``, ``disk``) to a size (``20GiB``, ``512MB`` or bytes)."""
    if not isinstance(value, dict) or not value:
        raise ValueError("max_memory is a mapping of device to size, e.g. {0: 20GiB, cpu: 60GiB}")
    out: dict[str | int, str | int] = {}
    for key, size in value.items():
        name = str(key).strip()
        if not _DEVICE_KEY.match(name):
            raise ValueError(f"max_memory key {key!r}: name a device: a GPU index (0, 1, ...), cpu or disk")
        if isinstance(size, str) and size.strip().isdigit():
            size = int(size.strip())  # a number of bytes, as written on a command line
        if isinstance(size, bool) or not (isinstance(size, int) and size > 0 or isinstance(size, str) and _SIZE.match(size)):
            raise ValueError(f"max_memory[{name}] = {size!r}: give a size such as 20GiB, 512MB or a number of bytes")
        out[int(name) if name.isdigit() else name] = size.strip() if isinstance(size, str) else size
    return out


def parse_max_memory(text: str) -> dict[str | int, str | int]:
    """``--max-memory cpu=150MiB,0=20GiB``."""
    pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--max-memory {text!r}: write DEVICE=SIZE pairs separated by commas, e.g. cpu=150MiB,0=20GiB")
    return check_max_memory({k.strip(): v.strip() for k, v in pairs})


def placement_bytes(model: Any) -> dict[str, int] | None:
    """Bytes of weights (parameters and buffers) per device of a dispatched model; None when not dispatched.

    From ``hf_device_map`` (module name -> device), so a weight offloaded to disk (a meta
    tensor in memory) counts where accelerate keeps it; a tied weight counts once.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device_map = getattr(base, "hf_device_map", None)
    if not device_map:
        return None
    seen: set[int] = set()
    held: dict[str, int] = {}
    for name, where in sorted(device_map.items(), key=lambda kv: kv[0].count(".")):
        module = base.get_submodule(name) if name else base
        for tensor in (*module.parameters(), *module.buffers()):
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            key = f"cuda:{where}" if isinstance(where, int) else str(where)
            held[key] = held.get(key, 0) + tensor.numel() * tensor.element_size()
    return held


def offloaded_input_problem(model: Any) -> str | None:
    """Why a dispatched model cannot take inputs, or None: transformers' ``generate`` puts its tensors on
    ``model.device`` (the first parameter's), which is no device when the input embedding went to disk."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    first = next(base.parameters(), None)
    if first is None or first.device.type != "meta":
        return None
    where = (getattr(base, "hf_device_map", None) or {})
    return (f"its first weights (the input embedding) were offloaded to {where.get(next(iter(where), ''), 'disk')}, "
            "and generation needs them in memory")


def describe_bytes(held: dict[str, int]) -> str:
    return ", ".join(f"{device} {size / 2**20:.1f} MiB" for device, size in held.items())
