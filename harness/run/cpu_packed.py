"""Run a session on the CPU-packed 4-bit layout, whatever the CPU (calibration and tests).

Where the CPU has AVX512-BF16, bitsandbytes repacks every 4-bit weight at the first
inference forward and runs a fused kernel (``harness.models.quantized``, "two memory layouts").
On any other CPU that path is never taken, so code that reads 4-bit weights would meet the
packed layout first on a user's machine. Enabled per run:

    HARNESS_4BIT_LAYOUT=cpu-packed pytest suites/ -p harness.run.cpu_packed

Every NF4 variant the pool loads is repacked as bitsandbytes' first forward would. Where the
CPU has the fused kernel, bitsandbytes runs it; where it has not, a reference kernel in torch
stands in (:func:`reference_gemv_4bit`: the packed nibbles and bfloat16 block scales read back,
one bfloat16 matmul, as the fused kernel computes). The summary says so: such a run is a
calibration of the layout, not a measure of the fused kernel's speed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

ENV = "HARNESS_4BIT_LAYOUT"
_library: Any = None  # the torch.library holding the reference kernel, while it is registered


def fused_kernel_available() -> bool:
    """Whether bitsandbytes runs its fused CPU kernel here (the CPU has AVX512-BF16)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    try:
        return bool(has_avx512bf16())
    except Exception:  # a build without the CPU library: no fused kernel
        return False


def unpack_codes(packed: Any, n: int, k: int, block_n: int = 32) -> Any:
    """The [n, k] 4-bit codes of a weight in the CPU-packed layout (the inverse of its nibble shuffle)."""
    import torch

    half = packed.reshape(-1, block_n)
    both = torch.cat([half & 0xF, (half >> 4) & 0xF], dim=-1)
    return both.reshape(n // block_n, k // 2, block_n, 2).transpose(-3, -2).reshape(n, k)


def reference_gemv_4bit(a: Any, b: Any, shape_b: Sequence[int], absmax: Any, code: Any, blocksize: int) -> Any:
    """``a @ W.T`` for a CPU-packed 4-bit ``W``, in bfloat16 like the fused kernel."""
    import torch

    n, k = int(shape_b[0]), int(shape_b[1])
    if b.dtype != torch.uint8:
        b = b.contiguous().view(torch.uint8)
    codes = unpack_codes(b, n, k).long()
    scales = absmax.to(torch.bfloat16).T.reshape(n, k // blocksize, 1)
    weight = (code.to(torch.bfloat16)[codes].reshape(n, k // blocksize, blocksize) * scales).reshape(n, k)
    x = a.to(torch.bfloat16)
    return (x.reshape(-1, k) @ weight.T).reshape(*x.shape[:-1], n)


def register_reference_kernel() -> bool:
    """Register :func:`reference_gemv_4bit` as bitsandbytes' CPU ``gemv_4bit`` where no fused kernel is.

    Returns whether it was registered (False where the CPU runs the real one).
    """
    global _library
    if fused_kernel_available() or _library is not None:
        return False
    import torch

    import bitsandbytes  # noqa: F401  (defines the op)

    _library = torch.library.Library("bitsandbytes", "IMPL")  # noqa: TOR901
    _library.impl("gemv_4bit", reference_gemv_4bit, "CPU")
    return True


def unregister_reference_kernel() -> None:
    global _library
    if _library is not None:
        _library._destroy()
        _library = None


def pytest_configure(config: Any) -> None:
    """Wrap the pool's loading so every NF4 variant of this session holds the CPU-packed layout."""
    if os.environ.get(ENV) != "cpu-packed":
        if os.environ.get(ENV):
            raise ValueError(f"{ENV}={os.environ[ENV]!r}: the one layout this plugin sets is cpu-packed")
        return
    from harness.models.pool import ModelPool
    from harness.models.quantized import repack_for_cpu

    emulated = register_reference_kernel()
    original = ModelPool._load

    def load(self: ModelPool, variant: Any) -> Any:
        loaded = original(self, variant)
        if repack_for_cpu(loaded.model):
            kernel = "a torch reference kernel standing in for the fused one (this CPU has no AVX512-BF16)" \
                if emulated else "bitsandbytes' fused kernel"
            note = f"4-bit weights repacked into the CPU-packed layout ({ENV}), run by {kernel}: a calibration run"
            if note not in self.notes:
                self.notes.append(note)
        return loaded

    ModelPool._load = load  # type: ignore[method-assign]
