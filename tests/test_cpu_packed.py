"""Every path that reads 4-bit weights, on bitsandbytes' CPU-packed layout, on any CPU.

On a CPU with AVX512-BF16 bitsandbytes repacks each 4-bit weight at the first inference forward
(``harness.models.quantized``: "two memory layouts"); elsewhere that layout never appears, so these tests
put a model in it by hand (``repack_for_cpu``, bitsandbytes' own conversion) and, where the CPU has
no fused kernel, run its forward with the torch reference kernel of ``harness.run.cpu_packed``.
Paths exercised here: the three merge paths and peft's merge on the layout as loaded, the float32
copy (``cache``), save + reload (``save_reload``), the footprint figures (``memory``,
``harness-bench``), and the ``lora_merge`` check end to end on the real model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from harness.run.cpu_packed import fused_kernel_available, register_reference_kernel, unregister_reference_kernel
from harness.models.quantized import (
    activation_dtype, dequantized_weight, float32_copy, is_4bit, layouts, merged, repack_for_cpu, to_plain_layout,
)

IDS = (1, 5, 9, 17, 33, 64, 2, 90)


@pytest.fixture
def packed_kernel():
    """The fused kernel where the CPU has it, the torch reference kernel standing in elsewhere."""
    registered = register_reference_kernel()
    yield "reference" if registered else "fused"
    if registered:
        unregister_reference_kernel()


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([list(IDS)])).logits.float()


def _packed(model):
    out = copy.deepcopy(model)
    assert repack_for_cpu(out) == layouts(model)["plain"]
    assert set(layouts(out)) == {"cpu-packed"}
    return out


def test_the_reference_kernel_computes_what_the_plain_layout_does(tiny_nf4_lora, packed_kernel):
    plain = _logits(tiny_nf4_lora)
    packed = _logits(_packed(tiny_nf4_lora))
    # the packed layout keeps a bfloat16 absmax (not the nested 8-bit one): rounding, nothing more
    assert float((packed - plain).abs().max()) < 0.02 * float(plain.abs().max())


def test_weights_read_the_same_on_both_layouts_and_the_layer_is_left_as_it_was(tiny_nf4_lora):
    packed = _packed(tiny_nf4_lora)
    plain_layers = [m for m in tiny_nf4_lora.modules() if is_4bit(m)]
    packed_layers = [m for m in packed.modules() if is_4bit(m)]
    for a, b in zip(plain_layers, packed_layers):
        before = b.weight.data.clone()
        wa, wb = dequantized_weight(a), dequantized_weight(b)
        assert torch.allclose(wa, wb, rtol=1e-2, atol=1e-3 * float(wa.abs().max()))
        assert torch.equal(b.weight.data, before) and b.weight.quant_state.packing_format_for_cpu
    back = copy.deepcopy(packed)
    assert to_plain_layout(back) == len(packed_layers) and set(layouts(back)) == {"plain"}


def test_the_merge_paths_give_the_same_model_from_either_layout(tiny_nf4_lora, packed_kernel):
    packed = _packed(tiny_nf4_lora)
    unmerged = _logits(tiny_nf4_lora)
    effect = float((unmerged - _logits_without_adapter(tiny_nf4_lora)).abs().mean())
    for path in ("merge_and_unload", "requantize", "dequantize"):
        from_plain, from_packed = merged(tiny_nf4_lora, path), merged(packed, path)
        gap = float((_logits(from_packed) - _logits(from_plain)).abs().mean())
        assert gap < 0.1 * effect, path
        # a 16-bit layer the harness builds takes the model's dtype, never the packed state's bfloat16
        for module in from_packed.modules():
            if isinstance(module, torch.nn.Linear) and not is_4bit(module):
                assert module.weight.dtype == activation_dtype(tiny_nf4_lora) == torch.float16
    assert set(layouts(packed)) == {"cpu-packed"}  # the model the merges started from is untouched


def test_peft_merging_the_packed_layout_as_loaded_damages_the_model(tiny_nf4_lora, packed_kernel):
    """The platform defect ``lora_merge`` reports: peft dequantizes packed weights as plain ones."""
    packed = _packed(tiny_nf4_lora)
    unmerged = _logits(tiny_nf4_lora)
    good = float((_logits(merged(packed, "merge_and_unload")) - unmerged).abs().mean())
    bad = float((_logits(merged(packed, "merge_and_unload", plain_first=False)) - unmerged).abs().mean())
    assert bad > 5 * good


def test_float32_copy_reads_the_packed_layout(tiny_nf4_lora, packed_kernel):
    packed = _packed(tiny_nf4_lora)
    reference = _logits(tiny_nf4_lora)
    copy32 = float32_copy(packed)
    assert all(p.dtype == torch.float32 for p in copy32.parameters())
    assert float((_logits(copy32) - reference).abs().max()) < 0.05 * float(reference.abs().max())


def test_save_and_reload_from_the_packed_layout(tiny_nf4_lora, packed_kernel, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    base = merged(tiny_nf4_lora, "requantize")  # an NF4 model without adapter layers, as a user saves one
    assert repack_for_cpu(base) > 0
    before = _logits(base)
    base.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved"), device_map="cpu")
    assert set(layouts(reloaded)) == {"plain"}
    after = _logits(reloaded)
    assert float((after - before).abs().max()) < 0.02 * float(before.abs().max())


def test_footprint_figures_name_the_layout_and_count_the_unnested_state(tiny_nf4_lora):
    from harness.measure import quant_state_bytes
    from harness.models.quantized import describe_layouts

    packed = _packed(tiny_nf4_lora)
    assert "plain" in describe_layouts(tiny_nf4_lora) and "CPU-packed" in describe_layouts(packed)
    # double quantization undone: a bfloat16 absmax per block of 64 (no nested 8-bit one), and every byte of
    # the state the packed layout really holds is counted
    layers = [m for m in packed.modules() if is_4bit(m)]
    held = 0
    for layer in layers:
        state = layer.weight.quant_state
        assert state.absmax.dtype == torch.bfloat16 and not state.nested
        assert state.absmax.numel() == layer.in_features * layer.out_features // 64
        held += state.absmax.numel() * 2 + state.code.numel() * state.code.element_size()
        offset = getattr(state, "offset", None)  # the nested scales' offset outlives the un-nesting
        held += 0 if offset is None else offset.numel() * offset.element_size()
    assert quant_state_bytes(packed) == held


@pytest.mark.skipif(not fused_kernel_available(),
                    reason="this CPU has no AVX512-BF16, so bitsandbytes has no fused 4-bit kernel here; the "
                           "packed layout is exercised with the torch reference kernel by the tests above")
def test_the_fused_kernel_agrees_with_the_reference_kernel(tiny_nf4_lora):
    from harness.run.cpu_packed import reference_gemv_4bit

    packed = _packed(tiny_nf4_lora)
    layer = next(m for m in packed.modules() if is_4bit(m))
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    state = layer.weight.quant_state
    fused = torch.ops.bitsandbytes.gemv_4bit(x, layer.weight.data, state.shape, state.absmax, state.code,
                                             state.blocksize)
    ours = reference_gemv_4bit(x, layer.weight.data, state.shape, state.absmax, state.code, state.blocksize)
    assert torch.allclose(fused.float(), ours.float(), rtol=2e-2, atol=2e-2)


def _logits_without_adapter(model) -> torch.Tensor:
    with model.disable_adapter():
        return _logits(model)
