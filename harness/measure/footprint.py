"""One variant's memory, measured: its weights, its 4-bit block constants, and the peak while a
workload runs.

The ``memory`` check judges these figures against budgets and savings; ``harness-bench``
tabulates them. Both measure through :func:`measure_memory`, so a bench table and a check's
verdict read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from harness.measure.memory import PeakMemory, measure_peak, measure_tensor_peak, mib
from harness.measure.nf4 import nf4_estimate, quant_state_bytes
from harness.measure.workloads import run_workload
from harness.models.quantized import describe_layouts
from harness.observe.prompts import PromptText

if TYPE_CHECKING:
    from harness.models.devices import Device
    from harness.models.pool import Loaded


class Workload(BaseModel):
    """What runs while the peak is measured: prompts in batches, a fixed number of new tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: list[PromptText] = Field(min_length=1, description="Raw prompts, run in batches.")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="Tokens generated per batch.")
    batch_size: int = Field(1, ge=1, le=4096, description="Prompts per batch.")



@dataclass(frozen=True)
class MemoryFigures:
    """One variant's memory, measured once per session and check."""

    variant: str
    weights_bytes: int
    peak: PeakMemory
    generated_tokens: int
    quant_state_bytes: int = 0
    # bitsandbytes' CPU backend un-nests double quantization on first use (absmax -> bf16)
    quant_state_after_bytes: int = 0
    expected_nf4_bytes: int | None = None
    expected_16bit_bytes: int | None = None
    placement: dict[str, int] | None = None  # a model spread by device_map: bytes per device
    # the 4-bit layout at load and once the workload ran (bitsandbytes repacks at the first forward on
    # CPUs with AVX512-BF16, and the quant state then holds a bfloat16 absmax instead of a nested one)
    layout_at_load: str | None = None
    layout: str | None = None
    # reference mode: a peak that does not depend on what the process ran before (measure_tensor_peak)
    comparable_peak: PeakMemory | None = None

    def metric(self, name: str) -> int:
        return self.weights_bytes if name == "weights" else self.peak.peak_bytes

    @property
    def held_bytes(self) -> int:
        """Everything the weights hold: the footprint plus bitsandbytes' block constants."""
        return self.weights_bytes + self.quant_state_bytes

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"weights_mb": mib(self.weights_bytes), **self.peak.figures()}
        if self.quant_state_bytes:
            out["quant_state_mb"] = mib(self.quant_state_bytes)
            out["weights_with_quant_state_mb"] = mib(self.held_bytes)
        if self.quant_state_after_bytes and self.quant_state_after_bytes != self.quant_state_bytes:
            out["quant_state_after_workload_mb"] = mib(self.quant_state_after_bytes)
        if self.layout:
            out["weights_4bit_layout"] = self.layout
            if self.layout_at_load != self.layout:
                out["weights_4bit_layout_at_load"] = self.layout_at_load
        if self.expected_nf4_bytes is not None:
            out["expected_nf4_mb"] = mib(self.expected_nf4_bytes)
        if self.placement:
            from harness.models.placement import describe_bytes

            out["weights_held_on"] = describe_bytes(self.placement)
            out.update({f"weights_on_{device.replace(':', '')}_mb": mib(size) for device, size in self.placement.items()})
        return out


def measure_memory(loaded: Loaded, tokenizer: Any, workload: Workload, *, device: Device,
                   comparable: bool = False) -> MemoryFigures:
    """Weights of the loaded variant and the peak while ``workload`` runs on it.

    ``comparable``: also the peak that two models measured in one process can be compared by
    (the workload run once more, its live tensors counted: ``measure_tensor_peak``).
    """
    model = loaded.model
    is_nf4 = loaded.variant.quant == "nf4"
    state_before = quant_state_bytes(model) if is_nf4 else 0
    layout_at_load = describe_layouts(model)
    estimate = nf4_estimate(model) if is_nf4 else None

    def work() -> int:
        return run_workload(model, tokenizer, workload.prompts, batch_size=workload.batch_size,
                            max_new_tokens=workload.max_new_tokens)

    generated, peak = measure_peak(work, device=device)
    held = int(loaded.weights_bytes) + quant_state_bytes(model)
    comparable_peak = measure_tensor_peak(work, held_bytes=held, device=device)[1] if comparable else None
    return MemoryFigures(
        variant=loaded.variant.key,
        weights_bytes=int(loaded.weights_bytes),
        peak=peak,
        generated_tokens=generated,
        quant_state_bytes=state_before,
        quant_state_after_bytes=quant_state_bytes(model) if is_nf4 else 0,
        expected_nf4_bytes=estimate.total_bytes if estimate else None,
        expected_16bit_bytes=estimate.sixteen_bit_bytes if estimate else None,
        placement=loaded.placement,
        layout_at_load=layout_at_load,
        layout=describe_layouts(model),
        comparable_peak=comparable_peak,
    )
