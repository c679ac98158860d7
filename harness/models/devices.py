"""Which device runs the model, and its class (the key goldens and budgets are stored under)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Device:
    """``name`` is what torch takes (``cpu``, ``cuda:1``); ``klass`` keys goldens and budgets."""

    name: str
    klass: str
    description: str

    @property
    def is_cuda(self) -> bool:
        return self.name.startswith("cuda")


def pick_device(option: str) -> Device:
    """Resolve ``--device auto|cpu|cuda``; an xdist worker takes the GPU its id names."""
    import torch

    if option not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {option!r}")
    use_cuda = option == "cuda" or (option == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return Device("cpu", "cpu", "CPU")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    index = _worker_index() % torch.cuda.device_count()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    return Device(f"cuda:{index}", f"cuda-sm{major}{minor}", f"{name} (cuda:{index})")


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    digits = worker.removeprefix("gw")
    return int(digits) if digits.isdigit() else 0
