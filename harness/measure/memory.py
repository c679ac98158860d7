"""Peak memory around a workload, the way optimum-benchmark measures it.

On CUDA: synchronize, reset the peak statistics, run the workload, synchronize, read
``max_memory_allocated`` and ``max_memory_reserved``. On CPU there is no allocator to ask,
so the figure is the process's resident set size (RSS) sampled every few milliseconds while
the workload runs: it includes Python, torch and everything else in the process, and is
always labelled "process RSS", never GPU memory.

Process RSS is what a user's process costs, but it is no way to compare two models measured
one after the other in one process: freed memory stays in the process, so the second carries
the first's pages. Where two sides are compared on a CPU (reference mode),
:func:`measure_tensor_peak` counts what the allocator hands out instead: the bytes the model
holds plus the largest sum of live tensors its workload allocates (torch's profiler, memory
events), which does not depend on what ran before.

Sizes are MiB (2**20 bytes), as torch and nvidia-smi report them; suites call them MB.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from harness.measure._device import release_memory, synchronize, xdist_workers

if TYPE_CHECKING:
    from harness.models.devices import Device

MIB = 2**20
T = TypeVar("T")


def mib(n_bytes: float | int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / MIB, 2)


def parallel_conflict(device: Device, *, measuring: str = "peak") -> str | None:
    """Why a ``measuring`` ("peak", "timings") taken now would be wrong: xdist workers share this GPU."""
    workers = xdist_workers()
    if workers <= 1 or not device.is_cuda:
        return None
    import torch

    gpus = torch.cuda.device_count()
    if workers <= gpus:
        return None
    effect = ("other workers' models and activations would be counted in this peak" if measuring == "peak"
              else f"other workers' kernels would run during these {measuring}")
    return (
        f"{workers} pytest-xdist workers share {gpus} GPU(s), so {effect} on {device.description}. "
        "Fix: run budget checks without -n (e.g. `pytest suites/budgets.yaml`), or with at most one "
        "worker per GPU."
    )


def parallel_note(device: Device) -> str | None:
    """On CPU under xdist a peak is still right, but it is one worker's process only."""
    workers = xdist_workers()
    if workers > 1 and not device.is_cuda:
        return f"process RSS of this pytest-xdist worker only ({workers} workers run at once)"
    return None


@dataclass(frozen=True)
class PeakMemory:
    """The peak during one workload; ``source`` says what was measured."""

    source: Literal["cuda", "rss", "tensors"]
    peak_bytes: int
    baseline_bytes: int
    reserved_bytes: int | None = None
    samples: int = 0

    @property
    def label(self) -> str:
        return {"cuda": "GPU peak allocated", "rss": "process RSS",
                "tensors": "model + live workload tensors"}[self.source]

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "peak_mb": mib(self.peak_bytes),
            "peak_kind": self.label,
            "peak_baseline_mb": mib(self.baseline_bytes),
        }
        if self.reserved_bytes is not None:
            out["peak_reserved_mb"] = mib(self.reserved_bytes)
        return out


class RssSampler:
    """Samples this process's RSS in a background thread; ``peak`` is the largest seen.

    ``ru_maxrss`` would be simpler but is a lifetime maximum: after a bigger variant
    was loaded and freed it could never show a smaller peak.
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        import psutil

        self._process = psutil.Process()
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = int(self._process.memory_info().rss)
        self.samples += 1
        if rss > self.peak:
            self.peak = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> RssSampler:
        self.baseline = int(self._process.memory_info().rss)
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._loop, name="harness-rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()


def measure_peak(fn: Callable[[], T], *, device: Device) -> tuple[T, PeakMemory]:
    """Run ``fn`` once and return its result with the memory peak it caused."""
    release_memory(device)
    if device.is_cuda:
        import torch

        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device.name)
        baseline = int(torch.cuda.memory_allocated(device.name))
        result = fn()
        synchronize(device)
        return result, PeakMemory(
            source="cuda",
            peak_bytes=int(torch.cuda.max_memory_allocated(device.name)),
            baseline_bytes=baseline,
            reserved_bytes=int(torch.cuda.max_memory_reserved(device.name)),
        )
    with RssSampler() as sampler:
        result = fn()
    return result, PeakMemory(source="rss", peak_bytes=sampler.peak, baseline_bytes=sampler.baseline,
                              samples=sampler.samples)


def live_tensor_peak(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` once on the CPU; the largest sum of tensor bytes it had allocated and not yet freed."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return result, peak


def measure_tensor_peak(fn: Callable[[], T], *, held_bytes: int, device: Device) -> tuple[T, PeakMemory]:
    """``fn``'s peak as the model's ``held_bytes`` plus its live workload tensors: comparable across models
    measured in one process (GPU: the allocator's own peak, which :func:`measure_peak` reads)."""
    if device.is_cuda:
        return measure_peak(fn, device=device)
    release_memory(device)
    result, workload = live_tensor_peak(fn)
    return result, PeakMemory(source="tensors", peak_bytes=held_bytes + workload, baseline_bytes=held_bytes)
