"""Prefill and decode time from one ``generate`` call, with a clock read at every decoding step.

As optimum-benchmark's per-token logits-processor clock (``optimum_benchmark/trackers/latency.py``):
warm-up rounds first; then one ``generate`` of exactly ``new_tokens`` tokens per round. Prefill is
the time to the first step (one forward over the prompt batch); decode is the rest,
``new_tokens - 1`` forwards with the cache, so decode tokens/s counts ``new_tokens - 1`` tokens per
row. Both come from the same call: no subtraction of two separately timed runs, which clock noise
can make negative. CUDA work is synchronized before each clock read.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.measure._device import synchronize
from harness.measure.workloads import Shape, generate_exact, throughput_inputs

if TYPE_CHECKING:
    from harness.models.devices import Device


@dataclass(frozen=True)
class RoundTiming:
    """One generate call: time to the first decoding step, and the rest."""

    prefill_s: float
    decode_s: float


@dataclass(frozen=True)
class ThroughputFigures:
    """Medians over the timed rounds (warm-up rounds excluded)."""

    shape: Shape
    rounds: tuple[RoundTiming, ...]
    device: str

    @property
    def prefill_s(self) -> float:
        return statistics.median(r.prefill_s for r in self.rounds)

    @property
    def decode_s(self) -> float:
        return statistics.median(r.decode_s for r in self.rounds)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.shape.batch * self.shape.prompt_tokens / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.shape.batch * max(self.shape.new_tokens - 1, 1) / self.decode_s

    def figures(self) -> dict[str, Any]:
        return {
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "prefill_ms": round(self.prefill_s * 1000, 2),
            "decode_ms_per_token": round(self.decode_s * 1000 / max(self.shape.new_tokens - 1, 1), 2),
            "batch": self.shape.batch,
            "prompt_tokens": self.shape.prompt_tokens,
            "new_tokens": self.shape.new_tokens,
            "rounds": len(self.rounds),
            "speed_kind": "CPU" if self.device == "cpu" else "GPU",
        }


def _step_clock(device: Device) -> Any:
    """A logits processor that only reads the clock: it runs once per step, after each forward."""
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


def timed_round(model: Any, tokenizer: Any, inputs: Mapping[str, Any], shape: Shape, *,
                device: Device) -> RoundTiming:
    """One generate of ``shape.new_tokens``; prefill ends at its first step, decode is the rest."""
    from transformers import LogitsProcessorList

    clock = _step_clock(device)
    synchronize(device)
    start = time.perf_counter()
    generate_exact(model, tokenizer, inputs, shape.new_tokens, logits_processor=LogitsProcessorList([clock]))
    synchronize(device)
    end = time.perf_counter()
    if len(clock.times) != shape.new_tokens:
        raise RuntimeError(f"generate ran {len(clock.times)} steps, expected {shape.new_tokens}")
    return RoundTiming(prefill_s=clock.times[0] - start, decode_s=end - clock.times[0])


def measure_throughput(model: Any, tokenizer: Any, shape: Shape, *, device: Device, rounds: int,
                       warmup_rounds: int) -> ThroughputFigures:
    """Throughput without pytest-benchmark (references, the bench command): same rounds."""
    inputs = throughput_inputs(model, tokenizer, shape)
    for _ in range(warmup_rounds):
        timed_round(model, tokenizer, inputs, shape, device=device)
    timings = tuple(timed_round(model, tokenizer, inputs, shape, device=device) for _ in range(rounds))
    return ThroughputFigures(shape=shape, rounds=timings, device=device.klass)
