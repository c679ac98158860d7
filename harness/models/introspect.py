"""What a loaded model is made of, read the same way by every layer: its transformers core,
the dtypes it computes in, and its attention kernel.

One home for these rules, because two copies already disagreed once: ``harness-diff`` took the
input embedding's dtype as "the compute dtype", so an NF4 model (float16 embedding, bfloat16
4-bit compute) got float16's noise floor instead of bfloat16's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def base_model(model: Any) -> Any:
    """The transformers model under a peft wrapper (adapter layers stay inside it)."""
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def activation_dtype(model: Any) -> Any:
    """The dtype the model's 16-bit parts hold and its activations flow in (its input embedding's).

    A 4-bit layer casts its input to the compute dtype and its output back, so a plain layer
    put in its place must be in this dtype, not the compute dtype nor the quantization state's
    (which bitsandbytes' CPU repack sets to bfloat16).
    """
    return base_model(model).get_input_embeddings().weight.dtype


def compute_dtype(model: Any) -> str:
    """The dtype matmuls run in, by name: a 4-bit model's compute dtype, else :func:`activation_dtype`.

    Rounding, and so every noise floor, follows this dtype: an NF4 layer multiplies in its
    compute dtype whatever dtype its input arrives in.
    """
    inner = base_model(model)
    config = getattr(inner.config, "quantization_config", None)
    dtype = config.get("bnb_4bit_compute_dtype") if isinstance(config, dict) else \
        getattr(config, "bnb_4bit_compute_dtype", None)
    if dtype is None or not getattr(inner, "is_loaded_in_4bit", False):
        dtype = activation_dtype(inner)
    return str(dtype).removeprefix("torch.")


class KernelSwitchError(ValueError):
    """The model cannot switch attention kernels once loaded (no benign perturbation to measure)."""


@contextmanager
def other_attention(model: Any) -> Iterator[str]:
    """The loaded model with its other attention kernel (sdpa <-> eager), restored afterwards.

    Kernel choice is a benign change: same weights and maths, another summation order, so
    what it moves is rounding. Yields ``"sdpa vs eager"``; KernelSwitchError where it cannot.
    """
    inner = base_model(model)
    current = getattr(inner.config, "_attn_implementation", None) or "sdpa"
    other = "eager" if current != "eager" else "sdpa"
    try:
        inner.set_attn_implementation(other)
    except Exception as exc:  # noqa: BLE001 - any refusal means: no second kernel here
        raise KernelSwitchError(f"{type(inner).__name__} cannot switch its attention kernel "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    try:
        if getattr(inner.config, "_attn_implementation", None) != other:
            raise KernelSwitchError(f"{type(inner).__name__} kept {current!r} when asked for {other!r}")
        yield f"{current} vs {other}"
    finally:
        inner.set_attn_implementation(current)
