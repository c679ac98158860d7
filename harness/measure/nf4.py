"""What a model should weigh in NF4 (double quantization), from its own layer shapes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from harness.measure.memory import mib

NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
# 4-bit code + one 8-bit absmax per block of 64 + one fp32 constant per 256 blocks.
NF4_BITS_PER_WEIGHT = 4 + 8 / NF4_BLOCKSIZE + 32 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)


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

    @property
    def sixteen_bit_bytes(self) -> int:
        """The same model with every weight at 16 bits: the twin an NF4 saving is measured against."""
        return (self.quantized_weights + self.other_params) * 2 + self.adapter_bytes

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
