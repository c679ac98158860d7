"""Constructed faults in a loaded model's scores, to show what the gate catches (calibration only).

``harness.calibrate.regressions`` changes a model's files (weights, config, adapter); a fault here
changes what a loaded model computes, which no file change can express. Enabled per run:

    HARNESS_FAULT=swap-top2:0.2 pytest suites/generation.yaml -p harness.calibrate.faults

``swap-top2:G``: wherever the two best scores of a position are within G nats, they are
swapped. Each swap alone looks like a flip at a near-tie; together they change every close call
of every generation, the way a broken decoding rule or numerics change would. The fault sits on
the output head, so every path that reads scores (generate, one forward pass, teacher forcing)
sees it, as it would see a real one.
"""

from __future__ import annotations

import os
from typing import Any

ENV = "HARNESS_FAULT"


def parse(text: str) -> tuple[str, float]:
    kind, _, value = text.partition(":")
    if kind != "swap-top2" or not value:
        raise ValueError(f"{ENV}={text!r}: expected swap-top2:GAP (GAP in nats, e.g. 0.2)")
    return kind, float(value)


def swap_top2(model: Any, gap: float) -> Any:
    """A forward hook on ``model``'s output head swapping the two best scores where they are within ``gap``."""
    import torch

    from harness.models.introspect import base_model

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        values, index = torch.topk(output, 2, dim=-1)
        close = (values[..., 0] - values[..., 1]) < gap
        if not bool(close.any()):
            return None
        swapped = output.clone()
        first, second = index[..., 0:1], index[..., 1:2]
        swapped.scatter_(-1, first, torch.where(close.unsqueeze(-1), values[..., 1:2], values[..., 0:1]))
        swapped.scatter_(-1, second, torch.where(close.unsqueeze(-1), values[..., 0:1], values[..., 1:2]))
        return swapped

    return base_model(model).get_output_embeddings().register_forward_hook(hook)


def pytest_configure(config: Any) -> None:
    """Wrap the pool's loading so every variant loaded in this session carries the fault."""
    text = os.environ.get(ENV)
    if not text:
        return
    _, gap = parse(text)
    from harness.models.pool import ModelPool

    original = ModelPool._load

    def load(self: ModelPool, variant: Any) -> Any:
        loaded = original(self, variant)
        swap_top2(loaded.model, gap)
        self.notes.append(f"constructed fault {text} ({ENV}): this run is a calibration, not a verdict")
        return loaded

    ModelPool._load = load  # type: ignore[method-assign]
