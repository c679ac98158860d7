"""What decoding could reach: the KV cache a shape holds, and the memory-bandwidth roofline.

Decoding one token per row reads every weight once per step (and the KV cache so far), so
on a GPU its ceiling is ``peak bandwidth / bytes read per step`` steps per second. The
fraction of that ceiling a variant reaches says how much of the card a loader, a kernel
(bitsandbytes' 4-bit GEMV) or Python overhead leaves unused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

# Peak memory bandwidth, bytes/s, from the vendors' data sheets. Matched against
# torch.cuda.get_device_name() in this order (the first pattern that matches wins).
BANDWIDTH_TABLE: tuple[tuple[str, str, float], ...] = (
    (r"\bGH200\b", "GH200 (HBM3)", 4.0e12),
    (r"\bH200\b", "H200", 4.8e12),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 3.9e12),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 2.0e12),
    (r"\bH100\b", "H100 SXM", 3.35e12),
    (r"\bA100\b.*80GB.*PCIe|\bA100 80GB PCIe\b", "A100 80GB PCIe", 1.935e12),
    (r"\bA100\b.*80GB", "A100 SXM 80GB", 2.039e12),
    (r"\bA100\b", "A100 40GB", 1.555e12),
    (r"\bL40S\b", "L40S", 864e9),
    (r"\bL4\b", "L4", 300e9),
    (r"\bA10G\b", "A10G", 600e9),
    (r"\bT4\b", "T4", 320e9),
)


@dataclass(frozen=True)
class Bandwidth:
    """A peak bandwidth and where the number comes from (the table's card, or ``--bandwidth``)."""

    bytes_per_s: float
    source: str

    def figures(self) -> dict[str, Any]:
        return {"bytes_per_s": self.bytes_per_s, "tb_per_s": round(self.bytes_per_s / 1e12, 3), "source": self.source}


def peak_bandwidth(device_name: str | None, *, override_gb_s: float | None = None) -> Bandwidth | None:
    """The card's peak bandwidth: ``--bandwidth`` (GB/s) if given, else the table; None if unknown."""
    if override_gb_s is not None:
        if not override_gb_s > 0:
            raise ValueError(f"--bandwidth {override_gb_s}: a peak bandwidth in GB/s is a positive number")
        return Bandwidth(override_gb_s * 1e9, f"--bandwidth {override_gb_s:g} GB/s")
    if not device_name:
        return None
    for pattern, card, value in BANDWIDTH_TABLE:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return Bandwidth(value, f"{card} data sheet, {value / 1e12:g} TB/s (matched {device_name!r})")
    return None


def kv_cache_bytes(config: Any, *, batch: int, tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of a full-attention KV cache from the config: ``2 x layers x kv_heads x head_dim x
    tokens x batch x bytes``. Sliding-window layers hold less; :func:`measured_kv_cache_bytes`
    asks the model's own cache."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return 2 * layers * kv_heads * head_dim * tokens * batch * dtype_bytes


def measured_kv_cache_bytes(model: Any, input_ids: Any) -> int | None:
    """Bytes the model's own cache holds after a prefill of ``input_ids`` (batch x tokens).

    One forward with the cache on and logits for the last position only; whatever layout the
    architecture uses (grouped KV heads, sliding windows per layer) is counted as allocated.
    None when the cache does not expose its tensors (then use :func:`kv_cache_bytes`).
    """
    import torch

    from harness.observe.observation import cache_kwargs

    with torch.inference_mode():
        try:
            out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            out = model(input_ids=input_ids, use_cache=True)
    cache = next(iter(cache_kwargs(out).values()), None)
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    del out, cache
    return total or None


def decode_roofline_fraction(*, weight_bytes: int, kv_bytes_mid: int, decode_tokens_per_s: float, batch: int,
                             bandwidth: Bandwidth | None) -> float | None:
    """Achieved / peak bandwidth while decoding: (weights + KV cache read per step) x steps/s / peak.

    One step yields ``batch`` tokens and reads every weight once plus the cache (taken at the
    middle of the generation); at batch 1 this is weight bytes x tok/s / peak bandwidth.
    """
    if bandwidth is None or not decode_tokens_per_s or batch < 1:
        return None
    steps_per_s = decode_tokens_per_s / batch
    return (weight_bytes + kv_bytes_mid) * steps_per_s / bandwidth.bytes_per_s
