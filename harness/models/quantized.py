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

Two memory layouts of a 4-bit layer exist on a CPU, and which one a model is in
depends on the machine. Where the CPU has AVX512-BF16, bitsandbytes repacks every
4-bit weight at the first inference forward for its fused kernel
(``_convert_weight_packed_for_cpu``: nibbles reordered in blocks of 32 rows, double
quantization undone into a bfloat16 absmax, ``quant_state.dtype`` set to bfloat16);
elsewhere the layer keeps the plain layout that ``dequantize_4bit`` reads. Everything
here that reads a 4-bit layer's state goes through :func:`plain_state`, which returns
the plain layout whichever the layer is in, and a 16-bit layer the harness builds takes
the model's own 16-bit dtype (:func:`activation_dtype`), never the quantization state's.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any, Literal

from harness.models.introspect import activation_dtype

MergePath = Literal["merge_and_unload", "requantize", "dequantize"]
Layout = Literal["plain", "cpu-packed"]
LAYOUT_NAMES: dict[Layout, str] = {
    "plain": "plain 4-bit layout (dequantize + matmul; double-quantized absmax)",
    "cpu-packed": "bitsandbytes' CPU-packed 4-bit layout (fused AVX512-BF16 kernel; bfloat16 absmax, double "
                  "quantization undone)",
}
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


def layout(layer: Any) -> Layout:
    """Which layout a 4-bit layer's weight is in now (it can change at the first forward)."""
    state = getattr(getattr(layer, "weight", None), "quant_state", None)
    return "cpu-packed" if getattr(state, "packing_format_for_cpu", False) else "plain"


def layouts(model: Any) -> dict[Layout, int]:
    """How many 4-bit layers of ``model`` are in each layout (empty: no 4-bit layer)."""
    counts: dict[Layout, int] = {}
    for module in model.modules():
        if is_4bit(module):
            counts[layout(module)] = counts.get(layout(module), 0) + 1
    return counts


def describe_layouts(model: Any) -> str | None:
    """One phrase naming the 4-bit layout(s) ``model`` holds, or None without 4-bit layers."""
    counts = layouts(model)
    if not counts:
        return None
    return "; ".join(f"{LAYOUT_NAMES[name]} ({n} layers)" if len(counts) > 1 else LAYOUT_NAMES[name]
                     for name, n in sorted(counts.items()))


def plain_state(layer: Any) -> tuple[Any, Any]:
    """A 4-bit layer's packed data and quantization state in the plain layout, whichever it holds.

    The layer is never changed: a CPU-packed layer is converted back on copies.
    """
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(layer)
    weight = layer.weight
    state = weight.quant_state
    if layout(layer) == "cpu-packed":
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
    return weight.data, state


def dequantized_weight(layer: Any) -> Any:
    """A 4-bit layer's weight as its forward uses it, in float32."""
    import bitsandbytes.functional as bnbf
    import torch

    data, state = plain_state(layer)
    return bnbf.dequantize_4bit(data, state).to(torch.float32)


def to_plain_layout(model: Any) -> int:
    """Return every CPU-packed 4-bit layer of ``model`` (a copy) to the plain layout; how many were packed.

    bitsandbytes does the same before it saves a layer or moves it to a GPU.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    count = 0
    for module in model.modules():
        if is_4bit(module) and layout(module) == "cpu-packed":
            weight = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
            count += 1
    return count


def repack_for_cpu(model: Any) -> int:
    """Put every plain 4-bit layer of ``model`` on the CPU into bitsandbytes' CPU-packed layout, as its
    first inference forward does on a CPU with AVX512-BF16; how many were repacked.

    This lets every machine run the paths that read 4-bit weights on the layout another machine has.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    count = 0
    for module in model.modules():
        if is_4bit(module) and layout(module) == "plain" and module.weight.device.type == "cpu":
            fix_4bit_weight_quant_state_from_module(module)
            weight = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
            count += 1
    return count


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


def requantize_in_place(layer: Any, weight: Any, dtype: Any) -> Any:
    """``layer`` (4-bit, on a copy) now holds ``weight`` cast to ``dtype``, quantized afresh with the layer's
    own settings, in the plain layout (as a fresh 4-bit load is)."""
    import bitsandbytes as bnb

    old = layer.weight
    layer.quant_state = None
    layer.weight = bnb.nn.Params4bit(
        weight.to(dtype).cpu(), requires_grad=False, blocksize=old.blocksize,
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


def merged(model: Any, path: MergePath, *, plain_first: bool = True) -> Any:
    """A merged copy of a peft model along ``path``; the model itself is left as it was.

    ``plain_first``: the copy's 4-bit layers are returned to the plain layout before merging,
    so the merge sees what it would on any machine. ``False`` merges the layout as loaded,
    as a user's script would after the model has run a forward pass.
    """
    clone = copy.deepcopy(model)
    if plain_first:
        to_plain_layout(clone)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Merge lora module to 4-bit linear.*")
        if path != "merge_and_unload":
            _merge_4bit_by_hand(clone, keep_16bit=path == "dequantize", dtype=activation_dtype(clone))
        out = clone.merge_and_unload()  # what is left: LoRA layers on 16-bit bases, merged by peft
    out.eval()
    return out


def _merge_4bit_by_hand(model: Any, *, keep_16bit: bool, dtype: Any) -> None:
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
        setattr(parent, name,
                plain_linear(base, weight, dtype) if keep_16bit else requantize_in_place(base, weight, dtype))
