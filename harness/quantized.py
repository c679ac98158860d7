"""Between bitsandbytes 4-bit layers and plain ones: dequantized copies and the ways to merge an adapter.

Two checks need a model's 4-bit layers undone on a copy. ``cache`` asks a
float32 forward which of two disagreeing decodings is right
(``float32_copy``), and ``lora_merge`` compares the ways a LoRA adapter can be
merged into an NF4 base (``merged``):

- ``merge_and_unload``: peft's own merge. On a 4-bit base it dequantizes each
  targeted layer, adds the LoRA delta and quantizes the sum again.
- ``requantize``: the same done by hand (dequantize to 16-bit, add the delta,
  one fresh NF4 quantization of the sum with the layer's own settings), to tell
  peft's code path apart from what re-quantization itself does.
- ``dequantize``: dequantize, add the delta, and keep the merged layer in 16-bit.

A copy is always made: the pool's loaded model is never touched.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any, Literal

MergePath = Literal["merge_and_unload", "requantize", "dequantize"]
MERGE_PATHS: tuple[MergePath, ...] = ("merge_and_unload", "requantize", "dequantize")
MERGE_PATH_NAMES: dict[MergePath, str] = {
    "merge_and_unload": "merge_and_unload() into the NF4 base (peft re-quantizes)",
    "requantize": "dequantize to 16-bit, merge, re-quantize to NF4",
    "dequantize": "dequantize to 16-bit, merge, keep 16-bit",
}


def is_4bit(module: Any) -> bool:
    """A bitsandbytes 4-bit linear layer (NF4 or FP4)."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes: no 4-bit layer can exist
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def has_4bit_layers(model: Any) -> bool:
    return any(is_4bit(m) for m in model.modules())


def dequantized_weight(layer: Any) -> Any:
    """A 4-bit layer's weight as its forward uses it, in float32."""
    import bitsandbytes.functional as bnbf
    import torch

    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(layer)
    weight = layer.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # bitsandbytes' AVX512 layout: undo it on a copy
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
        return bnbf.dequantize_4bit(data, state).to(torch.float32)
    return bnbf.dequantize_4bit(weight.data, state).to(torch.float32)


def plain_linear(layer: Any, weight: Any, dtype: Any) -> Any:
    """An ``nn.Linear`` with ``weight`` (and the layer's bias) in ``dtype``, on the layer's device."""
    import torch

    device = layer.weight.device
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=layer.bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(weight.to(device=device, dtype=dtype))
        if layer.bias is not None:
            out.bias.copy_(layer.bias.to(dtype))
    return out


def requantize_in_place(layer: Any, weight: Any) -> Any:
    """``layer`` (4-bit, on a copy) now holds ``weight``, quantized afresh with the layer's own settings."""
    import bitsandbytes as bnb

    old = layer.weight
    layer.quant_state = None
    layer.weight = bnb.nn.Params4bit(
        weight.to(old.quant_state.dtype).cpu(), requires_grad=False, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
        module=layer,
    ).to(old.device)
    return layer


def _children(model: Any) -> Iterator[tuple[Any, str, Any]]:
    """(parent, attribute, child) for every module, parents first, collected before any is replaced."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    yield from found


def float32_copy(model: Any) -> Any:
    """A float32 copy of ``model``: 4-bit layers dequantized into float32 ``nn.Linear``s, everything else cast.

    ``PreTrainedModel.to``/``float`` refuse quantized models, so the cast goes
    through ``nn.Module``'s own method once no 4-bit layer is left.
    """
    import torch

    clone = copy.deepcopy(model)
    for parent, name, child in _children(clone):
        if is_4bit(child):
            setattr(parent, name, plain_linear(child, dequantized_weight(child), torch.float32))
    torch.nn.Module.to(clone, torch.float32)
    clone.eval()
    return clone


def _lora_layers(model: Any) -> list[tuple[Any, str, Any]]:
    """(parent, attribute, layer) for every LoRA layer of a peft model."""
    from peft.tuners.lora import LoraLayer

    return [(p, n, c) for p, n, c in _children(model) if isinstance(c, LoraLayer)]


def merged(model: Any, path: MergePath) -> Any:
    """A merged copy of a peft model along ``path``; the model itself is left as it was."""
    clone = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Merge lora module to 4-bit linear.*")
        if path != "merge_and_unload":
            _merge_4bit_by_hand(clone, keep_16bit=path == "dequantize")
        out = clone.merge_and_unload()  # what is left: LoRA layers on 16-bit bases, merged by peft
    out.eval()
    return out


def _merge_4bit_by_hand(model: Any, *, keep_16bit: bool) -> None:
    """Each LoRA layer on a 4-bit base becomes one merged layer: 16-bit, or quantized again."""
    for parent, name, layer in _lora_layers(model):
        base = layer.get_base_layer()
        if not is_4bit(base):
            continue
        weight = dequantized_weight(base)
        bias = None if base.bias is None else base.bias.detach().float()
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            weight = weight + layer.get_delta_weight(adapter).to(weight.device, weight.dtype)
            if layer.lora_bias.get(adapter) and bias is not None:
                bias = bias + layer.lora_B[adapter].bias.detach().float()
        if bias is not None:
            base.bias.data = bias.to(base.bias.dtype)
        dtype = base.weight.quant_state.dtype
        setattr(parent, name, plain_linear(base, weight, dtype) if keep_16bit else requantize_in_place(base, weight))
