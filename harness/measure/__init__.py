"""Memory and time, measured the way optimum-benchmark does, and what NF4 should weigh.

One concern per module: ``memory`` (peak sampling), ``timing`` (per-step clocks),
``workloads`` (what runs while measuring, and its ``Shape``), ``nf4`` (the first-principles size estimate).
The names below are re-exported so that ``from harness.measure import X`` keeps working.
"""

from __future__ import annotations

from harness.measure._device import release_memory, synchronize, xdist_workers
from harness.measure.memory import (
    MIB, PeakMemory, RssSampler, measure_peak, measure_tensor_peak, mib, parallel_conflict, parallel_note,
)
from harness.measure.nf4 import (
    NF4_BITS_PER_WEIGHT, NF4Estimate, expected_nf4_bytes, nf4_estimate, quant_state_bytes,
)
from harness.measure.timing import RoundTiming, ThroughputFigures, measure_throughput, timed_round
from harness.measure.workloads import (
    Shape, encode_batch, generate_exact, model_device, run_workload, synthetic_prompt_ids, throughput_inputs,
)

__all__ = [
    "MIB", "NF4_BITS_PER_WEIGHT", "NF4Estimate", "PeakMemory", "RoundTiming", "RssSampler", "Shape",
    "ThroughputFigures", "encode_batch", "expected_nf4_bytes", "generate_exact", "measure_peak", "measure_tensor_peak",
    "measure_throughput", "mib", "model_device", "nf4_estimate", "parallel_conflict", "parallel_note",
    "quant_state_bytes", "release_memory", "run_workload", "synchronize", "synthetic_prompt_ids",
    "throughput_inputs", "timed_round", "xdist_workers",
]
