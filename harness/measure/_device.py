"""Device state around a measurement: wait for queued work, give freed memory back, count workers."""

from __future__ import annotations

import gc
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.models.devices import Device


def synchronize(device: Device) -> None:
    """Wait for queued CUDA kernels, so that clocks and peaks see finished work."""
    if device.is_cuda:
        import torch

        torch.cuda.synchronize(device.name)


def release_memory(device: Device) -> None:
    """Give freed memory back (CUDA cache; glibc's heap on Linux) before measuring a peak."""
    gc.collect()
    if device.is_cuda:
        import torch

        torch.cuda.empty_cache()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def xdist_workers() -> int:
    try:
        return max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    except ValueError:
        return 1

