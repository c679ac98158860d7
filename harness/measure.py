"""Memory and time, measured the way optimum-benchmark does, and what NF4 should weigh.

Memory (``optimum_benchmark/trackers/memory.py``): on CUDA, synchronize, reset the
peak statistics, run the workload, synchronize, read ``max_memory_allocated`` and
``max_memory_reserved``. On CPU there is no allocator to ask, so the figure is the
process's resident set size (RSS) sampled every few milliseconds while the workload
runs: it includes Python, torch and everything else in the process, and is always
labelled "process RSS", never GPU memory.

Time (``optimum_benchmark/trackers/latency.py``, its per-token logits-processor clock):
warm-up rounds first; then one ``generate`` of exactly ``new_tokens`` tokens per round,
with a clock read at every decoding step. Prefill is the time to the first step (one
forward over the prompt batch); decode is the rest, ``new_tokens - 1`` forwards with the
cache, so decode tokens/s counts ``new_tokens - 1`` tokens per row. Both come from the
same call: no subtraction of two separately timed runs, which clock noise can make
negative. CUDA work is synchronized before each clock read.

Sizes are MiB (2**20 bytes), as torch and nvidia-smi report them; suites call them MB.
"""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from harness.devices import Device

MIB = 2**20
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
# 4-bit code + one 8-bit absmax per block of 64 + one fp32 constant per 256 blocks.
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)

T = TypeVar("T")


def mib(n_bytes: float | int | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / MIB, 2)


# -- device state ---------------------------------------------------------------------
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


def parallel_conflict(device: Device) -> str | None:
    """Why a peak measured now would be wrong: other xdist workers share this GPU."""
    workers = xdist_workers()
    if workers <= 1 or not device.is_cuda:
        return None
    import torch

    gpus = torch.cuda.device_count()
    if workers <= gpus:
        return None
    return (
        f"{workers} pytest-xdist workers share {gpus} GPU(s), so other workers' models and "
        f"activations would be counted in this peak on {device.description}. Fix: run budget "
        "checks without -n (e.g. `pytest suites/budgets.yaml`), or with at most one worker per GPU."
    )


def parallel_note(device: Device) -> str | None:
    """On CPU under xdist a peak is still right, but it is one worker's process only."""
    workers = xdist_workers()
    if workers > 1 and not device.is_cuda:
        return f"process RSS of this pytest-xdist worker only ({workers} workers run at once)"
    return None


# -- peak memory ------------------------------------------------------------------------
@dataclass(frozen=True)
class PeakMemory:
    """The peak during one workload; ``source`` says what was measured."""

    source: Literal["cuda", "rss"]
    peak_bytes: int
    baseline_bytes: int
    reserved_bytes: int | None = None
    samples: int = 0

    @property
    def label(self) -> str:
        return "GPU peak allocated" if self.source == "cuda" else "process RSS"

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


# -- inputs -------------------------------------------------------------------------------
def model_device(model: Any) -> Any:
    return next(model.parameters()).device


_FILLER = (
    "The quick brown fox jumps over the lazy dog while the harbour bells ring across the "
    "water, and a small boat carries letters, bread and news from one island to the next. "
)


def synthetic_prompt_ids(tokenizer: Any, n_tokens: int) -> list[int]:
    """Exactly ``n_tokens`` ids of ordinary English text (no padding, no special tokens)."""
    ids = list(tokenizer(_FILLER, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError("the tokenizer turned the filler text into no tokens")
    return [ids[i % len(ids)] for i in range(n_tokens)]


def encode_batch(tokenizer: Any, texts: Sequence[str], *, device: Any) -> dict[str, Any]:
    """Left-padded batch (decoder-only models generate from the right edge)."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, padding_side="left")
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def generate_exact(model: Any, tokenizer: Any, inputs: Mapping[str, Any], new_tokens: int,
                   *, logits_processor: Any = None) -> Any:
    """Greedy generation of exactly ``new_tokens`` tokens per row (eos cannot stop it)."""
    import torch

    extra = {"logits_processor": logits_processor} if logits_processor is not None else {}
    with torch.inference_mode():
        return model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            num_beams=1, temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
            **extra,
        )


def run_workload(model: Any, tokenizer: Any, prompts: Sequence[str], *, batch_size: int,
                 max_new_tokens: int) -> int:
    """The memory workload: prompts in batches of ``batch_size`` (cycled to fill the last)."""
    device = model_device(model)
    batches = max(1, -(-len(prompts) // batch_size))
    rows = [prompts[i % len(prompts)] for i in range(batches * batch_size)]
    generated = 0
    for start in range(0, len(rows), batch_size):
        inputs = encode_batch(tokenizer, rows[start:start + batch_size], device=device)
        out = generate_exact(model, tokenizer, inputs, max_new_tokens)
        generated += int(out.shape[0]) * (int(out.shape[1]) - int(inputs["input_ids"].shape[1]))
    return generated


# -- time -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A throughput shape: ``batch`` rows of ``prompt_tokens`` tokens, ``new_tokens`` generated."""

    batch: int
    prompt_tokens: int
    new_tokens: int

    def __str__(self) -> str:
        return f"batch {self.batch} x {self.prompt_tokens} prompt tokens -> {self.new_tokens} new"


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


def throughput_inputs(model: Any, tokenizer: Any, shape: Shape) -> dict[str, Any]:
    import torch

    ids = torch.tensor([synthetic_prompt_ids(tokenizer, shape.prompt_tokens)] * shape.batch,
                       device=model_device(model))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


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


# -- expected NF4 size ------------------------------------------------------------------------
@dataclass(frozen=True)
class NF4Estimate:
    """What a model should weigh in NF4 with double quantization, from its parameter counts."""

    quantized_weights: int
    other_params: int
    adapter_bytes: int = 0
    quantized_modules: int = 0
    bits_per_weight: float = NF4_BITS_PER_WEIGHT

    @property
    def quantized_bytes(self) -> float:
        return self.quantized_weights * self.bits_per_weight / 8

    @property
    def other_bytes(self) -> int:
        return self.other_params * 2

    @property
    def total_bytes(self) -> int:
        return int(round(self.quantized_bytes + self.other_bytes + self.adapter_bytes))

    def figures(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(expected_nf4_mb=mib(self.total_bytes), quantized_mb=mib(self.quantized_bytes),
                   other_16bit_mb=mib(self.other_bytes))
        return out


def _as_model(model_or_config: Any) -> Any:
    """A model to count: the model itself, or one built from a config on the meta device."""
    import torch

    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_or_config)


def nf4_estimate(model_or_config: Any) -> NF4Estimate:
    """Every Linear inside the model except the output head is quantized (transformers'
    bitsandbytes integration skips ``lm_head``); the rest stays at 16 bits. A tied head is
    the embedding matrix, counted once. LoRA layers (peft) keep their own dtype."""
    import torch

    model = _as_model(model_or_config)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    quantized_ids: set[int] = set()
    quantized = 0
    modules = 0
    for name, module in base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head or "lora_" in name:
            continue
        if name.split(".")[-1] == "lm_head":
            continue
        quantized += int(module.in_features) * int(module.out_features)
        quantized_ids.add(id(module.weight))
        modules += 1
    other = 0
    adapter = 0
    for name, param in base.named_parameters():  # deduplicated: a tied head counts once
        if id(param) in quantized_ids:
            continue
        if "lora_" in name:
            adapter += param.numel() * param.element_size()
        else:
            other += param.numel()
    return NF4Estimate(quantized_weights=quantized, other_params=other, adapter_bytes=adapter,
                       quantized_modules=modules)


def expected_nf4_bytes(model_or_config: Any) -> int:
    """Bytes an NF4 (double-quant) load should hold: see :func:`nf4_estimate`."""
    return nf4_estimate(model_or_config).total_bytes


def quant_state_bytes(model: Any) -> int:
    """Bytes of bitsandbytes block constants (absmax, nested absmax, code tables).

    ``get_memory_footprint`` counts parameters and buffers only, so the packed 4-bit
    weights are in it but these constants are not.
    """
    import torch

    total = 0
    seen: set[int] = set()

    def add(tensor: Any) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        add(getattr(state, "absmax", None))
        add(getattr(state, "code", None))
        add(getattr(state, "offset", None))
        nested = getattr(state, "state2", None)
        if nested is not None:
            add(getattr(nested, "absmax", None))
            add(getattr(nested, "code", None))
    return total


# -- budget tables ---------------------------------------------------------------------------
