"""Reference mode compares two models measured one after the other in one process: the peak it compares
must not depend on which ran first (process RSS keeps the first side's pages; live tensors do not)."""

from __future__ import annotations

import gc

import torch

from harness.models.devices import pick_device
from harness.measure import measure_tensor_peak


def test_the_comparable_peak_does_not_depend_on_what_ran_before():
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)

    def workload() -> float:
        x = torch.randn(64, 256)
        for _ in range(4):
            x = torch.relu(layer(x))
        return float(x.sum())

    device = pick_device("cpu")
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    _, first = measure_tensor_peak(workload, held_bytes=held, device=device)
    blob = [torch.ones(1 << 20) for _ in range(64)]  # 256 MiB allocated and freed by "the other side"
    del blob
    gc.collect()
    _, second = measure_tensor_peak(workload, held_bytes=held, device=device)
    assert first.label == "model + live workload tensors" and first.baseline_bytes == held
    workload_bytes = first.peak_bytes - held
    assert 64 * 256 * 4 <= workload_bytes < 16 * 64 * 256 * 4  # a few activations, not the process
    assert second.peak_bytes == first.peak_bytes
