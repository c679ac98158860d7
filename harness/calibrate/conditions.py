"""The benign perturbations a calibration measures, and the constructed regressions it checks against.

Each condition scores the reference's own greedy paths under one change: a padded batch, no
KV cache, a rounding dither, another attention kernel, one CPU thread, another SIMD level.
Those set by an environment variable need a fresh process (``worker.py``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.calibrate.context import Context
from harness.calibrate.worker import in_subprocess
from harness.judge.noise import Item, Scored, forced, forced_batch, score_single_pass


def available_kernels(device: Any) -> list[str]:
    """Attention kernels this device and installation can run."""
    import importlib.util

    kernels = ["eager", "sdpa"]
    if device.is_cuda and importlib.util.find_spec("flash_attn") is not None:
        kernels.append("flash_attention_2")
    return kernels


def default_envs(device: Any) -> list[str]:
    """On an AVX-512 CPU, the AVX2 kernels that other CPUs (and many CI runners) use."""
    if device.is_cuda:
        return []
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return ["ATEN_CPU_CAPABILITY=avx2"] if capability.upper().startswith("AVX512") else []


def perturbations(ctx: Context, pool: Any, variant: Any, paths: list[list[int]], conditions: list[str],
                  envs: list[str]) -> list[tuple[str, Callable[[], list[Scored]]]]:
    """(name, run) for each perturbation asked for and available here, cheapest first."""
    import torch

    out: list[tuple[str, Callable[[], list[Scored]]]] = []

    def loaded() -> Any:
        return pool.get(variant).model

    if "repeat" in conditions:
        out.append(("repeat", lambda: forced(loaded(), pool.tokenizer, ctx.items, paths)))
    if "batch" in conditions and len(ctx.items) > 1:
        out.append(("padded batch", lambda: forced_batch(loaded(), pool.tokenizer, ctx.items, paths)))
    if "cache" in conditions:
        out.append(("no KV cache (one forward pass)", lambda: score_single_pass(loaded(), ctx.items, paths)))
    if "dither" in conditions:
        out.append(("rounding dither (another kernel's rounding)", lambda: _dithered(loaded(), pool.tokenizer,
                                                                                    ctx.items, paths)))
    if "threads" in conditions and not ctx.device.is_cuda and torch.get_num_threads() > 1:
        # a fresh process: torch's and OpenMP's thread pools are sized once, at start
        out.append((f"threads=1 (default {torch.get_num_threads()})",
                    lambda: in_subprocess(ctx, variant, paths, "OMP_NUM_THREADS=1")))
    if "kernels" in conditions:
        from harness.models.provenance import attn_implementation

        current = attn_implementation(ctx.reference_attn, ctx.resolved.path)
        for kernel in available_kernels(ctx.device):
            if kernel != current:
                out.append((f"attn={kernel}", lambda k=kernel: _with_kernel(ctx, pool, variant, k, paths)))
    if "env" in conditions:
        for setting in envs:
            out.append((f"env {setting}", lambda s=setting: in_subprocess(ctx, variant, paths, s)))
    return out


def _dithered(model: Any, tokenizer: Any, items: list[Item], paths: list[list[int]]) -> list[Scored]:
    """The paths scored with every Linear output moved by up to half a unit in the last place (harness.judge.path_noise)."""
    from harness.judge.path_noise import rounding_dither

    with rounding_dither(model):
        return forced(model, tokenizer, items, paths)


def regression_scores(ctx: Context, variant: Any, regression: Any, paths: list[list[int]]) -> list[Scored]:
    """The reference paths scored by a modified copy of the model (or adapter)."""
    import dataclasses

    from harness.models.pool import ModelPool
    from harness.calibrate.regressions import apply, cleanup

    workdir = Path(tempfile.mkdtemp(prefix="harness-regression-"))
    try:
        model_dir, adapter_dir = apply(regression, model=ctx.resolved.path, adapter=ctx.resolved.adapter,
                                       workdir=workdir)
        resolved = dataclasses.replace(ctx.resolved, path=model_dir, adapter=adapter_dir)
        pool = ModelPool(resolved=resolved, device=ctx.device, attn_implementation=ctx.reference_attn)
        try:
            return forced(pool.get(variant).model, pool.tokenizer, ctx.items, paths)
        finally:
            pool.release()
    finally:
        cleanup(workdir)


def _with_kernel(ctx: Context, pool: Any, variant: Any, kernel: str, paths: list[list[int]]) -> list[Scored]:
    from harness.models.pool import ModelPool

    pool.release()
    other = ModelPool(resolved=ctx.resolved, device=ctx.device, attn_implementation=kernel)
    try:
        return forced(other.get(variant).model, pool.tokenizer, ctx.items, paths)
    finally:
        other.release()

