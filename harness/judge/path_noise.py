"""How far benign changes move a golden's greedy path, step by step.

The path is scored by ``harness.observe.scores`` (one forward pass where no logits processor
acts, forced through ``generate`` where one does); ``moves`` is the one per-step comparison of
two scorings of a path, which both this record and calibration (``harness.judge.noise``) fold.

Recording a golden measures its noise on the recording machine (``measure_path_noise``): the same path
scored under benign changes, per step. The conditions are the ones any machine can run in
one process:

- the other attention kernel (sdpa <-> eager): same maths, another summation order;
- no KV cache: the whole path in one forward, against the recording's incremental decoding;
- a left-padded batch: the prompt next to a longer one;
- a rounding dither: every Linear layer's output moved by up to half a unit in the last place
  of the dtype it is computed in (bfloat16 for NF4, float16 for fp16), with a fixed seed.
  That is what another CPU's or GPU's matrix kernels do: another accumulation order rounds
  some outputs the other way. Measured on SmolLM2-135M: goldens recorded on an AVX-512 CPU
  and judged on an AVX2 one moved the golden tokens' log-probs by mean 0.017 (nf4) and 0.032
  (nf4-lora); the dither on the AVX2 machine, by 0.019 and 0.028-0.032; the attention kernel
  alone, by 0.013 and 0.024, and it missed the cross-CPU moves at single steps by up to 6x.
  Thread count changed nothing on NF4 and moved fp16 by 0.0007.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from harness.judge.allowance import MANTISSA_BITS, POOL, Allowance, PathNoise
from harness.judge.compare import margin_shift
from harness.judge.tolerance import ROUNDING
from harness.observe.observation import Observation, Step
from harness.observe.scores import forward_scores, teacher_force, top2_margin

DITHER_SEED = 1234


# The share of a bound one pass may use and still decide: the rest is left for the decode's own noise.
# A per-step or margin bound is at least 3 noise units (recorded: FACTOR 4 x the step's noise; flat:
# the calibration's x3 over the worst benign condition); a mean bound at least POOL x the path's mean noise.
HEADROOM = 1.0 - 1.0 / 3.0
MEAN_HEADROOM = 1.0 - 1.0 / POOL


def undecided(scored: Sequence[Step], golden: Observation, allowance: Allowance) -> str | None:
    """Why one pass over the golden's path does not decide its verdict (then a real decode does), or None.

    One pass decides where, at every step, it prefers the golden token by more than the step's
    near-tie gap (its margin allowance, or the flat ``tie_gap`` if wider) and uses at most
    ``HEADROOM`` of each per-step bound (|Δ log p|, margin shift) and ``MEAN_HEADROOM`` of the
    mean's. Then a real decode reproduces the golden and passes too, by induction over the steps:
    at step i the decode has the golden's prefix (true at step 0), so its scores are the pass's
    up to the cache-vs-recompute difference ("no KV cache", one of the benign conditions each
    bound covers: a golden's noise record measures it, the flat defaults were calibrated x3 over
    it). That difference moves a margin by at most a third of the margin allowance, which is
    below the gap the pass's margin clears: the decode picks the golden token, so step i+1 has
    the golden's prefix again, and the stop (eos or length) follows the tokens. It moves each
    log-prob, and their mean, by at most the share of the bound the headroom leaves free. A
    flip, a margin within the gap, or a bound used beyond its headroom: the decode may differ.
    """
    steps = golden.steps
    if len(scored) != len(steps):
        return "the one pass does not cover the golden's path"
    deltas = []
    for i, (got, want) in enumerate(zip(scored, steps)):
        if got.best[0] != want.token_id:
            return f"at new token {i} the one pass prefers another token"
        gap = max(allowance.margin_bound(i), allowance.tie_gap or 0.0)
        if not top2_margin(got) > gap + ROUNDING:
            return f"at new token {i} the top-2 margin {top2_margin(got):.3g} is within the near-tie gap {gap:.3g}"
        delta, shift = abs(got.logprob - want.logprob), margin_shift(want, got)
        if delta > HEADROOM * allowance.step_bound(i) or (shift is not None and
                                                          shift > HEADROOM * allowance.margin_bound(i)):
            return f"at new token {i} the one pass uses more than {HEADROOM:.0%} of the step's allowance"
        deltas.append(delta)
    if deltas and sum(deltas) / len(deltas) > MEAN_HEADROOM * allowance.mean_bound(list(range(len(deltas)))):
        return f"the mean |Δ log p| uses more than {MEAN_HEADROOM:.0%} of its bound"
    return None


# -- the rounding dither ------------------------------------------------------------------------
def _rounding_dtype(module: Any, output: Any) -> Any:
    """The dtype a Linear layer rounds in: a 4-bit layer's compute dtype, else its output's."""
    return getattr(module, "compute_dtype", None) or output.dtype


@contextmanager
def rounding_dither(model: Any, *, seed: int = DITHER_SEED) -> Iterator[str]:
    """Every Linear layer's output moved by up to half a unit in the last place of its rounding dtype.

    Adapter layers (lora_A/lora_B) are left alone: they are part of the model under test, not
    a kernel's rounding. Yields a description; the hooks are removed afterwards.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    bits = {getattr(torch, name): value for name, value in MANTISSA_BITS.items() if hasattr(torch, name)}
    names: set[str] = set()

    def hook(module: Any, _inputs: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            return None
        dtype = _rounding_dtype(module, output)
        if dtype not in bits:
            return None
        names.add(str(dtype).removeprefix("torch."))
        values = output.float()
        exponent = torch.floor(torch.log2(values.abs().clamp_min(2.0 ** -24)))
        unit = torch.pow(2.0, exponent - bits[dtype])
        jitter = torch.rand(values.shape, generator=generator).to(values.device) - 0.5
        return (values + jitter * unit).to(output.dtype)

    handles = [module.register_forward_hook(hook) for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and "lora_" not in name]
    try:
        yield "rounding dither (Linear outputs moved by up to half a unit in the last place)"
    finally:
        for handle in handles:
            handle.remove()


# -- one step under a condition -------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    """One step of a reference path as another scoring of it saw it: the per-step sample of noise."""

    index: int
    reference: Step
    got: Step

    @property
    def dlogp(self) -> float:
        """|Δ log p| of the reference's token; inf where the other scoring does not hold it in its top-k."""
        mine = self.got.logprob_of(self.reference.token_id)
        return abs(self.reference.logprob - mine) if mine is not None else math.inf

    @property
    def shift(self) -> float | None:
        """How far the margin between the reference's token and its runner-up moved (the engine's measure)."""
        return margin_shift(self.reference, self.got)

    @property
    def flipped(self) -> bool:
        """Whether the other scoring prefers another token than the reference's."""
        return bool(self.got.top) and self.got.best[0] != self.reference.token_id

    @property
    def counted(self) -> bool:
        """Whether the other scoring is a sample at all: finite, with a top-k (else a NaN/inf step)."""
        return self.got.finite and bool(self.got.top)


def moves(reference: Sequence[Step], other: Sequence[Step]) -> Iterator[Move]:
    """Step by step, how ``other`` (a condition's scores of the same path) moved ``reference``."""
    return (Move(i, ref, got) for i, (ref, got) in enumerate(zip(reference, other)))


# -- measuring a path's noise -------------------------------------------------------------------
def logits_dtype(model: Any) -> str:
    """The dtype the output head rounds the scores to (where the dtype floor comes from)."""
    from harness.models.introspect import base_model, compute_dtype

    head = base_model(model).get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None and weight.is_floating_point():
        return str(weight.dtype).removeprefix("torch.")
    return compute_dtype(model)


def measure_path_noise(model: Any, tokenizer: Any, prompt_ids: Sequence[int], recorded: Observation, *,
            processors_act: bool, repeat: Observation | None = None,
            environment: dict[str, Any] | None = None) -> PathNoise:
    """How far benign changes move ``recorded``'s path, per step (see the module docstring).

    ``recorded``: the recording (free greedy decoding, KV cache) whose tokens form the path;
    ``repeat``: a second recording of the same path, added as a condition where it differs.
    """
    from harness.models.introspect import KernelSwitchError, other_attention

    path = list(recorded.token_ids)
    base = forward_scores(model, prompt_ids, path)
    conditions: dict[str, tuple[tuple[Step, ...], tuple[Step, ...]]] = {}
    cached = recorded.steps if not processors_act else teacher_force(model, prompt_ids, path, tokenizer=tokenizer)
    if processors_act:  # every condition through generate, so processors act on both sides
        conditions["no KV cache (one forward, raw scores)"] = (cached, base.steps)
    else:
        conditions["no KV cache (one forward)"] = (recorded.steps, base.steps)
        try:
            with other_attention(model) as kernels:
                conditions[f"attention kernel {kernels}"] = (base.steps, forward_scores(model, prompt_ids, path).steps)
        except KernelSwitchError:
            pass
        pad = min(4, len(prompt_ids))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        try:
            padded = forward_scores(model, prompt_ids, path, pad=pad, pad_token_id=pad_id)
            conditions[f"left-padded batch ({pad} pad tokens)"] = (base.steps, padded.steps)
        except TypeError:  # a forward without position_ids
            pass
        with rounding_dither(model) as label:
            conditions[label] = (base.steps, forward_scores(model, prompt_ids, path).steps)
    if repeat is not None and repeat.steps != recorded.steps:
        conditions["a second recording"] = (recorded.steps, repeat.steps)
    return _noise(conditions, base.scores, logits_dtype(model), environment or {})


def _noise(conditions: dict[str, tuple[Sequence[Step], Sequence[Step]]], scores: Sequence[float], dtype: str,
           environment: dict[str, Any]) -> PathNoise:
    n = len(scores)
    dlogp, margin = [0.0] * n, [0.0] * n
    flips: dict[str, tuple[int, ...]] = {}
    for name, (reference, other) in conditions.items():
        flipped = []
        for move in moves(reference, other):
            i = move.index
            dlogp[i] = max(dlogp[i], move.dlogp if math.isfinite(move.dlogp) else 0.0)
            margin[i] = max(margin[i], move.shift or 0.0)
            if move.flipped:
                flipped.append(i)
        flips[name] = tuple(flipped)
    return PathNoise(dlogp=tuple(dlogp), margin=tuple(margin), score=tuple(abs(s) for s in scores),
                     logits_dtype=dtype, conditions=tuple(conditions), flips=flips, environment=environment)


def environment(model: Any) -> dict[str, Any]:
    """What numerics depend on besides the weights: recorded next to the noise, shown when a golden fails."""
    import torch

    from harness.models.introspect import base_model, compute_dtype

    device = next(model.parameters()).device
    kernel = getattr(base_model(model).config, "_attn_implementation", None)
    env: dict[str, Any] = {"device": device.type, "compute_dtype": compute_dtype(model),
                           "logits_dtype": logits_dtype(model), "attn_implementation": kernel}
    if device.type == "cpu":
        env.update(cpu_capability=torch.backends.cpu.get_cpu_capability(), threads=torch.get_num_threads())
        kernel_4bit = nf4_cpu_kernel(model)
        if kernel_4bit:
            env.update(nf4_cpu_kernel=kernel_4bit)
    else:
        env.update(gpu=torch.cuda.get_device_name(device))
    return env


def nf4_cpu_kernel(model: Any) -> str | None:
    """Which kernel bitsandbytes runs a 4-bit layer with on this CPU (None: the model has no 4-bit layer).

    bitsandbytes 0.50 decides per machine: where the CPU has AVX512-BF16, a 4-bit layer repacks
    its weights at its first inference forward and every matmul goes through a fused 4-bit
    kernel; elsewhere each forward dequantizes the weights to bfloat16 and calls torch's matmul.
    Two kernels, two roundings of the same sums: an NF4 golden recorded on one kind of CPU and
    judged on the other moves more than the CPU's ISA level alone explains.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu") and hasattr(module, "weight"):
            if module.support_avx512bf16_for_cpu:
                return "fused 4-bit kernel on repacked weights (AVX512-BF16)"
            return "dequantize to bfloat16 + torch matmul"
    return None
